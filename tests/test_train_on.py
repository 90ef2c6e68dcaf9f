"""Training a finished run on to more steps (`train --resume` with a larger max_train_steps): what it ends with is
what a run of that length from the start gives, its shorter LoRA stays, and a run whose schedule depends on the
step count, a shorter one or one that stopped early is refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lookalike.config import load_config
from lookalike.errors import LookalikeError
from lookalike.train.trainer import train
from lookalike.workspace import Workspace
from tests.conftest import run_in_process

SETTINGS = {"max_train_steps": 4, "lr_scheduler": "constant", "lr_warmup_steps": 2, "learning_rate": 1e-3,
            "checkpoint_every": 2, "checkpoints_keep": 2, "batch_size": 2, "caption_dropout": 0.3,
            "sample_every": 3, "sample_steps": 2}


@pytest.mark.slow
def test_a_run_trained_on_ends_as_a_run_of_that_length_and_keeps_its_shorter_lora(tiny_config):
    path = tiny_config(train=SETTINGS)
    config = load_config(path)
    shorter = load_file(train(config, "on"))
    longer = config.with_train({"max_train_steps": 7}, "test")
    said = run_in_process("train", str(path), "--run", "on", "--set", "train.max_train_steps=7")
    assert "add --resume to train it on to 7 steps" in " ".join(said.stdout.split()), "without --resume: said how"

    result = run_in_process("train", str(path), "--run", "on", "--resume", "--set", "train.max_train_steps=7")
    assert result.returncode == 0, result.stderr
    said = " ".join(result.stdout.split())
    assert "run 'on' now trains for 7 steps instead of 4; its 4-step LoRA stays as lora-step-000004.safetensors" \
        in said

    straight = load_file(train(longer, "straight"))
    runs = Workspace(config.workspace)
    on = load_file(runs.run("on").lora)
    assert on.keys() == straight.keys() and on
    for key in on:
        torch.testing.assert_close(on[key], straight[key], rtol=0, atol=1e-6)
    kept = load_file(runs.run("on").lora_at("4"))
    assert all(torch.equal(kept[key], shorter[key]) for key in shorter), "the 4-step LoRA, unchanged"
    logged = [json.loads(line)["step"] for line in runs.run("on").metrics.read_text().splitlines()]
    assert logged == list(range(1, 8))
    assert runs.run("on").read_status()["state"] == "done"
    assert train(longer, "on") == runs.run("on").lora, "done at 7 steps: not stale, not retrained"


@pytest.mark.slow
def test_a_schedule_that_depends_on_the_step_count_a_shorter_run_or_an_early_stop_is_refused(tiny_config):
    config = load_config(tiny_config(train={**SETTINGS, "max_train_steps": 2, "lr_warmup_steps": 0, "sample_every": 0}))
    train(config, "cosine")
    run = Workspace(config.workspace).run("cosine")
    saved = json.loads(run.config.read_text())
    saved["train"]["lr_scheduler"] = "cosine"  # as if trained with it
    run.config.write_text(json.dumps(saved))
    cosine = config.with_train({"lr_scheduler": "cosine", "max_train_steps": 4}, "test")
    with pytest.raises(LookalikeError, match="cannot train run 'cosine' on to 4 steps: its lr_scheduler 'cosine' sets "
                                             r"each step's rate from max_train_steps \(2\)"):
        train(cosine, "cosine", resume=True)
    with pytest.raises(LookalikeError, match="cannot resume run 'cosine' at train.max_train_steps = 1: it trains "
                                             "for 2"):
        train(config.with_train({"lr_scheduler": "cosine", "max_train_steps": 1}, "test"), "cosine", resume=True)

    saved["train"]["lr_scheduler"] = "constant"
    run.config.write_text(json.dumps(saved))
    run.write_status("done", stopped_at=1, stop_reason="identity similarity did not improve")
    with pytest.raises(LookalikeError, match="train.stop_when stopped it at step 1"):
        train(config.with_train({"max_train_steps": 4}, "test"), "cosine", resume=True)


@pytest.mark.slow
def test_a_sweep_trains_a_finished_run_on_when_the_study_asks_for_more_steps(tiny_config):
    """And a run whose schedule depends on the step count stays as it is, named stale."""
    from lookalike import display
    from lookalike.sweep.plan import Planned
    from lookalike.sweep.runner import Sweep

    path = tiny_config(train={**SETTINGS, "max_train_steps": 2, "lr_warmup_steps": 0, "sample_every": 0})
    config = load_config(path)
    train(config, "constant")
    train(config.with_train({"lr_scheduler": "cosine"}, "test"), "cosine")
    longer = config.with_train({"max_train_steps": 4}, "test")
    sweep = Sweep(longer, path, [], display.console(quiet=True))
    run, left = sweep.todo([Planned("constant", {}), Planned("cosine", {"lr_scheduler": "cosine"})],
                           retry_failed=False)
    assert [e.name for e in run] == ["constant"]
    [stale] = left
    assert stale.name == "cosine"
    assert stale.reason.startswith("done earlier, trained on other settings (train.max_train_steps)")
