"""lookalike report: from a finished tiny sweep (one run failed), opened in headless Chromium; the guidance
figure from runs generated at three guidance scales."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from lookalike.display import cell
from lookalike.report import figures
from lookalike.workspace import Workspace, write_json
from tests.conftest import drawn_by_its_lora, run_cli, tiny_study

pytestmark = pytest.mark.slow  # trains, serves or starts lookalike processes: `make test` only

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory, faces):
    """`lookalike run` on the tiny model: two experiments, one of them refused at run time on a CPU."""
    folder = tmp_path_factory.mktemp("study")
    config = tiny_study(folder, faces, train={"max_train_steps": 10, "sample_every": 5, "sample_steps": 2},
                        evaluate={"clip_model": "tiny"},
                        generate={"prompts": ["a photo of {token}", "{token} smiling"], "num_inference_steps": 2})
    config.write_text(config.read_text() + '[[sweep.experiments]]\nname = "ok"\n'
                      '[[sweep.experiments]]\nname = "bad"\noptimizer = "adamw8bit"\n')
    result = run_cli("run", str(config))
    assert result.returncode == 1, result.stdout + result.stderr  # the failed run is a problem to report
    return folder / "work", result


def test_a_sweep_with_a_failed_run_gets_a_report_listing_the_failure(finished_study):
    workspace, result = finished_study
    assert "problem: run bad failed" in result.stdout
    index = workspace / "report" / "index.html"
    assert f"report: {index}" in result.stdout
    page = index.read_text()
    assert "failed: bad (train.optimizer = &#x27;adamw8bit&#x27; needs bitsandbytes" in page
    assert "<h2>Figures</h2>" in page and "figures/loss.png" in page and "grid/ok_p00_s0_g5.jpg" in page
    summary = (workspace / "report" / "summary.md").read_text()
    assert "| bad | failed |" in summary and "| ok | done |" in summary
    # Each finished run's means with their 95% intervals over its 2 images (no face: no identity).
    with open(workspace / "runs" / "ok" / "scores.csv", newline="") as scores:
        clip = [float(row["clip_score"]) for row in csv.DictReader(scores)]
    row = next(line for line in summary.splitlines() if line.startswith("| ok | 2 |"))
    assert row.startswith(f"| ok | 2 | - | {cell(sum(clip) / 2)} [") and "How sure: 95% intervals" in page


def test_a_runs_best_sample_step_is_drawn_and_scored_when_it_is_not_the_final_one(finished_study):
    workspace, _ = finished_study
    run = Workspace(workspace).run("ok")
    status = run.read_status()
    assert status["final_step"] == 10 and status["best_step"] in (5, 10) and run.best_lora.is_file()
    best_images = run.images_at("best")
    if status["best_step"] == 5:
        assert run.has_distinct_best()
        assert len(list(best_images.glob("p*.png"))) == 2 and (best_images / "metrics.json").is_file()
    else:  # the best step's LoRA is the final one: nothing more to draw
        assert not run.has_distinct_best() and not best_images.exists()


def test_the_best_lora_is_distinct_only_when_its_step_is_not_the_final_one(tmp_path):
    run = Workspace(tmp_path).run("r")
    run.root.mkdir(parents=True)
    run.write_status("done", best_step=5, final_step=10)
    assert not run.has_distinct_best(), "no best LoRA kept"
    run.best_lora.write_bytes(b"weights")
    assert run.has_distinct_best()
    run.write_status("done", best_step=10, final_step=10)
    assert not run.has_distinct_best()


def test_a_study_scored_by_the_random_tiny_clip_declares_no_winner(finished_study):
    workspace, _ = finished_study
    summary = (workspace / "report" / "summary.md").read_text()
    best = summary.split("## Best settings")[1].split("## Every run")[0]
    assert "No best settings: this study's numbers cannot rank runs" in best and "tiny CLIP" in best
    assert "\n1. " not in best, "no run is named best"
    assert "No best settings" in (workspace / "report" / "index.html").read_text()


def test_best_settings_are_numbered_once_and_a_faceless_run_shows_one_identity(tmp_path):
    from lookalike.config import load_config
    from lookalike.report.build import _best_lines, _summary
    from lookalike.evaluate.pareto import pareto_front
    from tests.conftest import write_config

    runs = [{"name": name, "learning_rate": 1e-3, "rank": 4, "alpha": 4.0, "max_train_steps": 10,
             "lr_scheduler": "constant", "train_seconds": 1.0, "final_loss": 0.1, "images": 2, "unreadable": 0,
             "face_distance": distance, "identity_similarity": identity, "id_match_rate": None,
             "faceless": faceless, "several_faces": 0, "clip_score": clip, "state": "done", "reason": None}
            for name, distance, identity, faceless, clip in [("faces", 0.5, 0.6, 0, 0.2),
                                                             ("faceless", None, None, 2, 0.3)]]
    front, unplaced = pareto_front(runs)
    assert [r["name"] for r in front] == ["faces", "faceless"] and not unplaced
    config = load_config(write_config(tmp_path / "s.toml", {"": {"name": "s", "workspace": "w"},
                                                            "subject": {"token": "sks", "images": "p"}}))
    summary = _summary(config, runs, _best_lines(front, unplaced, [], None), effects={}, sure=([], []))
    best = summary.split("## Best settings")[1].split("## Every run")[0]
    assert "\n1. faces:" in best and "\n2. faceless:" in best and "1. 1." not in summary
    assert "identity -," in best and "-1" not in summary, "a run without faces shows '-' everywhere"


def test_the_report_names_the_best_checkpoint_and_the_best_run_checkpoint_and_strength():
    from lookalike.report.build import _best_checkpoint, _best_lora

    def scored(step, identity, clip):
        return {"step": step, "identity_similarity": identity, "clip_score": clip, "faceless": 0, "images": 2}

    # Run b's step 200 beats every other (run, step) on identity and CLIP.
    scores = {"a": [scored(100, 0.40, 0.25), scored(200, 0.45, 0.24)],
              "b": [scored(100, 0.42, 0.25), scored(200, 0.55, 0.26), scored(300, 0.50, 0.26)]}
    assert _best_checkpoint(scores).startswith("Best checkpoint: run b at step 200 (")
    assert _best_checkpoint({}) is None

    def at(identity, clip, faceless=0):
        return {"identity_similarity": identity, "clip_score": clip, "faceless": faceless, "images": 4}

    # Every run's final and best LoRAs at each strength, ranked by the same rule: b's best step at 0.8 keeps the
    # face and the prompt best; b's final LoRA is better at 1.2 on identity alone, but loses a face and CLIP.
    evaluations = {
        ("a", "final"): {"per_lora_scale": {"0.8": at(0.45, 0.26), "1.2": at(0.48, 0.22)}},
        ("b", "final"): {"per_lora_scale": {"0.8": at(0.50, 0.25), "1.2": at(0.58, 0.20, faceless=1)}},
        ("b", "best"): {"per_lora_scale": {"0.8": at(0.55, 0.27), "1.2": at(0.52, 0.21)}},
    }
    line = _best_lora(evaluations, {"a": None, "b": 200})
    assert line.startswith("Best LoRA: run b, its best sample step's (step 200), at strength 0.8 (identity 0.55"), \
        line
    assert "best of 6 checkpoints and strengths" in line and "--run b --checkpoint best" in line
    # Without strengths, the final and best checkpoints alone are compared (metrics.json without per strength).
    line = _best_lora({("b", "final"): at(0.5, 0.25), ("b", "best"): at(0.4, 0.24)}, {"b": 200})
    assert line.startswith("Best LoRA: run b, its final LoRA, at strength 1.0"), line
    # One LoRA at one strength per run: nothing to choose beyond the ranked runs.
    assert _best_lora({("a", "final"): {"per_lora_scale": {"1.0": at(0.5, 0.2)}},
                       ("b", "final"): at(0.4, 0.2)}, {}) is None
    assert _best_lora({}, {}) is None


def test_each_swept_factor_gets_its_levels_mean_metrics_over_the_finished_runs(tiny_config):
    from lookalike.config import load_config
    from lookalike.report.effects import factor_effects
    from lookalike.sweep.plan import experiments

    config = load_config(tiny_config(prior={"num_class_images": 2}, sweep={"design": "grid"},
                                     **{"sweep.factors": {"prior": [True, False], "rank": [4, 8]}}))
    # prior True/False x rank 4/8: (identity, bleed, CLIP, faceless of 4 images)
    metrics = [(0.6, 0.2, 0.30, 0), (0.8, None, 0.20, 2), (0.4, 0.4, None, 4), (None, 0.1, 0.10, 4)]
    done = [{"name": experiment.name, "identity_similarity": identity, "bleed_similarity": bleed, "clip_score": clip,
             "faceless": faceless, "images": 4}
            for experiment, (identity, bleed, clip, faceless) in zip(experiments(config), metrics)]
    effects = factor_effects(config, done)
    assert effects == {"prior": [("True", ["2", "0.7", "0.2", "0.25", "0.25"]),
                                 ("False", ["2", "0.4", "0.25", "0.1", "1"])],
                       "rank": [("4", ["2", "0.5", "0.3", "0.3", "0.5"]), ("8", ["2", "0.8", "0.1", "0.15", "0.75"])]}
    assert "rank" not in factor_effects(config, done[:1] + done[2:3]), "one level left: nothing to compare"

    # A base in a local folder is named by the folder's name, as the tables name it.
    bases = load_config(tiny_config("bases.toml", sweep={"design": "grid"},
                                    **{"sweep.factors": {"base": ["tiny", "models/my-flux"]}}))
    rows = [{"name": e.name, "identity_similarity": 0.5, "clip_score": 0.2, "faceless": 0, "images": 4}
            for e in experiments(bases)]
    assert [level for level, _ in factor_effects(bases, rows)["base"]] == ["tiny", "my-flux"]


def test_the_steps_figure_draws_a_line_per_run_and_stars_its_best_step():
    scores = {"a": [{"step": 100, "identity_similarity": 0.4, "clip_score": 0.25},
                    {"step": 200, "identity_similarity": 0.5, "clip_score": 0.24}],
              "b": [{"step": 100, "identity_similarity": None, "clip_score": 0.2}]}
    identity, clip = figures.steps_figure(scores, {"a": 200, "b": 100}).axes
    assert [list(line.get_xdata()) for line in identity.lines] == [[100, 200], [200]], "run a and its star"
    assert [list(line.get_xdata()) for line in clip.lines] == [[100, 200], [200], [100], [100]]


def test_a_metric_without_values_says_why_instead_of_empty_axes():
    rows = [{"name": f"r{rank}", "learning_rate": 1e-3, "rank": rank, "max_train_steps": 10,
             "lr_scheduler": "constant", "face_distance": None, "identity_similarity": None, "clip_score": 0.2,
             "faceless": 2} for rank in (4, 8)]
    figure = figures.factor_figure(rows, "rank")
    notes = {axis.get_title(): [t.get_text() for t in axis.texts] for axis in figure.axes}
    assert notes["face distance (lower is better)"] == ["no face in any image: nothing to plot"]
    assert notes["CLIP Score"] == [], "a metric with values is drawn, not explained"


def test_report_shows_its_figures_and_images_in_headless_chromium(finished_study, tmp_path):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "chromium not found: `make test` installs Debian's chromium package"
    index = finished_study[0] / "report" / "index.html"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(index.as_uri())
        page.wait_for_load_state("load")
        sizes = page.eval_on_selector_all("img", "images => images.map(i => [i.getAttribute('src'), "
                                                 "i.complete, i.naturalWidth, i.naturalHeight])")
        page_text = page.inner_text("body")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert len(sizes) >= 4, sizes  # the guidance and loss figures, and the grid's images
    assert page_text.count("Nothing to plot: no image of any run shows a face.") == 1, "no face: no Pareto figure"
    assert all(complete and width > 0 and height > 0 for _, complete, width, height in sizes), sizes
    shot = np.asarray(Image.open(tmp_path / "report.png").convert("L"), dtype=float)
    assert shot.std() > 10, "the screenshot is not blank"


def test_runs_generated_at_three_guidance_scales_give_three_points_per_metric(tiny_config, faces, tmp_path):
    run = Workspace(tmp_path / "work").run("r")
    run.images.mkdir(parents=True)
    for index, (person, guidance) in enumerate([("obama", 3.5), ("biden", 5.0),
                                                ("obama", 7.5)]):
        Image.open(faces / "test" / f"{person}.jpg").convert("RGB").save(run.images / f"p00_s{index}_g{guidance:g}.png")
        write_json(run.images / f"p00_s{index}_g{guidance:g}.json",
                   drawn_by_its_lora(run, {"prompt": "a photo of sks", "seed": index, "guidance_scale": guidance}))
    write_json(run.config, {"train": {"rank": 4}})
    run.write_status("done")
    config = tiny_config(evaluate={"face_backend": "dlib", "clip_model": "tiny"})
    assert run_cli("evaluate", str(config), "--run", "r").returncode == 0
    per_guidance = json.loads((run.root / "metrics.json").read_text())["per_guidance_scale"]
    figure = figures.inference_figure({"r": per_guidance}, "inference guidance scale")
    assert len(figure.axes) == len(figures.METRICS)
    for axis in figure.axes:
        (line,) = axis.lines
        assert list(line.get_xdata()) == [3.5, 5.0, 7.5], axis.get_title()
        assert np.isfinite(np.asarray(line.get_ydata(), dtype=float)).all()
