"""Export round trips: each format loads back through diffusers' own converters with the same weight changes.

diffusers' kohya/ComfyUI converter knows FLUX.1-dev's sizes (hidden 3072, MLP 12288), so the LoRA here has
those shapes, for one double and one single block (a state dict, no model is needed)."""

from __future__ import annotations

import pytest
import torch

from lookalike.errors import LookalikeError
from lookalike.models.export import export_lora
from lookalike.models.lora import save_lora

HIDDEN, RANK, ALPHA = 3072, 4, 8.0
ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
             "attn.add_v_proj", "attn.to_add_out"]


def flux_dev_lora(path):
    """Attention LoRA of double block 0 and single block 0 (q, k, v: no proj_mlp, so linear1 gets zero rows)."""
    from peft import LoraConfig

    generator = torch.Generator().manual_seed(0)
    modules = [f"transformer_blocks.0.{m}" for m in ATTENTION] + \
              [f"single_transformer_blocks.0.attn.to_{x}" for x in "qkv"]
    tensors = {}
    for module in modules:
        tensors[f"transformer.{module}.lora_A.weight"] = torch.randn(RANK, HIDDEN, generator=generator) * 0.1
        tensors[f"transformer.{module}.lora_B.weight"] = torch.randn(HIDDEN, RANK, generator=generator) * 0.1
    save_lora(path, tensors, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=modules),
              {"base_model": "flux-dev", "rank": RANK, "alpha": ALPHA})
    return tensors


def deltas(state_dict, scale):
    """module -> scale * B @ A."""
    names = {k.rsplit(".lora_", 1)[0] for k in state_dict if ".lora_A." in k}
    return {n: scale * state_dict[f"{n}.lora_B.weight"].float() @ state_dict[f"{n}.lora_A.weight"].float()
            for n in names}


@pytest.mark.parametrize("format", ["kohya", "comfyui", "diffusers"])
def test_export_round_trips_through_diffusers(tmp_path, format):
    from diffusers import FluxPipeline
    from safetensors import safe_open

    original = flux_dev_lora(tmp_path / "lora.safetensors")
    exported = export_lora(tmp_path / "lora.safetensors", tmp_path / f"{format}.safetensors", format)
    with safe_open(str(exported), framework="pt") as handle:
        keys = list(handle.keys())
        if format != "diffusers":
            alpha = handle.get_tensor(next(k for k in keys if k.endswith("img_attn_qkv.alpha")
                                           or k.endswith("img_attn.qkv.alpha")))
            # The file's scale alpha / rank is folded into its B matrices: alpha = rank, per fused part.
            assert alpha.ndim == 0 and alpha.item() == RANK * 3, "alpha stored as a tensor"
            # Attention only: linear1 holds q, k and v (rank 3 x 4), no rank for the MLP input it never adapted,
            # only zero rows for it in the up matrix (linear1 is 3 x hidden + 4 x hidden wide).
            linear1 = next(k for k in keys if "single_blocks" in k and "linear1" in k and k.endswith("down.weight"))
            assert handle.get_slice(linear1).get_shape() == [RANK * 3, HIDDEN]
            up = handle.get_tensor(linear1.replace("down", "up"))
            assert list(up.shape) == [HIDDEN * 7, RANK * 3] and not up[HIDDEN * 3:].any()
    expected_prefix = {"kohya": "lora_unet_double_blocks_0_", "comfyui": "diffusion_model.double_blocks.0.",
                       "diffusers": "transformer.transformer_blocks.0."}[format]
    assert any(k.startswith(expected_prefix) for k in keys), keys[:3]

    loaded = FluxPipeline.lora_state_dict(str(exported))
    loaded = loaded[0] if isinstance(loaded, tuple) else loaded
    # diffusers folds kohya's alpha / rank into the weights it returns; in its own layout alpha = rank.
    got = deltas(loaded, 1.0)
    want = deltas(original, ALPHA / RANK)
    for module, delta in want.items():
        torch.testing.assert_close(got[module], delta, rtol=1e-4, atol=1e-6)
    extra = set(got) - set(want)
    assert extra <= {"transformer.single_transformer_blocks.0.proj_mlp"}
    for module in extra:  # the part of linear1 the LoRA never adapted comes back as no change at all
        assert not loaded[f"{module}.lora_B.weight"].any()


def test_a_lora_file_applies_at_its_trained_strength_where_only_tensors_are_read(tmp_path):
    """ComfyUI and kohya's converters scale a layer by its `.alpha` tensor / rank, or by 1 without one; they never
    read peft's JSON metadata, where diffusers finds alpha. A file trained at alpha 8, rank 4 must not load there
    at half its strength."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    original = flux_dev_lora(tmp_path / "lora.safetensors")
    written = load_file(tmp_path / "lora.safetensors")
    assert not any(key.endswith(".alpha") for key in written)
    as_tools_read = deltas(written, 1.0)
    for module, delta in deltas(original, ALPHA / RANK).items():
        torch.testing.assert_close(as_tools_read[module], delta, rtol=1e-5, atol=1e-7)
    with safe_open(str(tmp_path / "lora.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_dim"] == metadata["ss_network_alpha"] == str(RANK)
    assert metadata["lookalike.rank"] == metadata["lookalike.alpha"] == str(RANK), "true of the layers written"
    assert metadata["modelspec.architecture"] == "flux-1-dev/lora" and metadata["ss_base_model_version"] == "flux1"
    assert metadata["ss_sd_model_name"] == "black-forest-labs/FLUX.1-dev", "the base, as kohya's files name it"


@pytest.mark.parametrize("format", ["kohya", "diffusers"])
def test_a_bf16_export_is_half_the_size_and_changes_the_weights_as_the_original(tmp_path, format):
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    original = flux_dev_lora(tmp_path / "lora.safetensors")
    full = export_lora(tmp_path / "lora.safetensors", tmp_path / "full.safetensors", format)
    half = export_lora(tmp_path / "lora.safetensors", tmp_path / "half.safetensors", format, dtype="bf16")
    assert {t.dtype for k, t in load_file(half).items() if not k.endswith(".alpha")} == {torch.bfloat16}
    assert half.stat().st_size < 0.55 * full.stat().st_size
    loaded = FluxPipeline.lora_state_dict(str(half))
    got = deltas({k: v.float() for k, v in (loaded[0] if isinstance(loaded, tuple) else loaded).items()}, 1.0)
    for module, delta in deltas(original, ALPHA / RANK).items():
        torch.testing.assert_close(got[module], delta, rtol=2e-2, atol=2e-3)


def test_export_refuses_an_unknown_format(tmp_path):
    flux_dev_lora(tmp_path / "lora.safetensors")
    with pytest.raises(LookalikeError, match="unknown format 'a1111'"):
        export_lora(tmp_path / "lora.safetensors", tmp_path / "x.safetensors", "a1111")
