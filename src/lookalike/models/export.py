"""Export a LoRA for other tools: kohya's layout (sd-scripts, and what most shared FLUX.1 LoRAs use), ComfyUI's,
or diffusers' (the file as lookalike writes it, trimmed of our own header facts).

Where a family's tools name its layers as the original checkpoint does (FLUX.1: fused layers, see
Flux1.fused_layers), kohya's and ComfyUI's layouts use those names, with alpha per layer as a tensor:

    kohya:   lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight | .lora_up.weight | .alpha
    comfyui: diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight | .lora_up.weight | .alpha

Stable Diffusion 1.x and XL LoRAs take kohya's layout for both (what ComfyUI, A1111/Forge and civitai read):
lora_unet_<layer> with diffusers' layer names for SD 1.x, the original SGM UNet's for SDXL
(lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q), as kohya's sd-scripts writes them. A LoRA of the
text encoders too (train.train_text_encoder) adds, in kohya's and ComfyUI's layouts, lora_te_<layer> (SDXL:
lora_te1_ and lora_te2_; FLUX.1's CLIP: lora_te1_) with the text model's layer names
(lora_te_text_model_encoder_layers_0_self_attn_q_proj).

For the other families ComfyUI reads diffusers' own layer names (its key maps take `transformer.<layer>` for
FLUX.2, Z-Image, Qwen-Image and 2.1, Krea 2 and SD3, and place each in its part of a layer ComfyUI fuses), so their
ComfyUI layout is diffusers', and kohya has none. ComfyUI 0.38.1 reads every family's file (tests/comfyui.py
transcribes its loader; Krea 2 and Qwen-Image 2.1 need a ComfyUI with their models, which 0.38.1 has).

A LoKr (train.adapter = 'lokr') keeps each layer apart, so its ComfyUI layout is diffusers' for every transformer
(ComfyUI maps FLUX.1's diffusers names onto the parts of its fused layers), and kohya's only for the SD UNets
(lora_unet_<layer>.lokr_w1 | .lokr_w2_a | .lokr_w2_b, as kohya's LyCORIS writes them), with no alpha tensors: the
file's scale is 1.
"""

from __future__ import annotations

from pathlib import Path

from lookalike.errors import LookalikeError
from lookalike.models.families import base_family
from lookalike.models.lora import (
    LOKR,
    adapter_config,
    check_finite,
    file_metadata,
    is_lokr,
    modules_of,
    read_lora,
    save_lora,
    text_encoder_configs,
    text_encoders_of,
    text_layer_in_file,
)
from lookalike.workspace import atomic_path

FORMATS = ("kohya", "comfyui", "diffusers")
DTYPES = ("fp32", "bf16")


def export_lora(source: Path, out: Path, format: str, dtype: str = "fp32") -> Path:
    """Write `source` in `format`; `dtype` bf16 halves the file (the weights rounded once, as most shared LoRAs
    are)."""
    import torch
    from safetensors.torch import save_file

    if format not in FORMATS:
        raise LookalikeError(f"--format: unknown format {format!r} (use {', '.join(FORMATS)})")
    if dtype not in DTYPES:
        raise LookalikeError(f"--dtype: unknown dtype {dtype!r} (use {', '.join(DTYPES)})")
    tensors, config, info = read_lora(source, lokr=True)
    cast = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    family = base_family(info.get("base_model") or "")  # a file that names no base: as FLUX.1
    if is_lokr(tensors):
        return _export_lokr(source, out, format, tensors, config, info, family, cast)
    fused = None if format == "diffusers" else family.fused_layers(modules_of(tensors), config["lora_alpha"])
    if fused is None and format == "kohya":
        raise LookalikeError(f"--format kohya: kohya's layout exists for FLUX.1, SDXL and SD 1.x LoRAs only; {source} "
                             f"is for {info['base_model']}: export it with --format comfyui or diffusers")
    if fused is None:  # diffusers' layout, which ComfyUI reads for this family too
        save_lora(out, tensors, adapter_config(config), base_model_of(info), dtype=cast,
                  text_encoder_configs=text_encoder_configs(tensors, config["r"], config["lora_alpha"]))
        return out
    kohya = format == "kohya" or family.comfyui_reads_kohya
    prefix, dotted = ("lora_unet_", False) if kohya else ("diffusion_model.", True)
    layers = {prefix + (layer if dotted else layer.replace(".", "_")): value for layer, value in fused.items()}
    for encoder in text_encoders_of(tensors):
        if encoder not in family.trainable_text_encoders:
            raise LookalikeError(f"--format {format}: {source} holds a LoRA of the {encoder}, which has no name in "
                                 f"that layout for {info.get('base_model')}: export it with --format diffusers")
        layers.update({f"{family.trainable_text_encoders[encoder]}_{text_layer_in_file(name).replace('.', '_')}":
                       (down.float(), up.float(), config["lora_alpha"])
                       for name, (down, up) in modules_of(tensors, encoder).items()})
    result = {}
    for name, (down, up, alpha) in layers.items():
        result[f"{name}.lora_down.weight"] = down.to(cast).contiguous()
        result[f"{name}.lora_up.weight"] = up.to(cast).contiguous()
        result[f"{name}.alpha"] = torch.tensor(float(alpha))
    # Every layer's scale, its alpha tensor over its own rank, is the source's alpha / rank.
    metadata = {"format": "pt", **file_metadata(config["r"], info), "ss_network_alpha": f"{config['lora_alpha']:g}"}
    check_finite(result, out)
    with atomic_path(out) as tmp:
        save_file(result, str(tmp), metadata=metadata)
    return out


def base_model_of(info: dict[str, str]) -> dict[str, str]:
    """Of a file's own facts, those an export keeps: the base it is for."""
    return {k: v for k, v in info.items() if k in ("base_model",)}


def _export_lokr(source: Path, out: Path, format: str, tensors: dict, config: dict, info: dict, family, cast) -> Path:
    """A LoKr (its scale folded in, as lookalike writes it) in `format`. ComfyUI reads diffusers' layer names for
    the transformers (FLUX.1's too, onto the parts of its fused layers) and kohya's for the SD UNets, as LyCORIS
    writes them there (lora_unet_<layer>.lokr_w1); kohya's FLUX.1 layout fuses q, k and v into one layer, whose
    change no one Kronecker product of the separate ones can be."""
    from safetensors.torch import save_file

    names = family.kohya_layer_names({key.rsplit(LOKR, 1)[0].split(".", 1)[1] for key in tensors})
    if format == "kohya" and names is None:
        raise LookalikeError(f"--format kohya: {source} is a LoKr, and kohya's layout exists for LoKrs of SDXL and SD "
                             f"1.x only (FLUX.1's fuses layers a LoKr cannot be split across); {source} is for "
                             f"{info.get('base_model')}: export it with --format comfyui or diffusers")
    if format == "diffusers" or names is None:  # diffusers' layout, which ComfyUI reads for these transformers
        save_lora(out, tensors, adapter_config(config), base_model_of(info), dtype=cast)
        return out
    result = {}
    for key, value in tensors.items():
        module, part = key.rsplit(LOKR, 1)
        layer = names[module.split(".", 1)[1]].replace(".", "_")
        result[f"lora_unet_{layer}{LOKR}{part}"] = value.to(cast).contiguous()
    metadata = {"format": "pt", **file_metadata(config["r"], info, adapter_config(config))}
    check_finite(result, out)
    with atomic_path(out) as tmp:
        save_file(result, str(tmp), metadata=metadata)
    return out
