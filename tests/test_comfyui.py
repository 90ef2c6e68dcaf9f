"""`export --format comfyui` computes in ComfyUI what diffusers computes: each family's tiny LoRA, exported, loaded
through a transcription of ComfyUI 0.38.1's own loader (tests/comfyui.py: its key maps, load_lora and the LoRA
weight adapter) into ComfyUI's layout of the model (its fused layers built from the diffusers model), every key
of the file matched, the change mapped back and compared with the stock pipeline's load_lora_weights + fuse_lora,
at strength 1 and 0.5."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lookalike.models.base import load_component, resolve_base
from lookalike.models.export import export_lora
from lookalike.models.families import folder_family
from lookalike.models.lora import add_lora, lora_state_dict, save_lora
from tests import comfyui

TINY = {"flux1": "tiny", "flux2": "tiny-flux2-klein", "flux2-dev": "tiny-flux2-dev", "z-image": "tiny-z-image",
        "qwen-image": "tiny-qwen-image", "qwen-image21": "tiny-qwen-image21", "krea2": "tiny-krea2", "sd3": "tiny-sd3",
        "sd1": "tiny-sd15", "sdxl": "tiny-sdxl"}
RANK, ALPHA = 4, 8.0  # a scale of 2: ComfyUI reads it from the file's alpha tensors, or none (scale folded in)
# Each family's preset that adapts the most layers (every other preset's are among them): Krea 2's `diffusers`, the
# authors' set with its input, output, text and timestep projections and text-fusion blocks; attention+mlp else.
WIDEST_PRESET = {"krea2": "diffusers"}


def sd3_with_a_dual_attention_block():
    """A tiny SD3.5 Medium kind of transformer (its first block has a second image attention, attn2) that ComfyUI's
    model detection can read: its width is 64 (depth 1), as ComfyUI's SD3 map assumes 64 a unit of depth."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=32,
                                 num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=64,
                                 pooled_projection_dim=32, out_channels=16, pos_embed_max_size=96,
                                 dual_attention_layers=(0,), qk_norm="rms_norm")


def a_base(family: str):
    """The family's tiny transformer as the test compares it, and a function giving it fresh."""
    if family == "sd3":
        return sd3_with_a_dual_attention_block
    return lambda: load_component(resolve_base(TINY[family]), folder_family(resolve_base(TINY[family])).denoiser)


def random_lora(transformer, path, base: str, seed: int = 0):
    """A LoRA of every layer the family's widest preset adapts, with random A and B."""
    add_lora(transformer, RANK, ALPHA, WIDEST_PRESET.get(folder_family(resolve_base(base)).name, "attention+mlp"))
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in transformer.named_parameters():
        if "lora_" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.05
    save_lora(path, lora_state_dict(transformer), transformer.peft_config["default"],
              {"base_model": base, "rank": RANK, "alpha": ALPHA})
    return path


def linear_weights(model) -> dict[str, torch.Tensor]:
    """Each linear layer's weight (a fused LoRA's base layer where peft wraps it), by its diffusers name."""
    weights = {}
    for name, module in model.named_modules():
        layer = getattr(module, "base_layer", module)
        if isinstance(layer, torch.nn.Linear) and ".lora_" not in name and not name.endswith(".base_layer"):
            weights[f"{name}.weight"] = layer.weight.detach().float().clone()
    return weights


def diffusers_fused(family: str, fresh, exported_diffusers, strength: float) -> dict[str, torch.Tensor]:
    """The weights after the stock pipeline's load_lora_weights and fuse_lora(lora_scale=strength) (SD3's
    64-wide transformer, which has no pipeline folder here: its load_lora_adapter and fuse_lora, which
    load_lora_weights calls)."""
    if family == "sd3":
        model = fresh()
        model.load_lora_adapter(str(exported_diffusers.parent), weight_name=exported_diffusers.name,
                                prefix="transformer")
    else:
        folder = resolve_base(TINY[family])
        pipe = folder_family(folder).pipeline_class().from_pretrained(folder)
        pipe.load_lora_weights(str(exported_diffusers.parent), weight_name=exported_diffusers.name)
        model = getattr(pipe, folder_family(folder).denoiser)
    model.fuse_lora(lora_scale=strength)
    return linear_weights(model)


def comfyui_change(family, config, original, lora_file, strength, key_map=None):
    """What ComfyUI's loader does to each diffusers layer: (change per layer, keys matched, keys left over)."""
    comfy, mapping = comfyui.comfyui_weights(family, config, original)
    key_map = key_map or comfyui.model_lora_keys_unet(family, config, comfy)
    patches, unloaded = comfyui.load_lora(load_file(lora_file), key_map)
    after = comfyui.back_to_diffusers(comfyui.patched(comfy, patches, strength), mapping)
    return {key: after[key] - original[key] for key in mapping}, patches, unloaded


def relative_error(ours: dict, reference: dict) -> float:
    largest = max(change.abs().max().item() for change in reference.values())
    return max((ours[key] - reference[key]).abs().max().item() for key in reference) / largest


@pytest.mark.parametrize("family", TINY)
def test_comfyui_applies_the_exported_lora_as_diffusers_does(tmp_path, family):
    fresh = a_base(family)
    transformer = fresh()
    config, original = transformer.config, linear_weights(transformer)
    source = random_lora(transformer, tmp_path / "lora.safetensors", TINY[family])
    for_comfyui = export_lora(source, tmp_path / "comfyui.safetensors", "comfyui")
    for_diffusers = export_lora(source, tmp_path / "diffusers.safetensors", "diffusers")
    file_keys = load_file(for_comfyui).keys()
    for strength in (1.0, 0.5):
        fused = diffusers_fused(family, fresh, for_diffusers, strength)
        reference = {key: fused[key] - original[key] for key in original}
        changed, patches, unloaded = comfyui_change(family, config, original, for_comfyui, strength)
        assert not unloaded, f"keys ComfyUI leaves unloaded: {sorted(unloaded)[:5]}"
        assert set(changed) >= {key for key, change in reference.items() if change.abs().max() > 0}, \
            "every layer diffusers changes is one ComfyUI's map places"
        reference = {key: reference[key] for key in changed}
        error = relative_error(changed, reference)
        print(f"{family} at strength {strength}: {len(file_keys)} keys in the file, all loaded, {len(patches)} "
              f"patches; largest change's relative error against diffusers {error:.1e}")
        assert error < 1e-5


def test_a_lora_moved_onto_another_slice_of_a_fused_layer_is_caught(tmp_path):
    """The comparison can fail: FLUX.2's double block's to_q LoRA placed on to_k's slice of img_attn.qkv (a key
    map that is wrong by one slice) changes other weights than diffusers does."""
    family = "flux2"
    fresh = a_base(family)
    transformer = fresh()
    config, original = transformer.config, linear_weights(transformer)
    source = random_lora(transformer, tmp_path / "lora.safetensors", TINY[family])
    exported = export_lora(source, tmp_path / "comfyui.safetensors", "comfyui")
    fused = diffusers_fused(family, fresh, export_lora(source, tmp_path / "d.safetensors", "diffusers"), 1.0)
    comfy, _ = comfyui.comfyui_weights(family, config, original)
    key_map = comfyui.model_lora_keys_unet(family, config, comfy)
    key_map["transformer.transformer_blocks.0.attn.to_q"] = key_map["transformer.transformer_blocks.0.attn.to_k"]
    changed, _, _ = comfyui_change(family, config, original, exported, 1.0, key_map)
    reference = {key: fused[key] - original[key] for key in changed}
    assert relative_error(changed, reference) > 0.1
