"""Identity in the training loop: sample steps scored by the evaluator, the best step by the report's rule, its
LoRA kept and drawn with `generate --checkpoint`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lookalike import display
from lookalike.config import StopRule, load_config
from lookalike.errors import LookalikeError
from lookalike.evaluate.command import evaluate_runs
from lookalike.generate import generate
from lookalike.models.lora import modules_of, read_lora
from lookalike.evaluate.pareto import front_steps
from lookalike.train.checkpoint import list_checkpoints
from lookalike.train.sample_scores import stop_reason
from lookalike.train.trainer import train
from lookalike.workspace import Workspace, read_metrics
from tests.conftest import run_in_process
from tests.helpers import assert_a_killed_run_resumes_exactly


def record(step, identity, clip, faceless=0, images=4):
    return {"step": step, "identity_similarity": identity, "clip_score": clip, "faceless": faceless,
            "images": images}


def test_the_best_step_is_chosen_by_the_reports_rule():
    # Step 3 is best on identity and CLIP; step 2 is beaten by it on everything and leaves the front.
    assert front_steps([record(1, 0.30, 0.20), record(2, 0.50, 0.22), record(3, 0.60, 0.25)]) == [3]
    # A trade-off: both stay on the front; equal mean ranks are ordered by identity similarity.
    assert front_steps([record(1, 0.40, 0.30), record(2, 0.60, 0.20)]) == [2, 1]
    # Ties share the front, in step order.
    assert front_steps([record(4, 0.5, 0.2), record(8, 0.5, 0.2)]) == [4, 8]
    # Images without a face count against a step, and a step with no face at all has identity -1.
    assert front_steps([record(1, 0.5, 0.2, faceless=2), record(2, 0.5, 0.2, faceless=0)]) == [2]
    assert front_steps([record(1, None, 0.3, faceless=4), record(2, 0.1, 0.2)]) == [2, 1]
    # A run whose samples never show a face: the best step is the one CLIP rates best.
    assert front_steps([record(1, None, 0.1, faceless=4), record(2, None, 0.3, faceless=4)]) == [2]
    # A step missing a metric cannot be placed.
    assert front_steps([record(1, 0.5, None), record(2, 0.1, 0.1)]) == [2]
    assert front_steps([]) == []


@pytest.mark.slow
def test_samples_are_scored_while_training_and_the_best_steps_lora_is_kept_drawn_and_resumed(tiny_config):
    config_file = tiny_config(train={"max_train_steps": 15, "learning_rate": 1e-2, "sample_every": 5,
                                     "sample_steps": 2, "checkpoint_every": 5, "checkpoints_keep": 3})
    config = load_config(config_file)
    lora = train(config, "r")
    run = Workspace(config.workspace).run("r")
    records = read_metrics(run.sample_scores)
    assert [r["step"] for r in records] == [5, 10, 15]
    for key in ("face_distance", "identity_similarity", "id_match_rate", "faceless", "clip_score"):
        assert all(key in r for r in records), key
    assert all(r["clip_score"] is not None for r in records)
    front = front_steps(records)
    best = front[0]
    assert run.read_status()["best_step"] == best
    assert sorted(int(p.stem.removeprefix("step-")) for p in run.front.iterdir()) == sorted(front)

    # The best LoRA holds the weights of its step: the final LoRA's, or that step's checkpoint's.
    kept = load_file(str(run.best_lora))
    if best == 15:
        weights_then = load_file(str(lora))
    else:
        weights_then = load_file(str(next(c for c in list_checkpoints(run.checkpoints)
                                          if c.name == f"step-{best:06d}") / "lora.safetensors"))
    assert kept.keys() == weights_then.keys()
    for key in kept:
        torch.testing.assert_close(kept[key], weights_then[key], rtol=0, atol=0)

    # generate --checkpoint best draws with that file, into images-best/.
    folder = generate(config, run="r", checkpoint="best")
    assert folder == run.root / "images-best"
    sidecar = json.loads(next(p for p in folder.glob("*.json") if p.name != "config.json").read_text())
    assert sidecar["checkpoint"] == "best" and sidecar["loras"][0]["file"] == str(run.best_lora)
    with pytest.raises(LookalikeError, match=r"kept no LoRA of step 3: only the best scored steps' are kept"):
        generate(config, run="r", checkpoint="3")
    # evaluate --checkpoint best scores those images, and keeps their metrics beside them.
    assert evaluate_runs(config, display.console(quiet=True), run="r", checkpoint="best") == ["r"]
    assert json.loads((folder / "metrics.json").read_text())["images"] == 1
    assert not (run.root / "metrics.json").exists(), "the final LoRA's metrics are not these"

    # merge takes runs at a checkpoint: r@best at weight 1 beside r's final LoRA at weight 0 changes every
    # weight exactly as the best LoRA does.
    merged = run.root.parents[2] / "merged.safetensors"  # outside the workspace's managed folders
    result = run_in_process("merge", "r@best", "r", "--config", str(config_file), "--weights", "1,0",
                            "--out", str(merged))
    assert result.returncode == 0, result.stderr
    _, best_config, _ = read_lora(run.best_lora)
    scale = best_config["lora_alpha"] / best_config["r"]
    merged_modules = modules_of(load_file(str(merged)))
    assert merged_modules.keys() == modules_of(kept).keys()
    for name, (down, up) in modules_of(kept).items():
        merged_down, merged_up = merged_modules[name]
        torch.testing.assert_close(merged_up @ merged_down, scale * up @ down, rtol=1e-5, atol=1e-7)
    assert "--checkpoint picks a run's LoRA" in run_in_process("merge", "a", "b", "--out", str(merged),
                                                              "--checkpoint", "best").stderr

    # A run resumed from step 10's checkpoint (the last: none is made at the final step) scores step 15 again,
    # once, and keeps the same best LoRA.
    shutil.move(lora, run.root / "first.safetensors")  # as if killed after step 15's samples were scored
    run.write_status("failed", reason="interrupted", resumable=True)
    train(config, "r", resume=True)
    assert [r["step"] for r in read_metrics(run.sample_scores)] == [5, 10, 15]
    again = load_file(str(run.best_lora))
    for key in kept:
        torch.testing.assert_close(again[key], kept[key], rtol=0, atol=1e-6)


def test_a_run_without_scored_samples_has_no_best_checkpoint(tmp_path):
    run = Workspace(tmp_path / "work").run("plain")
    with pytest.raises(LookalikeError, match="run 'plain' has no best checkpoint: its samples were not scored"):
        run.lora_at("best")
    with pytest.raises(LookalikeError, match="--checkpoint: 'latest' is not best, final or a step number"):
        run.lora_at("latest")
    with pytest.raises(LookalikeError, match=r"--checkpoint: '\.\./\.\./x' is not best, final or a step number"):
        run.images_at("../../x")  # evaluate --checkpoint names a folder: never one outside the run's names
    assert run.lora_at("final") == run.lora and run.images_at("final") == run.images


def test_stop_rules_name_the_step_to_stop_at():
    plateau = StopRule(identity_plateau=2)
    steps = [record(1, 0.30, 0.2), record(2, 0.35, 0.2), record(3, 0.34, 0.2)]
    assert stop_reason(steps, plateau) is None, "one step without a gain is not yet two"
    assert stop_reason(steps + [record(4, 0.35, 0.2)], plateau) == \
        "identity similarity did not improve for 2 scored sample steps", "equal to the best is no gain"
    assert stop_reason(steps + [record(4, 0.36, 0.2)], plateau) is None
    faceless = [record(1, None, 0.2, faceless=4), record(2, None, 0.2, faceless=4)]
    assert stop_reason(faceless, plateau) is not None, "a run that never draws the face has nothing to gain"
    clip = StopRule(clip_below=0.9)
    assert stop_reason([record(1, 0.3, 0.30), record(2, 0.4, 0.28)], clip) is None
    assert stop_reason([record(1, 0.3, 0.30), record(2, 0.4, 0.26)], clip) == \
        "CLIP Score fell to 0.26, below 0.9 of its best 0.3"


def test_stop_when_needs_scored_samples(tiny_config):
    with pytest.raises(LookalikeError, match="stop_when judges the scored sample steps: it needs sample_every > 0"):
        load_config(tiny_config(train={"stop_when": {"identity_plateau": 2}}))


@pytest.mark.slow
def test_early_stopping_stops_where_the_rule_says_and_a_killed_run_resumes_to_the_same_stop(tiny_config):
    # The tiny model draws no face, so identity never improves: two scored steps (3 and 6) and it stops.
    path = tiny_config(train={"max_train_steps": 40, "learning_rate": 1e-2, "sample_every": 3, "sample_steps": 2,
                              "checkpoint_every": 3, "stop_when": {"identity_plateau": 2}})
    # Trains "straight" in this process and "killed" as a process killed after step 3's checkpoint, then resumed:
    # the same weights, every step up to the stop logged once.
    assert_a_killed_run_resumes_exactly(path, steps=6, killed_after="step-000003")
    workspace = Workspace(load_config(path).workspace)
    for name in ("straight", "killed"):
        status = workspace.run(name).read_status()
        assert status["state"] == "done" and status["stopped_at"] == 6, name
        assert status["stop_reason"] == "identity similarity did not improve for 2 scored sample steps"
        assert [r["step"] for r in read_metrics(workspace.run(name).sample_scores)] == [3, 6]


def test_the_sweep_table_shows_each_runs_best_step_with_its_scores(tmp_path):
    from rich.console import Console

    from lookalike.sweep.runner import Outcome, best_sample, summary_table
    from lookalike.workspace import StepLog

    run = Workspace(tmp_path / "work").run("r")
    run.root.mkdir(parents=True)
    log = StepLog(run.sample_scores, 0)
    for step, identity in ((250, 0.41), (500, 0.47)):
        log.write({"step": step, "identity_similarity": identity, "clip_score": 0.26})
    log.close()
    run.write_status("done", best_step=500)
    console = Console(record=True, width=200)
    console.print(summary_table([Outcome("r", "done", seconds=3.0, exit_code=0, best=best_sample(run)),
                                 Outcome("plain", "done", seconds=2.0, exit_code=0)]))
    lines = console.export_text().splitlines()
    assert any("│ 500 " in line and "0.47" in line and "0.26" in line for line in lines if "│ r " in line)
    assert best_sample(Workspace(tmp_path / "work").run("none")) is None


def test_scoring_that_cannot_start_says_how_to_train_without_it(tiny_config, tmp_path):
    from lookalike.train.sample_scores import SampleScores

    config = load_config(tiny_config(train={"sample_every": 5}, evaluate={"clip_model": str(tmp_path / "no-clip")}))
    with pytest.raises(LookalikeError, match=r"^scoring the training samples \(train.score_samples\): .*no-clip.*; "
                                             r"or set train.score_samples = false$"):
        SampleScores(config, Workspace(config.workspace).run("r"), 0)
