"""Every image and figure lookalike shows beside a LoRA's name is of that LoRA's content: a run's best checkpoint
that moved on (a resumed run found a better step) leaves images and metrics of the old file behind, and evaluate,
the model card and the report must never pass them off as the new one's."""

from __future__ import annotations

import shutil

import pytest
import yaml

from lookalike import display
from lookalike.config import load_config
from lookalike.evaluate.command import evaluate_runs
from lookalike.generate import generate
from lookalike.train.trainer import train
from lookalike.workspace import Workspace, file_sha256, read_json
from tests.conftest import run_in_process


def shown_images_are_of(folder, lora_sha256: str) -> None:
    """Every image beside a sidecar in `folder` was drawn by the LoRA of that content, by its own sidecar."""
    sidecars = [p for p in folder.glob("*.json") if p.with_suffix(".png").is_file()]
    assert sidecars
    for sidecar in sidecars:
        assert [lora["sha256"] for lora in read_json(sidecar)["settings"]["loras"]] == [lora_sha256], sidecar


@pytest.mark.slow
def test_images_and_metrics_of_a_best_step_that_moved_on_are_never_shown_as_the_new_ones(tiny_config, tmp_path):
    config_file = tiny_config(train={"max_train_steps": 6, "learning_rate": 1e-2, "sample_every": 2,
                                     "sample_steps": 2, "checkpoint_every": 2, "checkpoints_keep": 3},
                              generate={"num_inference_steps": 2})
    config = load_config(config_file)
    quiet = display.console(quiet=True)
    train(config, "r", console=quiet)
    run = Workspace(config.workspace).run("r")
    generate(config, run="r", checkpoint="best", console=quiet)
    assert evaluate_runs(config, quiet, run="r", checkpoint="best") == ["r"]
    old_best = file_sha256(run.best_lora)
    assert read_json(run.images_at("best") / "metrics.json")["lora_sha256"] == old_best

    # What a resume that found a better step leaves: lora-best.safetensors is another file, best_step another step,
    # and images-best/ with its metrics.json are still the old step's.
    other = next(p for p in [run.lora, *sorted(run.front.glob("*.safetensors"))] if file_sha256(p) != old_best)
    shutil.copyfile(other, run.best_lora)
    status = run.read_status()
    run.write_status(status.pop("state"), **{**status, "best_step": 99})
    new_best = file_sha256(run.best_lora)

    # evaluate: never "up to date" for images another LoRA drew; it says to draw them again.
    result = run_in_process("evaluate", str(config_file), "--run", "r", "--checkpoint", "best")
    assert result.returncode == 2 and "were drawn by another LoRA than its best one now" in result.stderr, \
        result.stdout + result.stderr
    assert "generate CONFIG --run r --checkpoint best" in result.stderr
    # The card of the new best file: titled step 99, and neither the old step's images nor its figures.
    out = tmp_path / "shared" / "best.safetensors"
    result = run_in_process("export", str(config_file), "--run", "r", "--checkpoint", "best", "--format",
                            "diffusers", "--out", str(out), "--card")
    assert result.returncode == 0, result.stderr
    card = (out.parent / "README.md").read_text()
    assert "(step 99)" in card and "widget" not in yaml.safe_load(card.split("---\n")[1])
    assert "Not evaluated yet" in card and not (out.parent / "images").exists()
    # The report ranks checkpoints by figures of the files they name: the old best's are left out.
    assert run.current_metrics("best") is None

    # Drawn and scored again, everything shown is of the new file.
    generate(config, run="r", checkpoint="best", console=quiet)
    assert evaluate_runs(config, quiet, run="r", checkpoint="best") == ["r"]
    shown_images_are_of(run.images_at("best"), new_best)
    assert run.current_metrics("best")["lora_sha256"] == new_best
    result = run_in_process("export", str(config_file), "--run", "r", "--checkpoint", "best", "--format",
                            "diffusers", "--out", str(out), "--card", "--force")
    assert result.returncode == 0, result.stderr
    assert file_sha256(out) != old_best
    for copied in (out.parent / "images").iterdir():
        drawn = run.images_at("best") / copied.name.removeprefix("r-best-")
        assert copied.read_bytes() == drawn.read_bytes()
        assert read_json(drawn.with_suffix(".json"))["settings"]["loras"][0]["sha256"] == new_best
    assert "Not evaluated yet" not in (out.parent / "README.md").read_text()


def test_metrics_of_another_file_are_not_current(tmp_path):
    """current_metrics is the one check: figures that name no LoRA, or another, are nobody's."""
    from lookalike.workspace import RunPaths, write_json

    run = RunPaths(tmp_path / "runs" / "r")
    run.root.mkdir(parents=True)
    run.lora.write_bytes(b"weights")
    write_json(run.root / "metrics.json", {"images": 4})
    assert run.current_metrics("final") is None
    write_json(run.root / "metrics.json", {"images": 4, "lora_sha256": "0" * 64})
    assert run.current_metrics("final") is None
    write_json(run.root / "metrics.json", {"images": 4, "lora_sha256": file_sha256(run.lora)})
    assert run.current_metrics("final") == {"images": 4, "lora_sha256": file_sha256(run.lora)}


