"""ComfyUI's LoRA loading, transcribed for the tests from ComfyUI 0.38.1 (Comfy-Org/ComfyUI as stored; its
comfyui_version.py says 0.38.1), never from lookalike's constants:

- comfy/utils.py (commit 09708ea): flux_to_diffusers, z_image_to_diffusers, krea2_to_diffusers,
  mmdit_to_diffusers and unet_to_diffusers, the maps from diffusers' layer names to ComfyUI's (with the slice of a
  fused layer each takes);
- comfy/model_detection.py: the UNet config unet_to_diffusers reads (per input block its transformer depth, and
  per output block, listed from the last output block to the first, its own), here told from the diffusers
  UNet's config instead of the original checkpoint's weights;
- comfy/lora.py (commit 17358c8): model_lora_keys_unet (which names in a LoRA file reach which weight of the
  model), load_lora (which of the file's keys load, and which are left over) and calculate_weight (a patch into a
  slice: weight.narrow(dim, start, length));
- comfy/weight_adapter/lora.py (commit 6f98b15): LoRAAdapter.load (the up and down matrices' names) and
  calculate_weight (weight += strength * alpha / rank * up @ down);
- comfy/ldm/qwen_image21/model.py (commit 08f68f0): Qwen-Image 2.1's feed-forward fuses gate_layer and proj into
  one gate_up layer ([gate; up]).

ComfyUI's model is built here from the diffusers model: each weight placed where the family's map puts it, as
ComfyUI's loader does with a diffusers checkpoint. Only weights (the layers a LoRA changes) are mapped."""

from __future__ import annotations

import torch

PREFIX = "diffusion_model."


