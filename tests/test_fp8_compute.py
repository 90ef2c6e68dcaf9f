"""train.fp8_compute (train/fp8.py): the base's linear layers compute in float8 through torchao, as diffusers'
scripts' --do_fp8_training converts them; on the CPU, PyTorch's own float8 matmul runs the same code path."""

from __future__ import annotations

import json

import pytest
import torch

from lookalike.config import load_config
from lookalike.errors import LookalikeError
from lookalike.models.base import load_component, resolve_base
from lookalike.train.fp8 import convert_to_fp8_compute, fp8_problem
from lookalike.train.trainer import train
from tests.helpers import assert_a_killed_run_resumes_exactly

FP8 = {"mixed_precision": "bf16", "fp8_compute": True}


def losses(run_folder) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_folder / "metrics.jsonl").read_text().splitlines()]


def test_the_scripts_layers_compute_in_float8():
    """Every linear layer but proj_out, as train_dreambooth_lora_flux2.py's module_filter_fn chooses (its sides
    multiples of 16: all of the tiny FLUX.1's are)."""
    from torchao.float8.float8_linear import Float8Linear

    denoiser = load_component(resolve_base("tiny"), "transformer", torch.bfloat16)
    linear = {name for name, module in denoiser.named_modules() if isinstance(module, torch.nn.Linear)}
    assert convert_to_fp8_compute(denoiser) == len(linear) - 1
    converted = {name for name, module in denoiser.named_modules() if isinstance(module, Float8Linear)}
    assert converted == linear - {"proj_out"}


@pytest.mark.slow
def test_an_fp8_run_trains_near_its_bf16_twin_and_resumes_exactly(tiny_config):
    settings = {"max_train_steps": 8, "learning_rate": 1e-3, "checkpoint_every": 0}
    bf16 = load_config(tiny_config(train={**settings, "mixed_precision": "bf16"}))
    fp8 = load_config(tiny_config("fp8.toml", train={**settings, **FP8}))
    train(bf16, "bf16")
    train(fp8, "fp8")
    runs = bf16.workspace / "runs"
    reference, mine = losses(runs / "bf16"), losses(runs / "fp8")
    # Same batches, noise and timesteps (one seed); the LoRA starts at zero, so step 1 differs by the float8 base
    # alone. Measured on the tiny FLUX.1: at most 0.29 % apart over the 8 steps.
    relative = [abs(a - b) / b for a, b in zip(mine, reference)]
    print("fp8 vs bf16 loss, relative difference per step:", [f"{r:.2e}" for r in relative])
    assert len(relative) == 8 and max(relative) < 0.01, relative
    assert mine != reference, "the float8 layers changed nothing: were they converted?"

    path = tiny_config("resume.toml", train={"max_train_steps": 30, "checkpoint_every": 10, "learning_rate": 1e-3,
                                             **FP8})
    assert_a_killed_run_resumes_exactly(path, steps=30, killed_after="step-000010")


@pytest.mark.parametrize("setting, named", [({"base_quantization": "int8"}, "base_quantization = 'int8'"),
                                            ({"offload": True}, "offload = true"),
                                            ({"mixed_precision": "no"}, "mixed_precision = 'no'"),
                                            ({"mixed_precision": "fp16"}, "mixed_precision = 'fp16'")])
def test_fp8_compute_is_refused_beside_settings_it_cannot_train_with(tiny_config, setting, named):
    with pytest.raises(LookalikeError, match=rf"train: fp8_compute = true cannot be combined with {named}"):
        load_config(tiny_config(train={"fp8_compute": True, **setting}))


def test_fp8_compute_names_the_gpu_the_precision_or_the_library_it_lacks(monkeypatch):
    assert fp8_problem("bf16", None) is None and fp8_problem("bf16", (9, 0)) is None
    assert "this GPU's is 8.0" in fp8_problem("bf16", (8, 0))  # an A100: no float8 tensor cores
    assert "set train.mixed_precision = 'bf16'" in fp8_problem("no", None)  # 'auto' on the CPU
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    assert fp8_problem("bf16", (9, 0)) == "train.fp8_compute = true needs torchao: pip install torchao"


@pytest.mark.slow
def test_a_base_without_a_layer_float8_can_multiply_is_refused_by_name(tiny_config, monkeypatch):
    from lookalike.train import fp8

    monkeypatch.setattr(fp8, "computes_in_fp8", lambda name, module: False)  # as a base of odd widths would be
    with pytest.raises(LookalikeError, match=r"train.fp8_compute = true: no linear layer of tiny's transformer has "
                                             r"sides that are multiples of 16"):
        train(load_config(tiny_config(train={"max_train_steps": 1, **FP8})), "odd")
