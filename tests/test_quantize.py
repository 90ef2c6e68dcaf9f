"""The frozen base quantised (train.base_quantization): int8 and fp8 through torchao work on the CPU and train a
LoRA close to the full-precision one; nf4 is refused here with what would work instead."""

import pytest
import torch
from safetensors.torch import load_file

from lookalike.config import load_config
from lookalike.errors import LookalikeError
from lookalike.models.base import load_component, resolve_base
from lookalike.models.quantize import check_quantization
from lookalike.train.memory import estimate
from lookalike.train.trainer import train

pytestmark = pytest.mark.slow  # trains, serves or starts lookalike processes: `make test` only


@pytest.mark.parametrize("kind, tensor", [("int8", "Int8Tensor"), ("fp8", "Float8Tensor")])
def test_quantised_base_stores_linear_weights_in_8_bits(kind, tensor):
    full = load_component(resolve_base("tiny"), "transformer", torch.float32)
    quantised = load_component(resolve_base("tiny"), "transformer", torch.float32, quantization=kind)
    layer = quantised.transformer_blocks[0].attn.to_q
    assert type(layer.weight).__name__ == tensor
    # Weight-only: the layer's output stays close to the full-precision layer's.
    x = torch.randn(4, layer.in_features)
    expected = full.transformer_blocks[0].attn.to_q(x)
    assert torch.allclose(layer(x), expected, atol=0.05 * expected.abs().max().item())


def test_lora_trained_on_an_int8_base_is_close_to_the_full_precision_one(tiny_config):
    settings = {"max_train_steps": 4, "learning_rate": 1e-2, "sample_every": 0, "checkpoint_every": 0}
    full = load_file(train(load_config(tiny_config(train=settings)), "full"))
    int8 = load_file(train(load_config(tiny_config(train=dict(settings, base_quantization="int8"))), "int8"))
    assert full.keys() == int8.keys()
    moved = [name for name in full if "lora_B" in name]
    a = torch.cat([full[name].flatten() for name in moved])
    b = torch.cat([int8[name].flatten() for name in moved])
    assert a.abs().max() > 0 and not torch.equal(a, b), "the LoRA trained, on weights that differ"
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.95


def test_nf4_is_refused_without_cuda_naming_what_works():
    if torch.cuda.is_available():
        pytest.skip("this machine can run nf4")
    with pytest.raises(LookalikeError, match=r"train.base_quantization = 'nf4' needs .*(bitsandbytes|CUDA GPU)"):
        check_quantization("nf4")


def test_missing_torchao_is_named_with_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(LookalikeError, match=r"train.base_quantization = 'fp8' needs torchao: pip install"):
        check_quantization("fp8")


def test_quantised_bases_are_estimated_at_their_packed_size(tiny_config):
    def weights(kind: str) -> float:
        config = load_config(tiny_config(model={"base": "flux-dev"}, data={"resolution": 1024},
                                         train={"base_quantization": kind}))
        return estimate(config, "bf16").weights

    bf16, int8, nf4 = weights("none"), weights("int8"), weights("nf4")
    assert 22 < bf16 < 23, "FLUX.1-dev's 11.9 B parameters in bf16"
    assert int8 == pytest.approx(bf16 / 2, rel=0.02) and nf4 == pytest.approx(bf16 * 0.28, rel=0.03)


def test_compiling_is_refused_on_a_torchao_base_naming_both_keys(tiny_config):
    with pytest.raises(LookalikeError, match=r"train: compile = true cannot train on base_quantization = 'fp8'"):
        load_config(tiny_config(train={"compile": True, "base_quantization": "fp8"}))