def flux_to_diffusers(depth: int, depth_single_blocks: int, hidden_size: int) -> dict:
    """comfy/utils.py flux_to_diffusers, its weights: FLUX.1's and FLUX.2's double and single blocks."""
    key_map = {}
    for index in range(depth):
        block, to = f"transformer_blocks.{index}", f"{PREFIX}double_blocks.{index}"
        for stream, names in (("img_attn", ("to_q", "to_k", "to_v")), ("txt_attn", ("add_q_proj", "add_k_proj",
                                                                                   "add_v_proj"))):
            for part, name in enumerate(names):
                key_map[f"{block}.attn.{name}.weight"] = (f"{to}.{stream}.qkv.weight",
                                                          (0, hidden_size * part, hidden_size))
        block_map = {"attn.to_out.0": "img_attn.proj", "norm1.linear": "img_mod.lin",
                     "norm1_context.linear": "txt_mod.lin", "attn.to_add_out": "txt_attn.proj",
                     "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0",
                     "ff_context.net.2": "txt_mlp.2", "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
                     "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2"}
        for name, comfy in block_map.items():
            key_map[f"{block}.{name}.weight"] = (f"{to}.{comfy}.weight", None)
    for index in range(depth_single_blocks):
        block, to = f"single_transformer_blocks.{index}", f"{PREFIX}single_blocks.{index}"
        for part, name in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
            key_map[f"{block}.{name}.weight"] = (f"{to}.linear1.weight", (0, hidden_size * part, hidden_size))
        key_map[f"{block}.proj_mlp.weight"] = (f"{to}.linear1.weight", (0, hidden_size * 3, hidden_size * 4))
        for name, comfy in {"norm.linear": "modulation.lin", "proj_out": "linear2",
                            "attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}.items():
            key_map[f"{block}.{name}.weight"] = (f"{to}.{comfy}.weight", None)
    return key_map


def z_image_to_diffusers(n_layers: int, dim: int, n_refiner_layers: int) -> dict:
    """comfy/utils.py z_image_to_diffusers, its blocks' weights."""
    key_map = {}
    blocks = [f"layers.{i}" for i in range(n_layers)] + [
        f"{kind}.{i}" for kind in ("context_refiner", "noise_refiner") for i in range(n_refiner_layers)]
    for block in blocks:
        for part, name in enumerate(("to_q", "to_k", "to_v")):
            key_map[f"{block}.attention.{name}.weight"] = (f"{PREFIX}{block}.attention.qkv.weight",
                                                           (0, dim * part, dim))
        for name, comfy in {"attention.to_out.0": "attention.out", "feed_forward.w1": "feed_forward.w1",
                            "feed_forward.w2": "feed_forward.w2", "feed_forward.w3": "feed_forward.w3",
                            "adaLN_modulation.0": "adaLN_modulation.0"}.items():
            key_map[f"{block}.{name}.weight"] = (f"{PREFIX}{block}.{comfy}.weight", None)
    return key_map


def krea2_to_diffusers(layers: int) -> dict:
    """comfy/utils.py krea2_to_diffusers: every block's layers renamed (none fused); its text-fusion stage has
    two layerwise and two refiner blocks, hard-coded."""
    key_map = {}
    block_map = {"attn.to_q": "attn.wq", "attn.to_k": "attn.wk", "attn.to_v": "attn.wv", "attn.to_gate": "attn.gate",
                 "attn.to_out.0": "attn.wo", "attn.to_out": "attn.wo", "ff.gate": "mlp.gate", "ff.up": "mlp.up",
                 "ff.down": "mlp.down"}
    blocks = [(f"transformer_blocks.{i}", f"blocks.{i}") for i in range(layers)] + [
        (f"text_fusion.{kind}_blocks.{i}", f"txtfusion.{kind}_blocks.{i}") for kind in ("layerwise", "refiner")
        for i in range(2)]
    for block, comfy_block in blocks:
        for name, comfy in block_map.items():
            key_map[f"{block}.{name}.weight"] = (f"{PREFIX}{comfy_block}.{comfy}.weight", None)
    for name, comfy in (("img_in", "first"), ("time_embed.linear_1", "tmlp.0"), ("time_embed.linear_2", "tmlp.2"),
                        ("time_mod_proj", "tproj.1"), ("txt_in.linear_1", "txtmlp.1"), ("txt_in.linear_2", "txtmlp.3"),
                        ("text_fusion.projector", "txtfusion.projector"), ("final_layer.linear", "last.linear")):
        key_map[f"{name}.weight"] = (f"{PREFIX}{comfy}.weight", None)
    return key_map


def mmdit_to_diffusers(depth: int, num_blocks: int) -> dict:
    """comfy/utils.py mmdit_to_diffusers, its joint blocks' weights: each fused qkv is depth * 64 rows a part (SD3's
    width is 64 per unit of depth)."""
    key_map, offset = {}, depth * 64
    for i in range(num_blocks):
        block, to = f"transformer_blocks.{i}", f"{PREFIX}joint_blocks.{i}"
        for attention, qkv, names in (("attn", "x_block.attn.qkv", ("to_q", "to_k", "to_v")),
                                      ("attn", "context_block.attn.qkv", ("add_q_proj", "add_k_proj", "add_v_proj")),
                                      ("attn2", "x_block.attn2.qkv", ("to_q", "to_k", "to_v"))):
            for part, name in enumerate(names):
                key_map[f"{block}.{attention}.{name}.weight"] = (f"{to}.{qkv}.weight", (0, offset * part, offset))
        for comfy, name in (("context_block.adaLN_modulation.1", "norm1_context.linear"),
                            ("context_block.attn.proj", "attn.to_add_out"),
                            ("context_block.mlp.fc1", "ff_context.net.0.proj"),
                            ("context_block.mlp.fc2", "ff_context.net.2"),
                            ("x_block.adaLN_modulation.1", "norm1.linear"), ("x_block.attn.proj", "attn.to_out.0"),
                            ("x_block.attn2.proj", "attn2.to_out.0"), ("x_block.mlp.fc1", "ff.net.0.proj"),
                            ("x_block.mlp.fc2", "ff.net.2")):
            key_map[f"{block}.{name}.weight"] = (f"{to}.{comfy}.weight", None)
    return key_map


# TRANSFORMER_BLOCKS' weights (comfy/utils.py): the layers of a UNet's transformer block.
UNET_TRANSFORMER_WEIGHTS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                            "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")


