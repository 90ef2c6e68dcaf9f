"""Data-parallel training on the CPU: 2 processes under torchrun with gloo, as `train --processes 2` runs them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lookalike.workspace import Workspace
from tests.conftest import run_cli

pytestmark = pytest.mark.slow  # trains, serves or starts lookalike processes: `make test` only


@pytest.mark.parametrize("shard", [False, True])
def test_two_processes_train_as_one_process_with_the_same_global_batch(tiny_config, tmp_path, shard):
    """Data-parallel, and sharded (FSDP2: each process holds half of the model, LoRA and AdamW state)."""
    config = str(tiny_config(train={"max_train_steps": 6, "learning_rate": 1e-2, "shard": shard, "sample_every": 3}))
    two = run_cli("train", config, "--run", "two", "--processes", "2", "--set", "train.batch_size=1")
    assert two.returncode == 0, two.stdout + two.stderr
    assert "2 processes x batch 1 x accumulation 1 = effective batch 2" in two.stdout
    assert ("sharded: each process holds 1/2 of the model" in " ".join(two.stdout.split())) is shard
    one = run_cli("train", config, "--run", "one", "--set", "train.batch_size=2", "--set", "train.shard=false")
    assert one.returncode == 0, one.stderr

    workspace = Workspace(tmp_path / "work")
    status = workspace.run("two").read_status()
    assert status["processes"] == 2 and status["rank_weight_spread"] == 0.0, "both ranks end identical"
    assert status["sharded"] is shard
    assert sorted(p.name for p in workspace.run("two").samples.iterdir()) == ["step-000003_p0.png",
                                                                               "step-000006_p0.png"]
    assert len(workspace.run("two").metrics.read_text().splitlines()) == 6, "the main rank alone logs"
    parallel, single = load_file(str(workspace.run("two").lora)), load_file(str(workspace.run("one").lora))
    assert parallel.keys() == single.keys()
    for key in single:
        torch.testing.assert_close(parallel[key], single[key], rtol=1e-4, atol=1e-5)
    assert any(single[k].abs().max() > 1e-3 for k in single if "lora_B" in k), "the LoRA has learned something"


@pytest.mark.parametrize("shard", [False, True])
def test_two_processes_resume_from_a_checkpoint_to_the_same_weights(tiny_config, tmp_path, shard):
    config = str(tiny_config(train={"max_train_steps": 6, "checkpoint_every": 3, "learning_rate": 1e-2,
                                    "shard": shard}))
    first = run_cli("train", config, "--run", "r", "--processes", "2")
    assert first.returncode == 0, first.stdout + first.stderr
    run = Workspace(tmp_path / "work").run("r")
    uninterrupted = load_file(str(run.lora))
    shutil.move(run.lora, tmp_path / "first.safetensors")  # as if the run had stopped after step 3's checkpoint
    run.write_status("failed", reason="interrupted", resumable=True)

    resumed = run_cli("train", config, "--run", "r", "--processes", "2", "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming 'r' from step 3" in resumed.stdout
    steps = [json.loads(line)["step"] for line in run.metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    again = load_file(str(run.lora))
    for key in uninterrupted:
        torch.testing.assert_close(again[key], uninterrupted[key], rtol=0, atol=1e-6)
