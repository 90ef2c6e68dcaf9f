"""Z-Image as a base: the tiny model of its real classes, the training objective against the computation of
diffusers' train_dreambooth_lora_z_image.py on one fixed batch, and generation against the stock ZImagePipeline
with the LoRA file loaded."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from lookalike.config import load_config
from lookalike.generate import generate
from lookalike.models.base import base_info, load_component, load_pipeline, resolve_base, vae_normalisation
from lookalike.models.families import folder_family
from lookalike.models.lora import add_lora
from lookalike.train.cache import EmbeddingCache
from lookalike.train.flow_matching import noisy_latents, velocity_target
from lookalike.train.trainer import train
from tests.conftest import run_cli
from tests.test_cli import assert_one_line_error


def test_a_local_z_image_folder_is_recognised_by_its_pipeline_class(tmp_path):
    local = tmp_path / "my-z-image"
    shutil.copytree(resolve_base("tiny-z-image"), local)
    family = folder_family(local)
    assert family.name == "z-image"
    assert base_info(str(local)).steps == 50 and base_info(str(local)).guidance  # the pipeline's own defaults
    assert type(load_component(local, "transformer")).__name__ == "ZImageTransformer2DModel"


def test_the_diffusers_preset_is_the_reference_scripts_default_layers():
    """train_dreambooth_lora_z_image.py adapts to_k, to_q, to_v and to_out.0 wherever they are."""
    transformer = load_component(resolve_base("tiny-z-image"), "transformer")
    add_lora(transformer, 2, 2.0, "diffusers")
    adapted = sorted(name.removesuffix(".lora_A.default") for name, _ in transformer.named_modules()
                     if name.endswith(".lora_A.default"))
    linear = sorted(name for name, module in load_component(resolve_base("tiny-z-image"), "transformer").named_modules()
                    if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v")
                    or name.endswith("to_out.0"))
    assert adapted == linear and len(adapted) == 12  # 4 layers in each of the 3 blocks (layers, 2 refiners)


def test_the_training_objective_equals_the_reference_scripts_on_one_batch(tmp_path):
    """One fixed batch (latents, noise, sigmas, two captions of different lengths): lookalike's loss, from its
    cached embeddings and the family's transformer call, against the loss written as the reference script
    computes it, from the stock pipeline's own prompt encoding."""
    folder = resolve_base("tiny-z-image")
    family = folder_family(folder)
    transformer = load_component(folder, "transformer")
    torch.manual_seed(0)
    add_lora(transformer, 4, 4.0, "diffusers")
    with torch.no_grad():  # a LoRA that changes something: B is zero when peft initialises it
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    captions = ["a photo of sks man", "sks"]
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 16, 8, 8, generator=generator)  # as the VAE gives them, before normalisation
    noise = torch.randn(2, 16, 8, 8, generator=generator)
    sigmas = torch.tensor([0.3, 0.8])
    shift, scale = vae_normalisation(folder)

    cache = EmbeddingCache(tmp_path / "cache", folder, torch.device("cpu"), torch.float32)
    texts = cache.texts(captions, 32)
    x0, layout = family.model_input((latents - shift) * scale)
    prediction = family.predict(transformer, transformer.config, noisy_latents(x0, noise, sigmas), sigmas,
                                [texts[c] for c in captions], 1.0, layout, torch.device("cpu"), torch.float32)
    ours = torch.nn.functional.mse_loss(prediction, velocity_target(x0, noise))

    stock = load_pipeline(folder, transformer=None, vae=None)
    with torch.no_grad():
        embeds, _ = stock.encode_prompt(captions, device="cpu", max_sequence_length=32)
    model_input = (latents - shift) * scale
    noisy = (1.0 - sigmas.view(-1, 1, 1, 1)) * model_input + sigmas.view(-1, 1, 1, 1) * noise
    timesteps = sigmas * 1000  # the script draws timesteps; its sigma is timestep / 1000
    output = transformer(list(noisy.unsqueeze(2).unbind(0)), (1000 - timesteps) / 1000, embeds, return_dict=False)[0]
    model_pred = -torch.stack(output).squeeze(2)
    target = noise - model_input
    reference = ((model_pred.float() - target.float()) ** 2).reshape(2, -1).mean(1).mean()

    assert [t["prompt_embeds"].shape[0] for t in texts.values()] == [e.shape[0] for e in embeds]
    difference = abs(ours.item() - reference.item())
    print(f"z-image loss: lookalike {ours.item():.8f}, reference {reference.item():.8f}, difference {difference:.2e}")
    assert difference < 1e-5


@pytest.mark.slow
def test_a_z_image_run_trains_samples_and_draws_what_the_stock_pipeline_draws(tiny_config, tmp_path):
    from diffusers import ZImagePipeline

    config = load_config(tiny_config(model={"base": "tiny-z-image"}, data={"crop": "center"},
                                     train={"max_train_steps": 10, "learning_rate": 1e-2, "sample_every": 5,
                                            "sample_steps": 2},
                                     generate={"num_inference_steps": 3, "guidance_scales": [4.0]}))
    lora = train(config, "z")
    run = lora.parent
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["step-000005_p0.png", "step-000010_p0.png"]
    ours = np.asarray(Image.open(generate(config, run="z") / "p00_s0_g4.png")).astype(int)

    stock = ZImagePipeline.from_pretrained(resolve_base("tiny-z-image"))
    stock.load_lora_weights(str(run), weight_name=lora.name)
    stock.set_progress_bar_config(disable=True)
    theirs = np.asarray(stock("a photo of sks", height=64, width=64, num_inference_steps=3, guidance_scale=4.0,
                              max_sequence_length=32, generator=torch.Generator("cpu").manual_seed(0)).images[0])
    base = np.asarray(ZImagePipeline.from_pretrained(resolve_base("tiny-z-image"))(
        "a photo of sks", height=64, width=64, num_inference_steps=3, guidance_scale=4.0, max_sequence_length=32,
        generator=torch.Generator("cpu").manual_seed(0)).images[0])
    assert np.abs(ours - theirs.astype(int)).max() <= 1, "within 1/255 of the stock pipeline with the file loaded"
    assert np.abs(ours - base.astype(int)).max() > 1, "the LoRA changed the image"


@pytest.mark.slow
def test_a_z_image_lora_exports_in_diffusers_layout_and_is_refused_in_flux_layouts(tiny_config, tmp_path):
    from lookalike.errors import LookalikeError
    from lookalike.models.export import export_lora

    lora = train(load_config(tiny_config(model={"base": "tiny-z-image"}, train={"max_train_steps": 2})), "z")
    for format in ("kohya", "comfyui"):
        with pytest.raises(LookalikeError, match=f"--format {format}: .*FLUX.1 LoRAs only.*--format diffusers"):
            export_lora(lora, tmp_path / f"{format}.safetensors", format)
    exported = export_lora(lora, tmp_path / "diffusers.safetensors", "diffusers")
    assert loads_in_the_stock_pipeline(exported)


def loads_in_the_stock_pipeline(path) -> bool:
    """The file loads into the stock ZImagePipeline with diffusers' own loader."""
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(resolve_base("tiny-z-image"))
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    return "default_0" in pipe.get_active_adapters()


def test_dry_run_says_there_is_no_estimate_for_z_image_yet(tiny_config):
    assert_one_line_error(run_cli("train", str(tiny_config(model={"base": "tiny-z-image"})), "--dry-run"),
                          "train --dry-run: no memory estimate for tiny-z-image yet")