def unet_config(config) -> dict:
    """ComfyUI's UNet config of an SD 1.x or SDXL UNet: res blocks and transformer depth per level, the input
    blocks' depths in order, the output blocks' from the last to the first, the middle block's."""
    levels = len(config.block_out_channels)
    per_block = config.layers_per_block
    layers = config.transformer_layers_per_block
    layers = [layers] * levels if isinstance(layers, int) else list(layers)
    down = [layers[x] if config.down_block_types[x].startswith("CrossAttn") else 0 for x in range(levels)]
    up = [layers[levels - 1 - x] if config.up_block_types[x].startswith("CrossAttn") else 0 for x in range(levels)]
    output_order = [up[x] for x in range(levels) for _ in range(per_block + 1)]  # output_blocks 0, 1, ...
    return {"num_res_blocks": [per_block] * levels, "channel_mult": list(range(1, levels + 1)),
            "transformer_depth": [down[x] for x in range(levels) for _ in range(per_block)],
            "transformer_depth_output": list(reversed(output_order)), "transformer_depth_middle": layers[-1]}


def unet_to_diffusers(unet: dict) -> dict:
    """comfy/utils.py unet_to_diffusers, its transformer blocks' weights: diffusers' name -> the original UNet's."""
    key_map = {}
    depth, depth_output = list(unet["transformer_depth"]), list(unet["transformer_depth_output"])
    num_res_blocks = unet["num_res_blocks"]
    for x in range(len(unet["channel_mult"])):
        n = 1 + (num_res_blocks[x] + 1) * x
        for i in range(num_res_blocks[x]):
            for t in range(depth.pop(0)):
                for b in UNET_TRANSFORMER_WEIGHTS:
                    key_map[f"down_blocks.{x}.attentions.{i}.transformer_blocks.{t}.{b}.weight"] = \
                        f"input_blocks.{n}.1.transformer_blocks.{t}.{b}.weight"
            n += 1
    for t in range(unet["transformer_depth_middle"]):
        for b in UNET_TRANSFORMER_WEIGHTS:
            key_map[f"mid_block.attentions.0.transformer_blocks.{t}.{b}.weight"] = \
                f"middle_block.1.transformer_blocks.{t}.{b}.weight"
    reversed_blocks = list(reversed(num_res_blocks))
    for x in range(len(unet["channel_mult"])):
        n = (reversed_blocks[x] + 1) * x
        for i in range(reversed_blocks[x] + 1):
            for t in range(depth_output.pop()):
                for b in UNET_TRANSFORMER_WEIGHTS:
                    key_map[f"up_blocks.{x}.attentions.{i}.transformer_blocks.{t}.{b}.weight"] = \
                        f"output_blocks.{n}.1.transformer_blocks.{t}.{b}.weight"
            n += 1
    return key_map


