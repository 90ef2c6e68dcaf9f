"""The attention kernels training runs on (train/attention.py): the exact ones that run, fastest first, measured at
the run's shape; a kernel that cannot run or is not exact is left out and said why; a run keeps its order."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend

from lookalike.config import load_config
from lookalike.train import attention
from lookalike.train.checkpoint import list_checkpoints, load_checkpoint
from lookalike.train.trainer import train


def test_the_exact_kernels_that_run_come_fastest_first_and_math_last():
    order, found = attention.fastest_exact(2, 16, 64, torch.device("cpu"), torch.float32)
    assert order == [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH], found  # the CPU has no memory-efficient kernel
    assert found["FLASH_ATTENTION"].endswith(" ms")
    assert found["EFFICIENT_ATTENTION"].startswith("cannot run here")


def test_a_kernel_off_by_more_than_rounding_is_left_out(monkeypatch):
    real = attention.attend

    def off_by_a_little(backend, q, k, v):  # as an approximate kernel would be
        out = real(backend, q, k, v)
        return out + 1e-3 if backend == SDPBackend.FLASH_ATTENTION else out

    monkeypatch.setattr(attention, "attend", off_by_a_little)
    order, found = attention.fastest_exact(2, 16, 64, torch.device("cpu"), torch.float32)
    assert order == [SDPBackend.MATH]
    assert found["FLASH_ATTENTION"].startswith("not exact (1.00e-03 off")


@pytest.mark.slow
def test_a_checkpoint_keeps_the_runs_attention_order(tiny_config):
    config = load_config(tiny_config(train={"max_train_steps": 2, "checkpoint_every": 1}))
    train(config, "kept")
    _, state = load_checkpoint(list_checkpoints(config.workspace / "runs" / "kept" / "checkpoints")[-1])
    assert state["attention"] == [backend.name for backend in attention.TRAINING_ATTENTION]  # the CPU's order
    # As a resumed run reads it back (Training.choose_attention).
    assert [getattr(SDPBackend, name) for name in state["attention"]] == attention.TRAINING_ATTENTION
