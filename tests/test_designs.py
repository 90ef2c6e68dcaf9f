"""Sweep designs: grid, one-at-a-time, pairwise coverage, and the study's own 11 experiments."""

import itertools
from pathlib import Path

import pytest

from lookalike.config import load_config
from lookalike.errors import LookalikeError
from lookalike.sweep import designs
from lookalike.sweep.plan import experiments
from tests.conftest import write_config

STUDY = {"learning_rate": [1e-3, 5e-4, 1e-4], "rank": [8, 16, 32], "max_train_steps": [500, 1000, 1500]}
PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper.toml"
# The study's table: (learning rate, rank, steps, scheduler) of experiments 1 to 11.
STUDY_EXPERIMENTS = [(1e-3, 8, 500, "cosine"), (1e-4, 32, 1500, "cosine"), (5e-4, 16, 1000, "cosine"),
                     (1e-3, 8, 1000, "cosine"), (1e-4, 32, 1000, "cosine"), (5e-4, 16, 500, "cosine"),
                     (5e-4, 16, 1500, "cosine"), (1e-3, 32, 1000, "cosine"), (1e-4, 8, 1000, "cosine"),
                     (1e-3, 32, 500, "cosine"), (5e-4, 16, 1000, "constant")]


def uncovered_pairs(rows, factors):
    """Every (factor, level, factor, level) pair that no row holds: checked independently of the design."""
    missing = []
    for (f1, levels1), (f2, levels2) in itertools.combinations(factors.items(), 2):
        for a, b in itertools.product(levels1, levels2):
            if not any(row[f1] == a and row[f2] == b for row in rows):
                missing.append((f1, a, f2, b))
    return missing


def test_grid_of_three_factors_of_three_levels_has_27_distinct_experiments():
    rows = designs.grid(STUDY)
    assert len(rows) == 27 and len({tuple(r.values()) for r in rows}) == 27


def test_pairwise_covers_every_pair_in_at_most_12():
    rows = designs.pairwise(STUDY)
    assert len(rows) <= 12 and uncovered_pairs(rows, STUDY) == []


@pytest.mark.parametrize("factors", [
    {"a": [1, 2], "b": [1, 2, 3, 4], "c": [1, 2, 3], "d": [1, 2], "e": [1, 2, 3]},
    {"learning_rate": [1e-3, 1e-4], "rank": [4, 8, 16, 32], "lr_scheduler": ["cosine", "constant"]},
])
def test_pairwise_covers_every_pair_of_uneven_factors_in_fewer_runs_than_the_grid(factors):
    rows = designs.pairwise(factors)
    assert uncovered_pairs(rows, factors) == []
    assert len(rows) < len(designs.grid(factors))


def test_one_at_a_time_moves_one_factor_from_the_baseline():
    rows = designs.one_at_a_time(STUDY, {"learning_rate": 5e-4, "rank": 16, "max_train_steps": 1000})
    assert rows[0] == {"learning_rate": 5e-4, "rank": 16, "max_train_steps": 1000}
    assert len(rows) == 7
    assert all(sum(row[k] != rows[0][k] for k in STUDY) == 1 for row in rows[1:])


def test_paper_config_expands_to_the_studys_11_experiments():
    planned = experiments(load_config(PAPER))
    assert [p.name for p in planned] == [f"exp{i}" for i in range(1, 12)]
    config = load_config(PAPER)
    got = []
    for p in planned:
        train = config.with_train(p.overrides, p.name).train
        got.append((train.learning_rate, train.rank, train.max_train_steps, train.lr_scheduler))
    assert got == STUDY_EXPERIMENTS


def test_design_in_the_config_names_its_experiments(tmp_path):
    path = write_config(tmp_path / "s.toml", {"": {"name": "s", "workspace": "w"},
                                              "subject": {"token": "sks", "images": "p"},
                                              "sweep": {"design": "grid"},
                                              "sweep.factors": {"learning_rate": [1e-3, 1e-4], "rank": [4, 8]}})
    names = [p.name for p in experiments(load_config(path))]
    assert names == ["lr0.001-r4", "lr0.001-r8", "lr0.0001-r4", "lr0.0001-r8"]


def test_factors_without_a_design_make_a_grid(tmp_path):
    path = write_config(tmp_path / "s.toml", {"": {"name": "s", "workspace": "w"},
                                              "subject": {"token": "sks", "images": "p"},
                                              "sweep.factors": {"rank": [4, 8], "captions": [True, False]}})
    names = [p.name for p in experiments(load_config(path))]
    assert names == ["r4-captionsTrue", "r4-captionsFalse", "r8-captionsTrue", "r8-captionsFalse"]


def test_list_levels_and_the_recipes_keys_make_plain_short_names(tmp_path):
    path = write_config(tmp_path / "s.toml", {"": {"name": "s", "workspace": "w"},
                                              "subject": {"token": "sks", "images": "p"}, "data": {"resolution": 256},
                                              "sweep.factors": {"extra_resolutions": [[], [128, 192]],
                                                                "background_loss_weight": [0.1],
                                                                "loraplus_lr_ratio": [16.0]}})
    names = [p.name for p in experiments(load_config(path))]
    assert names == ["extranone-bg0.1-loraplus16", "extra128+192-bg0.1-loraplus16"]


@pytest.mark.parametrize("sweep, factors, message", [
    ({"design": "grid"}, {"rnak": [1, 2]}, "'rnak' is not a [train] key"),
    ({"design": "pairwise"}, {}, "sweep.design = 'pairwise' needs [sweep.factors]"),
    ({"design": "grid"}, {"rank": [4, 4]}, "distinct levels"),
])
def test_bad_designs_are_named(tmp_path, sweep, factors, message):
    path = write_config(tmp_path / "s.toml", {"": {"name": "s", "workspace": "w"},
                                              "subject": {"token": "sks", "images": "p"},
                                              "sweep": sweep, "sweep.factors": factors})
    with pytest.raises(LookalikeError) as error:
        load_config(path)
    assert message in str(error.value)


def test_a_bad_level_is_found_when_planning(tmp_path):
    path = write_config(tmp_path / "s.toml", {"": {"name": "s", "workspace": "w"},
                                              "subject": {"token": "sks", "images": "p"},
                                              "sweep": {"design": "grid"}, "sweep.factors": {"rank": [4, 0]}})
    with pytest.raises(LookalikeError, match="sweep experiment r0: rank: Input should be greater than or equal to 1"):
        experiments(load_config(path))


def test_a_level_that_makes_an_unusable_run_name_is_refused_when_planning(tmp_path):
    path = write_config(tmp_path / "s.toml", {"": {"name": "s", "workspace": "w"},
                                              "subject": {"token": "sks", "images": "p"},
                                              "sweep.factors": {"sample_prompts": [["{token}"], ["{token}/beach"]]}})
    with pytest.raises(LookalikeError, match=r"sweep: the experiment \{'sample_prompts': \['\{token\}/beach'\]\} makes "
                                             "a run name that cannot be used .*: list it in \\[\\[sweep.experiments"):
        experiments(load_config(path))
