"""One study across bases: `base` set per experiment or as a sweep factor, one shared prepare, caches kept per
family, results and the report naming each run's base, merges refused across bases."""

from __future__ import annotations

import re

import pytest
from PIL import Image

from lookalike.config import load_config
from lookalike.errors import LookalikeError
from lookalike.models.merge import merge_loras
from lookalike.store import refresh
from lookalike.sweep.plan import config_for_run, experiments
from lookalike.train.trainer import train
from tests.conftest import run_cli, tiny_study

BASES = {"flux": "tiny", "klein": "tiny-flux2-klein", "sdxl": "tiny-sdxl", "sd15": "tiny-sd15"}


def test_base_as_a_sweep_factor_names_its_experiments_and_sets_each_runs_base(tiny_config, tmp_path):
    local = tmp_path / "models" / "my-z-image"
    config = load_config(tiny_config(**{"sweep": {"design": "grid"},
                                        "sweep.factors": {"base": ["tiny", "models/my-z-image"], "rank": [2, 4]}}))
    planned = {p.name: p.overrides for p in experiments(config)}
    assert list(planned) == ["tiny-r2", "tiny-r4", "my-z-image-r2", "my-z-image-r4"]
    assert planned["my-z-image-r2"]["base"] == str(local), "a local folder, relative to the config file"
    run = config_for_run(config, "tiny-r4")
    assert (run.model.base, run.train.rank) == ("tiny", 4)


def test_an_unknown_factor_is_refused_with_the_keys_it_may_be(tiny_config):
    with pytest.raises(LookalikeError, match="'bse' is not a \\[train\\] key, base or prior"):
        load_config(tiny_config(**{"sweep": {"design": "grid"}, "sweep.factors": {"bse": ["tiny"]}}))


def test_a_drawing_base_no_runs_lora_fits_stops_the_study_before_it_trains(tiny_config):
    """[generate] base of one family, a sweep across two: `lookalike run` refuses before prepare or training."""
    from tests.conftest import run_in_process

    path = tiny_config(**{"generate": {"base": "tiny-krea2"}, "sweep": {"design": "grid"},
                          "sweep.factors": {"base": ["tiny-krea2", "tiny-z-image"]}})
    result = run_in_process("run", str(path))
    assert result.returncode != 0
    assert "error: generate.base: tiny-krea2 is a krea2 base, and the LoRAs of model.base tiny-z-image are " \
           "z-image's" in result.stderr
    assert not (load_config(path).workspace / "runs").exists()


@pytest.mark.slow
def test_one_study_trains_four_bases_and_reports_them_side_by_side(tmp_path, faces):
    """FLUX.1, FLUX.2 [klein], SDXL and SD 1.5, the last at its own resolution (half the study's)."""
    config = tiny_study(tmp_path, faces, data={"resolution": 96}, train={"max_train_steps": 5},
                        evaluate={"clip_model": "tiny"}, generate={"num_inference_steps": 2})
    config.write_text(config.read_text() + "".join(f'[[sweep.experiments]]\nname = "{name}"\nbase = "{base}"\n'
                                                   + ("resolution = 48\n" if name == "sd15" else "")
                                                   for name, base in BASES.items()))
    result = run_cli("run", str(config), timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    workspace = tmp_path / "work"
    assert result.stdout.count("4 photos inspected") == 1, "one prepare serves every base"
    assert result.stdout.count("prepare sks: up to date") == len(BASES)
    # FLUX.1 and the SD bases draw with guidance 5; the distilled FLUX.2 [klein] without guidance.
    stems = {"flux": "p00_s0_g5", "klein": "p00_s0", "sdxl": "p00_s0_g5", "sd15": "p00_s0_g5"}
    for name, stem in stems.items():
        with Image.open(workspace / "runs" / name / "images" / f"{stem}.png") as image:
            assert image.size == ((48, 48) if name == "sd15" else (96, 96)), name
    summary = (workspace / "report" / "summary.md").read_text()
    assert "| run | base | state |" in summary
    for name, base in BASES.items():
        assert f"| {name} | {base} | done |" in summary
    page = (workspace / "report" / "index.html").read_text()
    assert all(f"grid/{name}_{stem}.jpg" in page for name, stem in stems.items())
    results = run_cli("results", str(config))
    assert results.returncode == 0 and re.search(r"┃ run\s+┃\s*base\s+┃\s*state", results.stdout), results.stdout
    rows = {row["name"]: row["base"] for row in refresh(workspace / "runs", workspace / "results.sqlite")}
    assert rows == BASES

    flux, sdxl = (workspace / "runs" / name / "lora.safetensors" for name in ("flux", "sdxl"))
    with pytest.raises(LookalikeError, match="cannot merge LoRAs of different base models"):
        merge_loras(flux, sdxl, tmp_path / "merged.safetensors")


@pytest.mark.slow
def test_a_run_on_another_base_keeps_its_own_text_cache(tiny_config):
    config = load_config(tiny_config(train={"max_train_steps": 1}))
    train(config, "flux")
    texts = config.workspace / "cache" / "text"
    before = set(texts.iterdir())
    train(config.with_experiment({"base": "tiny-z-image"}, "test"), "zimage")
    assert len(set(texts.iterdir()) - before) == len(before), "the same captions, encoded again by Z-Image's encoder"
