"""The reference computations the tests compare lookalike with, each transcribed from the diffusers
reference script (examples/dreambooth/train_dreambooth_lora_<family>.py) or pipeline it names, never from
lookalike's own constants."""

from __future__ import annotations

import json

import torch

CPU = torch.device("cpu")
# The guidance scale fed to a guidance-distilled transformer while training (the reference scripts' default).
TRAINING_GUIDANCE = 3.5


def z_image_reference_loss(folder, transformer, captions, latents, noise, sigmas):
    """train_dreambooth_lora_z_image.py's loss, written out: latents (x - shift) * scale, a list of (C, 1, H, W)
    frames, timestep (1000 - t) / 1000, the output negated, target noise - x."""
    from diffusers import AutoencoderKL, ZImagePipeline

    vae = AutoencoderKL.load_config(folder, subfolder="vae")
    stock = ZImagePipeline.from_pretrained(folder, transformer=None, vae=None)
    with torch.no_grad():
        embeds, _ = stock.encode_prompt(captions, device="cpu", max_sequence_length=32)
    model_input = (latents - vae["shift_factor"]) * vae["scaling_factor"]
    sigma = sigmas.view(-1, 1, 1, 1)
    noisy = (1.0 - sigma) * model_input + sigma * noise
    timesteps = sigmas * 1000  # the script draws timesteps; its sigma is timestep / 1000
    output = transformer(list(noisy.unsqueeze(2).unbind(0)), (1000 - timesteps) / 1000, embeds, return_dict=False)[0]
    prediction = -torch.stack(output).squeeze(2)
    return ((prediction.float() - (noise - model_input).float()) ** 2).reshape(len(captions), -1).mean(1).mean()


def flux2_reference_loss(folder, transformer, captions, latents, noise, sigmas, dev=False,
                         text_encoder_out_layers=None):
    """train_dreambooth_lora_flux2_klein.py's loss, written out: 2x2 patches normalised by the VAE's batch-norm
    statistics, packed tokens with 4-D ids, timestep t / 1000, the output unpacked by its ids, target
    noise - x. dev: train_dreambooth_lora_flux2.py's, which differs in its stock pipeline (Flux2Pipeline, whose
    prompt encoding is Mistral's) and in feeding the guidance scale to the transformer. text_encoder_out_layers:
    the script's --text_encoder_out_layers, which its compute_text_embeddings passes to encode_prompt (None: that
    argument left to the pipeline's default)."""
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Pipeline

    pipeline = Flux2Pipeline if dev else Flux2KleinPipeline
    vae = AutoencoderKLFlux2.from_pretrained(folder, subfolder="vae")
    stock = pipeline.from_pretrained(folder, transformer=None, vae=None)
    with torch.no_grad():
        layers = {} if text_encoder_out_layers is None else {"text_encoder_out_layers": text_encoder_out_layers}
        prompt_embeds, text_ids = stock.encode_prompt(captions, device="cpu", max_sequence_length=32, **layers)
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    model_input = (pipeline._patchify_latents(latents) - mean) / std
    ids = pipeline._prepare_latent_ids(model_input)
    sigma = sigmas.view(-1, 1, 1, 1)
    noisy = pipeline._pack_latents((1.0 - sigma) * model_input + sigma * noise)
    timesteps = sigmas * 1000
    guidance = torch.full([1], TRAINING_GUIDANCE).expand(len(captions)) if dev else None
    prediction = transformer(hidden_states=noisy, timestep=timesteps / 1000, guidance=guidance,
                             encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=ids, return_dict=False)[0]
    prediction = pipeline._unpack_latents_with_ids(prediction[:, :noisy.size(1)], ids)
    return ((prediction.float() - (noise - model_input).float()) ** 2).reshape(len(captions), -1).mean(1).mean()


def one_frame_noisy(vae: dict, latents, noise, sigmas):
    """What the scripts of the families with a Qwen-Image kind of VAE (Qwen-Image and 2.1, Krea 2) each do first:
    one-frame latents normalised per channel ((x - mean) * (1 / std)), (B, C, 1, H, W), and their noisy mix
    (1 - sigma) x + sigma noise."""
    mean = torch.tensor(vae["latents_mean"]).view(1, -1, 1, 1, 1)
    inverse_std = 1.0 / torch.tensor(vae["latents_std"]).view(1, -1, 1, 1, 1)
    model_input = (latents[:, :, None] - mean) * inverse_std
    sigma = sigmas.view(-1, 1, 1, 1, 1)
    return model_input, (1.0 - sigma) * model_input + sigma * noise