def diffusers_map(family: str, config) -> dict | None:
    """The family's map from diffusers' weights to ComfyUI's, with ComfyUI's model config as its detection reads it
    from the weights; None where ComfyUI's model keeps diffusers' names (Qwen-Image and 2.1)."""
    if family in ("flux1", "flux2", "flux2-dev"):
        return flux_to_diffusers(config.num_layers, config.num_single_layers,
                                 config.num_attention_heads * config.attention_head_dim)
    if family == "z-image":
        return z_image_to_diffusers(config.n_layers, config.dim, config.n_refiner_layers)
    if family == "krea2":
        return krea2_to_diffusers(config.num_layers)
    if family == "sd3":  # model_detection: depth = x_embedder's width // 64, num_blocks = the joint blocks counted
        return mmdit_to_diffusers(config.num_attention_heads * config.attention_head_dim // 64, config.num_layers)
    if family in ("sd1", "sdxl"):
        return {key: (PREFIX + original, None) for key, original in unet_to_diffusers(unet_config(config)).items()}
    return None


def comfyui_weights(family: str, config, weights: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(ComfyUI's model weights, and where each diffusers weight is in them: key -> (ComfyUI key, slice)), from the
    diffusers model's weights."""
    mapping = diffusers_map(family, config)
    if mapping is None:  # Qwen-Image: diffusers' names; 2.1's feed-forward fused as [gate_layer; proj]
        mapping = {}
        for key, weight in weights.items():
            if family == "qwen-image21" and key.endswith((".img_mlp.gate_layer.weight", ".img_mlp.proj.weight")):
                half = weight.shape[0]
                part = 0 if key.endswith("gate_layer.weight") else half
                fused = key.rsplit(".img_mlp.", 1)[0] + ".img_mlp.gate_up.weight"
                mapping[key] = (PREFIX + fused, (0, part, half))
            else:
                mapping[key] = (PREFIX + key, None)
    comfy: dict[str, torch.Tensor] = {}
    for key, (to, where) in mapping.items():
        if key not in weights:
            continue
        weight = weights[key]
        if where is None:
            comfy[to] = weight.clone()
            continue
        dim, start, length = where
        fused = comfy.get(to)
        rows = max(start + length, fused.shape[dim] if fused is not None else 0)
        if fused is None or fused.shape[dim] < rows:  # grown as the parts arrive
            grown = torch.zeros(rows, *weight.shape[1:], dtype=weight.dtype)
            if fused is not None:
                grown[:fused.shape[0]] = fused
            fused = grown
        fused.narrow(dim, start, length).copy_(weight)
        comfy[to] = fused
    return comfy, {key: value for key, value in mapping.items() if key in weights}


def model_lora_keys_unet(family: str, config, comfy: dict[str, torch.Tensor]) -> dict:
    """comfy/lora.py model_lora_keys_unet: a LoRA file's layer name -> the ComfyUI weight it patches (a key, or
    (key, slice) for a part of a fused layer)."""
    key_map: dict = {}
    for k in comfy:  # every model's generic names
        if k.startswith(PREFIX) and k.endswith(".weight"):
            key_map["lora_unet_{}".format(k[len(PREFIX):-len(".weight")].replace(".", "_"))] = k
            key_map[k[:-len(".weight")]] = k
    mapping = diffusers_map(family, config)
    if family in ("flux1", "flux2", "flux2-dev"):  # model_base.Flux (ComfyUI's FLUX.2 model is one)
        for k, (to, where) in mapping.items():
            target = to if where is None else (to, where)
            name = k[:-len(".weight")]
            for alias in (f"transformer.{name}", "lycoris_{}".format(name.replace(".", "_")),
                          "lora_transformer_{}".format(name.replace(".", "_")), name):
                key_map[alias] = target
        hidden = config.num_attention_heads * config.attention_head_dim
        for k in comfy:
            if k.endswith(".weight") and ".linear1." in k:
                key_map[k.replace(".linear1.weight", ".linear1_qkv")] = (k, (0, 0, hidden * 3))
    elif family == "sd3":  # model_base.SD3
        for k, (to, where) in mapping.items():
            target = to if where is None else (to, where)
            name = k[:-len(".weight")]
            for alias in (f"transformer.{name}", f"base_model.model.{name}",
                          "lora_transformer_{}".format(name.replace(".", "_")),
                          "lycoris_{}".format(name.replace(".", "_"))):
                key_map[alias] = target
    elif family in ("qwen-image", "qwen-image21"):  # model_base.QwenImage
        for k, weight in comfy.items():
            if not (k.startswith(PREFIX) and k.endswith(".weight")):
                continue
            key_lora = k[len(PREFIX):-len(".weight")]
            targets = [(key_lora, k)]
            if key_lora.endswith(".img_mlp.gate_up"):  # 2.1: LoRAs address the halves
                half = weight.shape[0] // 2
                targets = [(key_lora.replace(".gate_up", ".gate_layer"), (k, (0, 0, half))),
                           (key_lora.replace(".gate_up", ".proj"), (k, (0, half, half)))]
            for key_lora, to in targets:
                key_map[key_lora] = to
                key_map[f"transformer.{key_lora}"] = to
                key_map["lycoris_{}".format(key_lora.replace(".", "_"))] = to
    elif family in ("sd1", "sdxl"):  # every UNet: kohya's names of diffusers' layers, and diffusers' own
        for k, (to, _) in mapping.items():
            name = k[:-len(".weight")]
            key_map["lora_unet_{}".format(name.replace(".", "_"))] = to
            key_map["lycoris_{}".format(name.replace(".", "_"))] = to
            for p in ("", "unet."):
                diffusers_lora_key = "{}{}".format(p, name.replace(".to_", ".processor.to_"))
                if diffusers_lora_key.endswith(".to_out.0"):
                    diffusers_lora_key = diffusers_lora_key[:-2]
                key_map[diffusers_lora_key] = to
    elif family in ("krea2", "z-image"):  # model_base.Krea2, model_base.Lumina2
        for k, (to, where) in mapping.items():
            target = to if where is None else (to, where)
            name = k[:-len(".weight")]
            for alias in (f"diffusion_model.{name}", f"transformer.{name}",
                          "lycoris_{}".format(name.replace(".", "_")), name):
                key_map[alias] = target
    return key_map


def load_lora(lora: dict[str, torch.Tensor], key_map: dict) -> tuple[dict, set[str]]:
    """comfy/lora.py load_lora with LoRAAdapter.load: {target: (up, down, alpha)} for each name the file has a LoRA
    for, and the file's keys left unloaded (ComfyUI logs each one: "lora key not loaded")."""
    patches, loaded = {}, set()
    for x, target in key_map.items():
        alpha = None
        if f"{x}.alpha" in lora:
            alpha = lora[f"{x}.alpha"].item()
            loaded.add(f"{x}.alpha")
        for up, down in ((f"{x}.lora_up.weight", f"{x}.lora_down.weight"),
                         (f"{x}.lora_B.weight", f"{x}.lora_A.weight")):
            if up in lora:
                patches[target] = (lora[up], lora[down], alpha)
                loaded.update((up, down))
                break
    return patches, set(lora) - loaded


def patched(comfy: dict[str, torch.Tensor], patches: dict, strength: float) -> dict[str, torch.Tensor]:
    """comfy/lora.py calculate_weight with LoRAAdapter.calculate_weight: each patch added to its weight, or to its
    slice (narrow), as strength * (alpha / rank, 1 without alpha) * up @ down, in float32."""
    weights = {key: weight.float().clone() for key, weight in comfy.items()}
    for target, (up, down, alpha) in patches.items():
        key, where = target if isinstance(target, tuple) else (target, None)
        weight = weights[key] if where is None else weights[key].narrow(*where)
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        weight += (strength * scale) * torch.mm(up.float().flatten(start_dim=1),
                                                down.float().flatten(start_dim=1)).reshape(weight.shape)
    return weights


def back_to_diffusers(comfy: dict[str, torch.Tensor], mapping: dict) -> dict[str, torch.Tensor]:
    """Each diffusers weight read back from where the map put it in ComfyUI's model."""
    return {key: comfy[to] if where is None else comfy[to].narrow(*where) for key, (to, where) in mapping.items()}


def lora_names(family: str, transformer) -> set[str]:
    """Every layer name in a LoRA file that ComfyUI's key map takes for this model."""
    weights = {f"{name}.weight": module.weight for name, module in transformer.named_modules()
               if isinstance(module, torch.nn.Linear)}
    mapping = diffusers_map(family, transformer.config)
    if mapping is None:  # ComfyUI's model has diffusers' names (Qwen-Image 2.1's fused layer sized from its parts)
        comfy, _ = comfyui_weights(family, transformer.config, weights)
    else:  # the names alone: a tiny SD3 narrower than 64, whose fused layers ComfyUI cannot size, still has them
        comfy = {to: None for key, (to, _) in mapping.items() if key in weights}
    return set(model_lora_keys_unet(family, transformer.config, comfy))
