"""lookalike report: from a finished tiny sweep (one run failed), opened in headless Chromium; the guidance
figure from runs generated at three guidance scales."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from lookalike.report import figures
from lookalike.workspace import Workspace, write_json
from tests.conftest import run_cli, tiny_study

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory, faces):
    """`lookalike run` on the tiny model: two experiments, one of them refused at run time on a CPU."""
    folder = tmp_path_factory.mktemp("study")
    config = tiny_study(folder, faces, train={"max_train_steps": 10}, evaluate={"clip_model": "tiny"},
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
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert len(sizes) >= 5, sizes  # 4 figures at least, and the grid's images
    assert all(complete and width > 0 and height > 0 for _, complete, width, height in sizes), sizes
    shot = np.asarray(Image.open(tmp_path / "report.png").convert("L"), dtype=float)
    assert shot.std() > 10, "the screenshot is not blank"


def test_runs_generated_at_three_guidance_scales_give_three_points_per_metric(tiny_config, faces, tmp_path):
    run = Workspace(tmp_path / "work").run("r")
    run.images.mkdir(parents=True)
    for index, (person, guidance) in enumerate([("guido_van_rossum", 3.5), ("paul_allen", 5.0),
                                                ("guido_van_rossum", 7.5)]):
        Image.open(faces / "test" / f"{person}.jpg").convert("RGB").save(run.images / f"p00_s{index}_g{guidance:g}.png")
        write_json(run.images / f"p00_s{index}_g{guidance:g}.json",
                   {"prompt": "a photo of sks", "seed": index, "guidance_scale": guidance})
    write_json(run.config, {"train": {"rank": 4}})
    run.write_status("done")
    config = tiny_config(evaluate={"face_backend": "dlib", "clip_model": "tiny"})
    assert run_cli("evaluate", str(config), "--run", "r").returncode == 0
    per_guidance = json.loads((run.root / "metrics.json").read_text())["per_guidance_scale"]
    figure = figures.guidance_figure({"r": per_guidance})
    assert len(figure.axes) == len(figures.METRICS)
    for axis in figure.axes:
        (line,) = axis.lines
        assert list(line.get_xdata()) == [3.5, 5.0, 7.5], axis.get_title()
        assert np.isfinite(np.asarray(line.get_ydata(), dtype=float)).all()