def qwen_image_reference_loss(folder, transformer, captions, latents, noise, sigmas):
    """train_dreambooth_lora_qwen_image.py's loss, written out: one-frame latents normalised per channel
    ((x - mean) * (1 / std)), packed 2x2 tokens, the batch's prompt embeddings with their mask, timestep
    t / 1000, the output unpacked, target noise - x."""
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline

    vae = AutoencoderKLQwenImage.load_config(folder, subfolder="vae")
    stock = QwenImagePipeline.from_pretrained(folder, transformer=None, vae=None)
    with torch.no_grad():
        prompt_embeds, prompt_embeds_mask = stock.encode_prompt(captions, device="cpu", max_sequence_length=32)
    model_input, noisy = one_frame_noisy(vae, latents, noise, sigmas)
    noisy = noisy.permute(0, 2, 1, 3, 4)
    batch, channels, _, height, width = model_input.shape
    packed = QwenImagePipeline._pack_latents(noisy, batch, channels, height, width)
    timesteps = sigmas * 1000
    prediction = transformer(hidden_states=packed, encoder_hidden_states=prompt_embeds,
                             encoder_hidden_states_mask=prompt_embeds_mask, timestep=timesteps / 1000,
                             img_shapes=[(1, height // 2, width // 2)] * batch, return_dict=False)[0]
    prediction = QwenImagePipeline._unpack_latents(prediction, height * 8, width * 8, 8)
    return ((prediction.float() - (noise - model_input).float()) ** 2).reshape(len(captions), -1).mean(1).mean()


def qwen_image21_reference_loss(folder, transformer, captions, latents, noise, sigmas):
    """train_dreambooth_lora_qwenimage21.py's loss, written out: the stock pipeline's prompt encoding (its
    embeddings and mask), one-frame latents normalised per channel ((x - mean) * (1 / std)), flattened one latent a
    token, img_shapes and the image slots (one per 2x2 latents) after the prompt's, timestep t / 1000, the
    prediction's tail unpacked, target noise - x."""
    from diffusers import AutoencoderKLQwenImage21, QwenImage21Pipeline

    vae = AutoencoderKLQwenImage21.load_config(folder, subfolder="vae")
    stock = QwenImage21Pipeline.from_pretrained(folder, transformer=None, vae=None)
    with torch.no_grad():
        prompt_embeds, prompt_embeds_mask, _ = stock.encode_prompt(captions, device="cpu")
    model_input, noisy = one_frame_noisy(vae, latents, noise, sigmas)
    batch, channels, _, height, width = model_input.shape
    packed = QwenImage21Pipeline._pack_latents(noisy, batch, channels, height, width)
    slots = torch.cat([torch.zeros(batch, prompt_embeds.shape[1], dtype=torch.bool),
                       torch.ones(batch, height * width // 4, dtype=torch.bool)], dim=1)
    timesteps = sigmas * 1000
    prediction = transformer(hidden_states=packed, encoder_hidden_states=prompt_embeds,
                             encoder_hidden_states_mask=prompt_embeds_mask, timestep=timesteps / 1000,
                             img_shapes=[[(1, height, width)]] * batch, img_mask=slots, return_dict=False)[0]
    prediction = QwenImage21Pipeline._unpack_latents(prediction[:, -packed.shape[1]:], height * 16, width * 16, 16)
    return ((prediction.float() - (noise - model_input).float()) ** 2).reshape(len(captions), -1).mean(1).mean()


def krea2_reference_loss(folder, transformer, captions, latents, noise, sigmas):
    """train_dreambooth_lora_krea2.py's loss, written out: the stock pipeline's prompt encoding (its fixed-length
    template, padding included, and the mask), one-frame latents normalised per channel ((x - mean) * (1 / std)),
    2x2 patches packed as the script inlines it, rotary ids from Krea2Pipeline.prepare_position_ids, timestep
    t / 1000, the output unpacked, target noise - x."""
    from diffusers import AutoencoderKLQwenImage, Krea2Pipeline

    vae = AutoencoderKLQwenImage.load_config(folder, subfolder="vae")
    stock = Krea2Pipeline.from_pretrained(folder, transformer=None, vae=None)
    with torch.no_grad():
        prompt_embeds, prompt_embeds_mask = stock.encode_prompt(captions, device="cpu", max_sequence_length=32)
    model_input, noisy = one_frame_noisy(vae, latents, noise, sigmas)
    noisy = noisy.permute(0, 2, 1, 3, 4)
    batch, channels, _, height, width = model_input.shape
    packed = noisy.reshape(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    packed = packed.reshape(batch, (height // 2) * (width // 2), channels * 4)
    ids = Krea2Pipeline.prepare_position_ids(prompt_embeds.shape[1], height // 2, width // 2, "cpu")
    timesteps = sigmas * 1000
    prediction = transformer(hidden_states=packed, encoder_hidden_states=prompt_embeds, timestep=timesteps / 1000,
                             position_ids=ids, encoder_attention_mask=prompt_embeds_mask, return_dict=False)[0]
    prediction = prediction.view(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    prediction = prediction.reshape(batch, channels, 1, height, width)
    return ((prediction.float() - (noise - model_input).float()) ** 2).reshape(len(captions), -1).mean(1).mean()


def sd3_reference_loss(folder, transformer, captions, latents, noise, sigmas, encoders=None):
    """train_dreambooth_lora_sd3.py's loss, written out from its own prompt encoding: each CLIP's second-to-last
    hidden states over 77 tokens (padded to the longest) side by side, padded to T5's width and followed by T5's
    tokens; both CLIPs' projected pooled outputs side by side; latents (x - shift) * scale, timestep sigma x 1000;
    the output preconditioned (output x -sigma + noisy latents) against the clean latents. encoders: the three text
    encoders by component name (with --train_text_encoder, the CLIPs with its LoRA); default the base's own."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    encoders = encoders or {
        "text_encoder": CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder"),
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2"),
        "text_encoder_3": T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_3")}
    vae = AutoencoderKL.load_config(folder, subfolder="vae")
    hidden, pooled = [], []
    for suffix in ("", "_2"):
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder=f"tokenizer{suffix}")
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        output = encoders[f"text_encoder{suffix}"](ids, output_hidden_states=True)
        hidden.append(output.hidden_states[-2])
        pooled.append(output[0])
    t5_tokenizer = T5TokenizerFast.from_pretrained(folder, subfolder="tokenizer_3")
    ids = t5_tokenizer(captions, padding="max_length", max_length=32, truncation=True, add_special_tokens=True,
                       return_tensors="pt").input_ids
    t5_embeds = encoders["text_encoder_3"](ids)[0]
    clip_embeds = torch.cat(hidden, dim=-1)
    clip_embeds = torch.nn.functional.pad(clip_embeds, (0, t5_embeds.shape[-1] - clip_embeds.shape[-1]))
    prompt_embeds = torch.cat([clip_embeds, t5_embeds], dim=-2)
    model_input = (latents - vae["shift_factor"]) * vae["scaling_factor"]
    sigma = sigmas.view(-1, 1, 1, 1)
    noisy = (1.0 - sigma) * model_input + sigma * noise
    output = transformer(hidden_states=noisy, timestep=sigmas * 1000, encoder_hidden_states=prompt_embeds,
                         pooled_projections=torch.cat(pooled, dim=-1), return_dict=False)[0]
    prediction = output * (-sigma) + noisy
    return ((prediction.float() - model_input.float()) ** 2).reshape(len(captions), -1).mean(1).mean()


def flux1_reference_loss(folder, transformer, encoders, captions, latents, noise, sigmas, guidance):
    """train_dreambooth_lora_flux.py's loss with --train_text_encoder, written out: its prompt encoding (CLIP's
    pooled output of 77 padded tokens, T5's last hidden states of 32), latents (x - shift) * scale, packed 2x2,
    timestep t / 1000 and the guidance scale, the output unpacked, target noise - x."""
    from diffusers import FluxPipeline
    from transformers import AutoTokenizer

    def ids(subfolder: str, length: int):
        tokenizer = AutoTokenizer.from_pretrained(folder, subfolder=subfolder)
        return tokenizer(captions, padding="max_length", max_length=length, truncation=True,
                         return_tensors="pt").input_ids

    pooled = encoders["text_encoder"](ids("tokenizer", 77), output_hidden_states=False).pooler_output
    prompt_embeds = encoders["text_encoder_2"](ids("tokenizer_2", 32))[0]
    vae = json.loads((folder / "vae" / "config.json").read_text())
    model_input = (latents - vae["shift_factor"]) * vae["scaling_factor"]
    batch, channels, height, width = model_input.shape
    sigma = sigmas.view(-1, 1, 1, 1)
    noisy = FluxPipeline._pack_latents((1.0 - sigma) * model_input + sigma * noise, batch, channels, height, width)
    prediction = transformer(hidden_states=noisy, timestep=sigmas * 1000 / 1000,
                             guidance=torch.tensor([guidance]).expand(batch), pooled_projections=pooled,
                             encoder_hidden_states=prompt_embeds, txt_ids=torch.zeros(prompt_embeds.shape[1], 3),
                             img_ids=FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, CPU,
                                                                            torch.float32), return_dict=False)[0]
    prediction = FluxPipeline._unpack_latents(prediction, height * 8, width * 8, 8)
    return ((prediction.float() - (noise - model_input).float()) ** 2).reshape(batch, -1).mean(1).mean()


def reference_text(folder, family: str, captions: list[str], encoders: dict | None = None) -> dict:
    """The scripts' own prompt encoding (by `encoders`, else the base's): each tokenizer pads to its
    model_max_length; SD 1.x takes the text encoder's last hidden states, SDXL each encoder's second-to-last side by
    side and the second's pooled output."""
    from transformers import CLIPTokenizer

    def ids(tokenizer):
        return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids

    encoders = encoders or reference_text_encoders(folder, family)
    tokenizer, encoder = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"), encoders["text_encoder"]
    if family == "sd1":
        return {"encoder_hidden_states": encoder(ids(tokenizer))[0]}
    tokenizer_2 = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2")
    encoder_2 = encoders["text_encoder_2"]
    first = encoder(ids(tokenizer), output_hidden_states=True)
    second = encoder_2(ids(tokenizer_2), output_hidden_states=True)
    return {"encoder_hidden_states": torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1),
            "pooled": second[0]}


def reference_text_encoders(folder, family: str) -> dict:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    encoders = {"text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")}
    if family == "sdxl":
        encoders["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2")
    return encoders


def reference_loss(folder, family, unet, captions, latents, noise, timesteps, resolution, snr_gamma=None,
                   encoders=None):
    """train_dreambooth_lora.py's and train_dreambooth_lora_sdxl.py's loss, written out: latents times the VAE's
    scaling factor, DDPM's noising by the scheduler's cumulative alphas, the UNet called with the text (SDXL: and
    time ids of the original size, crop corner and target size), target noise or v, and min-SNR weights."""
    vae = json.loads((folder / "vae" / "config.json").read_text())
    schedule = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    betas = torch.linspace(schedule["beta_start"] ** 0.5, schedule["beta_end"] ** 0.5, 1000, dtype=torch.float32) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)[timesteps].view(-1, 1, 1, 1)
    model_input = latents * vae["scaling_factor"]
    noisy = alphas_cumprod.sqrt() * model_input + (1 - alphas_cumprod).sqrt() * noise
    text = reference_text(folder, family, captions, encoders)
    added = None
    if family == "sdxl":
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * len(captions),
                                dtype=torch.float32)
        added = {"time_ids": time_ids, "text_embeds": text["pooled"]}
    prediction = unet(noisy, timesteps, text["encoder_hidden_states"], added_cond_kwargs=added).sample
    v_prediction = schedule.get("prediction_type") == "v_prediction"
    target = alphas_cumprod.sqrt() * noise - (1 - alphas_cumprod).sqrt() * model_input if v_prediction else noise
    if snr_gamma is None:
        return torch.nn.functional.mse_loss(prediction.float(), target.float())
    snr = alphas_cumprod.flatten() / (1 - alphas_cumprod.flatten())
    weights = torch.stack([snr, snr_gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    weights = weights / (snr + 1) if v_prediction else weights / snr
    loss = torch.nn.functional.mse_loss(prediction.float(), target.float(), reduction="none")
    return (loss.mean(dim=list(range(1, loss.dim()))) * weights).mean()
