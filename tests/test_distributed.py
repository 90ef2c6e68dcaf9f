"""Data-parallel training on the CPU: 2 processes under torchrun with gloo, as `train --processes 2` runs them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lookalike.config import load_config
from lookalike.train.trainer import train
from lookalike.workspace import Workspace, read_metrics
from tests.conftest import run_cli

pytestmark = pytest.mark.slow  # trains, serves or starts lookalike processes: `make test` only


def single_process_weights(config_file, tmp_path) -> dict:
    """The LoRA of one process training the global batch of 2, in this process."""
    config = load_config(config_file, ["train.batch_size=2", "train.shard=false", "train.sample_every=0"])
    return load_file(str(train(config, "one")))


def assert_same_weights(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol)


def test_two_processes_train_as_one_process_with_the_same_global_batch_and_resume_exactly(tiny_config, tmp_path):
    config = tiny_config(train={"max_train_steps": 6, "checkpoint_every": 3, "learning_rate": 1e-2})
    first = assert_a_two_process_run_resumes_exactly(str(config), tmp_path)
    assert "2 processes x batch 1 x accumulation 1 = effective batch 2" in first

    run = Workspace(tmp_path / "work").run("r")
    status = run.read_status()
    assert status["processes"] == 2 and status["rank_weight_spread"] == 0.0, "both ranks end identical"
    assert status["sharded"] is False
    single = single_process_weights(config, tmp_path)
    assert_same_weights(load_file(str(run.lora)), single, rtol=1e-4, atol=1e-5)
    assert any(single[k].abs().max() > 1e-3 for k in single if "lora_B" in k), "the LoRA has learned something"


def test_two_processes_train_the_text_encoders_as_one_process(tiny_config, tmp_path):
    """train_text_encoder: each process encodes its own rows, and the text encoders' LoRA gradients are averaged
    across them as the UNet's are."""
    config = tiny_config(model={"base": "tiny-sd15"}, train={"max_train_steps": 6, "checkpoint_every": 3,
                                                             "learning_rate": 1e-2, "train_text_encoder": True})
    assert_a_two_process_run_resumes_exactly(str(config), tmp_path)
    run = Workspace(tmp_path / "work").run("r")
    assert run.read_status()["rank_weight_spread"] == 0.0, "both ranks end identical, text encoders included"
    two, single = load_file(str(run.lora)), single_process_weights(config, tmp_path)
    assert any(key.startswith("text_encoder.") for key in two)
    assert_same_weights(two, single, rtol=1e-4, atol=1e-5)


def test_two_processes_preserve_the_class_output_as_one_process(tiny_config, tmp_path):
    """train.output_preservation: each process runs its rows' preserved captions in the same forward as its
    training rows, so the data-parallel wrapper sees one forward per step."""
    config = tiny_config(train={"max_train_steps": 4, "learning_rate": 1e-2, "output_preservation": 1.0})
    result = run_cli("train", str(config), "--run", "r", "--processes", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    two = load_file(str(Workspace(tmp_path / "work").run("r").lora))
    assert_same_weights(two, single_process_weights(config, tmp_path), rtol=1e-4, atol=1e-5)


def assert_a_two_process_run_resumes_exactly(config: str, tmp_path) -> str:
    """A 2-process run (batch 1 each), set back to after its step-3 checkpoint once finished and resumed, ends
    with the same LoRA, every step logged once by the main process. Returns the first run's output."""
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
    assert_same_weights(load_file(str(run.lora)), uninterrupted, rtol=0, atol=1e-6)
    return first.stdout


def test_sharded_processes_train_as_one_process_draw_samples_and_resume_exactly(tiny_config, tmp_path):
    """FSDP2: each process holds half of the model, LoRA and AdamW state; the result is data-parallel
    training's, samples are drawn by both processes and written by one, and a resume is exact."""
    config = tiny_config(train={"max_train_steps": 6, "checkpoint_every": 3, "learning_rate": 1e-2,
                                "shard": True, "sample_every": 3, "batch_size": 1})
    assert_a_two_process_run_resumes_exactly(str(config), tmp_path)
    run = Workspace(tmp_path / "work").run("r")
    status = run.read_status()
    assert status["processes"] == 2 and status["sharded"] is True
    assert sorted(p.name for p in run.samples.iterdir()) == ["step-000003_p0.png", "step-000006_p0.png"]
    assert [r["step"] for r in read_metrics(run.sample_scores)] == [3, 6], "the main process scores them"
    assert_same_weights(load_file(str(run.lora)), single_process_weights(config, tmp_path), rtol=1e-4, atol=1e-5)