def test_a_step_has_one_spelling_and_the_last_step_is_the_final_checkpoint(tmp_path):
    from lookalike.errors import LookalikeError
    from lookalike.workspace import RunPaths

    run = RunPaths(tmp_path / "runs" / "r")
    run.write_status("done", final_step=10, best_step=5)
    run.front.mkdir()
    run.front_lora(5).write_bytes(b"weights")
    assert run.lora_at("00005") == run.lora_at("5") == run.front_lora(5)
    assert run.images_at("00005") == run.images_at("5") == run.root / "images-5"
    with pytest.raises(LookalikeError, match="step 10 is run 'r''s last: its LoRA is --checkpoint final"):
        run.lora_at("10")


def shown_pairs(config_file, workspace: Workspace, out) -> list[tuple[str, str, str]]:
    """(what shows it, the SHA-256 of the LoRA that made what is shown, the SHA-256 of the LoRA file named beside
    it) for every image and figure the study's presenters show of its runs: the results table, the report's best
    checkpoint, images-<checkpoint>/ as generate leaves them for evaluate, and a model card."""
    from lookalike.store import connect, run_table

    pairs = []
    for run in (workspace.run(p.name) for p in workspace.runs.iterdir()):
        for checkpoint in ("final", "best"):
            named = run.lora_sha256(checkpoint)
            metrics = run.current_metrics(checkpoint, named)
            if metrics is not None:
                pairs.append((f"{run.name} {checkpoint} metrics", metrics["lora_sha256"], named))
        with connect(workspace.results) as db:
            row = next(r for r in run_table(db) if r["name"] == run.name)
        if row["clip_score"] is not None:  # the results table shows figures: those of the file the run holds
            pairs.append((f"{run.name} results row", read_json(run.root / "metrics.json")["lora_sha256"],
                          run.lora_sha256("final")))
        result = run_in_process("export", str(config_file), "--run", run.name, "--checkpoint", "best", "--format",
                                "diffusers", "--out", str(out / run.name / "best.safetensors"), "--card", "--force")
        assert result.returncode == 0, result.stderr
        for copied in (out / run.name / "images").glob("*.png") if (out / run.name / "images").is_dir() else []:
            drawn = run.images_at("best") / copied.name.removeprefix(f"{run.name}-best-")
            pairs.append((f"{run.name} card image {copied.name}",
                          read_json(drawn.with_suffix(".json"))["settings"]["loras"][0]["sha256"],
                          run.lora_sha256("best")))
    summary = (workspace.root / "report" / "summary.md").read_text()
    for run in (workspace.run(p.name) for p in workspace.runs.iterdir()):
        if f"Best LoRA: run {run.name}, its best sample step's" in summary:
            pairs.append((f"{run.name} report best", read_json(run.images_at("best") / "metrics.json")["lora_sha256"],
                          run.lora_sha256("best")))
    return pairs


@pytest.mark.slow
def test_everything_shown_of_a_run_is_of_the_lora_file_named_beside_it_before_and_after_its_best_moves(tiny_config,
                                                                                                      tmp_path):
    """The property, checked over every presenter at once: after `lookalike run`; after the best step's file is
    replaced (as a resume that found a better step does); after `lookalike run` again."""
    config_file = tiny_config(train={"max_train_steps": 6, "learning_rate": 1e-2, "sample_every": 2,
                                     "sample_steps": 2, "checkpoint_every": 2, "checkpoints_keep": 3},
                              generate={"num_inference_steps": 2}, data={"crop": "center"})
    workspace = Workspace(load_config(config_file).workspace)
    result = run_in_process("run", str(config_file))
    assert result.returncode == 0, result.stdout + result.stderr
    pairs = shown_pairs(config_file, workspace, tmp_path / "cards")
    assert pairs and all(made == named for _, made, named in pairs), pairs
    run = workspace.run("default")
    other = next(p for p in [run.lora, *sorted(run.front.glob("*.safetensors"))]
                 if file_sha256(p) != file_sha256(run.best_lora))
    shutil.copyfile(other, run.best_lora)
    status = run.read_status()
    run.write_status(status.pop("state"), **{**status, "best_step": 99})
    assert all(made == named for _, made, named in shown_pairs(config_file, workspace, tmp_path / "cards"))
    result = run_in_process("run", str(config_file))
    assert result.returncode == 0, result.stdout + result.stderr
    pairs = shown_pairs(config_file, workspace, tmp_path / "cards")
    assert any("best metrics" in what for what, _, _ in pairs), "drawn and scored again: shown again"
    assert all(made == named for _, made, named in pairs), pairs
