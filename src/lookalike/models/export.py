"""Export a LoRA for other tools: kohya's layout (sd-scripts, and what most shared FLUX LoRAs use), ComfyUI's
own layout, or diffusers' (the file as lookalike writes it, trimmed of our own header facts).

kohya and ComfyUI name FLUX's layers as Black Forest Labs' checkpoint does, where a double block's q, k and v
are one fused `qkv` layer and a single block's q, k, v and MLP input are one `linear1`. A LoRA of the
separate layers becomes one LoRA of the fused layer exactly: the down matrices are stacked and the up matrices
placed block-diagonally, so each part still only changes its own rows. A part the LoRA does not adapt (a
single block's MLP input, in an attention-only LoRA) adds no rank: its rows of the up matrix are zero, and
nothing else of it is written. Alpha is stored per layer as a tensor (`<layer>.alpha`).

    kohya:   lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight | .lora_up.weight | .alpha
    comfyui: diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight | .lora_up.weight | .alpha
"""

from __future__ import annotations

import re
from pathlib import Path

from lookalike.errors import LookalikeError
from lookalike.models.families import base_family
from lookalike.models.lora import file_metadata, modules_of, read_lora, save_lora
from lookalike.workspace import atomic_path

FORMATS = ("kohya", "comfyui", "diffusers")
MLP_RATIO = 4  # FLUX's MLP width over its hidden size: a single block's linear1 is 3 hidden + 4 hidden wide

# Black Forest Labs layer -> the diffusers layers it fuses, per block kind.
DOUBLE = {"img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"], "img_attn.proj": ["attn.to_out.0"],
          "img_mlp.0": ["ff.net.0.proj"], "img_mlp.2": ["ff.net.2"], "img_mod.lin": ["norm1.linear"],
          "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
          "txt_attn.proj": ["attn.to_add_out"], "txt_mlp.0": ["ff_context.net.0.proj"],
          "txt_mlp.2": ["ff_context.net.2"], "txt_mod.lin": ["norm1_context.linear"]}
SINGLE = {"linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], "linear2": ["proj_out"],
          "modulation.lin": ["norm.linear"]}
BLOCKS = {"transformer_blocks": ("double_blocks", DOUBLE), "single_transformer_blocks": ("single_blocks", SINGLE)}


def _part_width(part: str, hidden: int) -> int:
    """Output width of a fused part the LoRA does not adapt (its rows are zero)."""
    return hidden * MLP_RATIO if part == "proj_mlp" else hidden


def to_bfl_layers(tensors: dict, alpha: float) -> dict[str, tuple]:
    """BFL layer name -> (down, up, alpha) for every layer the LoRA touches."""
    import torch

    modules = modules_of(tensors)
    layers = {}
    for name in modules:
        match = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", name)
        kind = BLOCKS.get(match.group(1)) if match else None
        layer = next((bfl for bfl, parts in kind[1].items() if match.group(3) in parts), None) if kind else None
        if layer is None:
            raise LookalikeError(f"cannot export: no kohya/ComfyUI name for the layer {name}")
        layers.setdefault(f"{kind[0]}.{match.group(2)}.{layer}", (match.group(1), match.group(2), layer))
    exported = {}
    for bfl_name, (block, index, layer) in sorted(layers.items()):
        parts = BLOCKS[block][1][layer]
        present = [modules.get(f"{block}.{index}.{part}") for part in parts]
        hidden = next(down for down, _ in filter(None, present)).shape[1]  # every fused part reads the hidden state
        downs, ups = [], []
        for part, found in zip(parts, present):
            down, up = found if found is not None else (torch.zeros(0, hidden),
                                                        torch.zeros(_part_width(part, hidden), 0))
            downs.append(down.float())
            ups.append(up.float())
        # kohya scales by alpha / (its rank): n adapted parts of rank r each keep alpha / r with alpha x n.
        adapted = sum(found is not None for found in present)
        exported[bfl_name] = (torch.cat(downs), torch.block_diag(*ups), alpha * adapted)
    return exported


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
    if Path(out).resolve() == Path(source).resolve():
        raise LookalikeError(f"--out: {out} is the LoRA being exported; write the export to a new file")
    tensors, config, info = read_lora(source)
    cast = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    if format == "diffusers":
        from peft import LoraConfig

        fields = {k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__}
        save_lora(out, tensors, LoraConfig(**fields), {k: v for k, v in info.items() if k in ("base_model",)},
                  dtype=cast)
        return out
    if base_family(info.get("base_model") or "").name != "flux1":  # a file that names no base: as FLUX.1
        raise LookalikeError(f"--format {format}: lookalike writes kohya's and ComfyUI's layouts for FLUX.1 LoRAs "
                             f"only; {source} is for {info['base_model']}: export it with --format diffusers")
    prefix, dotted = ("lora_unet_", False) if format == "kohya" else ("diffusion_model.", True)
    result = {}
    for layer, (down, up, alpha) in to_bfl_layers(tensors, config["lora_alpha"]).items():
        name = prefix + (layer if dotted else layer.replace(".", "_"))
        result[f"{name}.lora_down.weight"] = down.to(cast).contiguous()
        result[f"{name}.lora_up.weight"] = up.to(cast).contiguous()
        result[f"{name}.alpha"] = torch.tensor(float(alpha))
    # Every layer's scale, its alpha tensor over its own rank, is the source's alpha / rank.
    metadata = {"format": "pt", **file_metadata(config["r"], info), "ss_network_alpha": f"{config['lora_alpha']:g}"}
    with atomic_path(out) as tmp:
        save_file(result, str(tmp), metadata=metadata)
    return out
