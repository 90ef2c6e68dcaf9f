"""Exact LoRA merging on the tiny model, checked with diffusers' own loading and fusing."""

from __future__ import annotations

import pytest
import torch

from lookalike.errors import LookalikeError
from lookalike.models.lora import save_lora
from lookalike.models.merge import merge_loras
from tests.helpers import fused_weights, random_lora


def test_merged_file_changes_the_weights_by_exactly_a_delta_a_plus_b_delta_b(tmp_path):
    first = random_lora(tmp_path / "a.safetensors", rank=4, alpha=8, target="attention", seed=1)
    second = random_lora(tmp_path / "b.safetensors", rank=2, alpha=1, target="attention+mlp", seed=2)
    merged = merge_loras(first, second, tmp_path / "merged.safetensors", weights=(0.7, 1.3))

    base, with_a, with_b, with_merged = (fused_weights(f) for f in (None, first, second, merged))
    changed = 0
    for key, weight in base.items():
        expected = 0.7 * (with_a[key] - weight) + 1.3 * (with_b[key] - weight)
        torch.testing.assert_close(with_merged[key] - weight, expected, rtol=1e-4, atol=1e-6)
        changed += bool(expected.abs().max() > 0)
    assert changed >= 10, "the LoRAs change attention and MLP weights"


def test_merging_loras_of_different_bases_or_shapes_is_refused(tmp_path):
    first = random_lora(tmp_path / "a.safetensors", rank=2, alpha=2, target="attention", seed=1)
    other_base = random_lora(tmp_path / "b.safetensors", rank=2, alpha=2, target="attention", seed=2,
                             base="flux-dev")
    with pytest.raises(LookalikeError, match="different base models: .*a.safetensors is for tiny"):
        merge_loras(first, other_base, tmp_path / "m.safetensors")

    from safetensors.torch import load_file, save_file

    tensors = load_file(str(first))
    key = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"
    tensors[key] = torch.zeros(2, tensors[key].shape[1] * 2)
    save_file(tensors, str(tmp_path / "wide.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LookalikeError, match=r"module transformer_blocks.0.attn.to_q is \d+ -> \d+ in"):
        merge_loras(first, tmp_path / "wide.safetensors", tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.slow
def test_weighted_adapters_at_load_time_draw_what_the_merged_file_draws(tiny_config, tmp_path):
    import numpy as np
    from PIL import Image

    from lookalike.config import load_config
    from lookalike.generate import generate

    first = random_lora(tmp_path / "a.safetensors", rank=4, alpha=4, target="attention", seed=1, std=0.4)
    second = random_lora(tmp_path / "b.safetensors", rank=2, alpha=2, target="attention", seed=2, std=0.4)
    merged = merge_loras(first, second, tmp_path / "merged.safetensors", weights=(1.0, 0.5))
    config = load_config(tiny_config(generate={"num_inference_steps": 2}))
    weighted = generate(config, loras=[first, second], weights=[1.0, 0.5])
    from_merged = generate(config, loras=[merged])
    alone = generate(config, loras=[first])
    pixels = [np.asarray(Image.open(folder / "p00_s0_g5.png"), dtype=int) for folder in (weighted, from_merged, alone)]
    assert np.abs(pixels[0] - pixels[1]).max() <= 1
    assert np.abs(pixels[0] - pixels[2]).max() > 10, "the second LoRA's weight shows"


def test_a_merged_lora_names_each_trigger_word_once(tmp_path):
    from peft import LoraConfig

    from lookalike.models.lora import read_lora

    def person(name, token):
        path = random_lora(tmp_path / name, rank=2, alpha=2, target="attention", seed=len(name))
        tensors, _, info = read_lora(path)
        save_lora(path, tensors, LoraConfig(r=2, lora_alpha=2), {**info, "trigger_word": token})
        return path

    same = merge_loras(person("a.safetensors", "sks"), person("bb.safetensors", "sks"), tmp_path / "m.safetensors")
    assert read_lora(same)[2]["trigger_word"] == "sks"
    pair = merge_loras(person("c.safetensors", "sks"), person("dd.safetensors", "ohwx"), tmp_path / "n.safetensors")
    assert read_lora(pair)[2]["trigger_word"] == "sks ohwx"
