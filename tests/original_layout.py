"""A Stable Diffusion pipeline's weights in the original single-file layout (CompVis' LDM for SD 1.x, Stability's
SGM for SDXL), as community fine-tunes ship them: written from the original models' module names
(ldm/modules/diffusionmodules/openaimodel.py's input_blocks, middle_block and output_blocks; the autoencoder's
encoder.down.N.block.M; OpenCLIP's resblocks with one in_proj for query, key and value), so that diffusers'
from_single_file has a real conversion to do."""

from __future__ import annotations

import re

import torch

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet_part(rest: str) -> str:
    layer, _, tail = rest.partition(".")
    return f"{RESNET[layer]}.{tail}"


def unet_name(name: str, layers: int, up_has_attention: list[bool]) -> str:
    """openaimodel.py's name of a diffusers UNet2DConditionModel parameter (`layers`: layers_per_block)."""
    for ours, theirs in UNET_TOP.items():
        if name.startswith(ours + "."):
            return theirs + name[len(ours):]
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", name):
        block, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        place = f"input_blocks.{(layers + 1) * block + index + 1}"
        return f"{place}.0.{_resnet_part(rest)}" if kind == "resnets" else f"{place}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", name):
        return f"input_blocks.{(layers + 1) * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", name):
        return f"middle_block.{2 * int(m[1])}.{_resnet_part(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", name):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", name):
        block, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        place = f"output_blocks.{(layers + 1) * block + index}"
        return f"{place}.0.{_resnet_part(rest)}" if kind == "resnets" else f"{place}.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", name):
        block = int(m[1])
        return f"output_blocks.{(layers + 1) * block + layers}.{2 if up_has_attention[block] else 1}.conv.{m[2]}"
    raise KeyError(name)


def vae_name(name: str, levels: int) -> str:
    """The autoencoder's original name of a diffusers AutoencoderKL parameter."""
    name = name.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    name = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", name)
    name = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", name)
    name = re.sub(r"decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.", name)
    name = re.sub(r"decoder\.up\.(\d+)\.resnets\.", r"decoder.up.\1.block.", name)
    name = re.sub(r"decoder\.up\.(\d+)\.upsamplers\.0\.", r"decoder.up.\1.upsample.", name)
    name = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", name)
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", name):
        return f"{m[1]}.mid.attn_1.{VAE_ATTENTION[m[2]]}.{m[3]}"
    return name


def open_clip_state(state: dict) -> dict:
    """OpenCLIP's text tower from a transformers CLIPTextModelWithProjection's state dict."""
    out = {}
    for name, tensor in state.items():
        name = name.removeprefix("text_model.")
        if name == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = tensor
        elif name == "embeddings.position_embedding.weight":
            out["positional_embedding"] = tensor
        elif name.startswith("final_layer_norm."):
            out["ln_final." + name.rpartition(".")[2]] = tensor
        elif name == "text_projection.weight":
            out["text_projection"] = tensor.T.contiguous()
        elif m := re.match(r"encoder\.layers\.(\d+)\.(.*)", name):
            block, rest = f"transformer.resblocks.{m[1]}", m[2]
            if m2 := re.match(r"self_attn\.q_proj\.(weight|bias)", rest):
                kind = m2[1]
                parts = [state[f"text_model.encoder.layers.{m[1]}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                out[f"{block}.attn.in_proj_{kind}"] = torch.cat(parts)
            elif not re.match(r"self_attn\.[kv]_proj\.", rest):
                rest = (rest.replace("layer_norm1", "ln_1").replace("layer_norm2", "ln_2")
                        .replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj").replace("self_attn.", "attn."))
                out[f"{block}.{rest}"] = tensor
    return out


def _text_model_keys(state: dict) -> dict:
    """A transformers CLIP text model's state dict with its `text_model.` prefix (CLIPTextModel is flattened since
    transformers 5.6); CLIPTextModelWithProjection's projection stays outside it."""
    return {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v
            for k, v in state.items() if not k.endswith("position_ids")}


def original_state_dict(pipe, xl: bool) -> dict:
    """The whole pipeline (UNet, VAE, text encoders) in the original single-file layout."""
    unet = pipe.unet
    layers = unet.config.layers_per_block
    up_has_attention = [hasattr(block, "attentions") for block in unet.up_blocks]
    out = {f"model.diffusion_model.{unet_name(k, layers, up_has_attention)}": v for k, v in unet.state_dict().items()}
    levels = len(pipe.vae.config.block_out_channels)
    for name, tensor in pipe.vae.state_dict().items():
        original = vae_name(name, levels)
        if ".mid.attn_1." in original and tensor.dim() == 2:  # the original's attention projections are 1x1 convs
            tensor = tensor[:, :, None, None]
        out[f"first_stage_model.{original}"] = tensor
    if xl:
        for name, tensor in _text_model_keys(pipe.text_encoder.state_dict()).items():
            out[f"conditioner.embedders.0.transformer.{name}"] = tensor
        for name, tensor in open_clip_state(_text_model_keys(pipe.text_encoder_2.state_dict())).items():
            out[f"conditioner.embedders.1.model.{name}"] = tensor
    else:
        for name, tensor in _text_model_keys(pipe.text_encoder.state_dict()).items():
            out[f"cond_stage_model.transformer.{name}"] = tensor
    return {k: v.contiguous() for k, v in out.items()}
