"""Stable Diffusion 1.x and XL, each on a tiny model of its real classes (UNet2DConditionModel, CLIPTextModel and
CLIPTextModelWithProjection, AutoencoderKL): recognised from a local folder, the diffusers preset equal to the
reference scripts' layers, the training loss equal to the reference scripts' computation on one fixed batch
(epsilon and v-prediction, min-SNR weighting, noise offset), generation equal to the stock pipeline with the LoRA
file loaded, and a killed run resumed exactly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from lookalike.config import TrainConfig, load_config
from lookalike.generate import generate
from lookalike.models.base import base_info, load_component, resolve_base
from lookalike.models.families import denoiser_family, folder_family
from lookalike.models.families.interface import TextEncoding
from lookalike.models.lora import add_lora
from lookalike.train.cache import EmbeddingCache
from lookalike.train.objectives import NoisePrediction, family_objective
from tests.helpers import assert_a_killed_run_resumes_exactly, denoiser_with_a_lora, stock_image, train_sampled_run
from tests.references import reference_loss

TINY = {"sd1": "tiny-sd15", "sdxl": "tiny-sdxl"}


@pytest.mark.parametrize("family", TINY)
def test_a_local_folder_is_recognised_and_its_unet_told_apart_by_its_config(tmp_path, family):
    local = tmp_path / "my-base"
    shutil.copytree(resolve_base(TINY[family]), local)
    assert folder_family(local).name == family and base_info(str(local)).family == family
    unet = load_component(local, "unet")
    assert type(unet).__name__ == "UNet2DConditionModel" and denoiser_family(unet).name == family


@pytest.mark.parametrize("family", TINY)
def test_the_diffusers_preset_is_the_reference_scripts_layers(family):
    """Both reference scripts adapt every linear layer named to_k, to_q, to_v or to_out.0 (peft's suffix rule)."""
    folder = resolve_base(TINY[family])
    unet = load_component(folder, "unet")
    add_lora(unet, 2, 2.0, "diffusers")
    adapted = sorted(name.removesuffix(".lora_A.default") for name, _ in unet.named_modules()
                     if name.endswith(".lora_A.default"))
    reference = sorted(name for name, module in load_component(folder, "unet").named_modules()
                       if isinstance(module, torch.nn.Linear) and name.endswith(("to_k", "to_q", "to_v", "to_out.0")))
    assert adapted == reference and adapted


@pytest.mark.parametrize("family", TINY)
@pytest.mark.parametrize("prediction_type, snr_gamma", [("epsilon", None), ("epsilon", 5.0), ("v_prediction", None),
                                                        ("v_prediction", 5.0)])
def test_the_training_loss_equals_the_reference_scripts_on_one_batch(tmp_path, family, prediction_type, snr_gamma):
    """One fixed batch (VAE latents, noise, timesteps, two captions): lookalike's loss, from its cached embeddings,
    the family's UNet call and its objective, against the loss as the reference script computes it."""
    folder = tmp_path / "base"
    shutil.copytree(resolve_base(TINY[family]), folder)
    schedule = folder / "scheduler" / "scheduler_config.json"
    schedule.write_text(json.dumps({**json.loads(schedule.read_text()), "prediction_type": prediction_type}))
    lookalike_family = folder_family(folder)
    unet = denoiser_with_a_lora(folder, "unet")
    captions = ["a photo of sks man", "sks"]
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=generator)  # as the VAE gives them, before scaling
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.tensor([100, 700])
    settings = TrainConfig(snr_gamma=snr_gamma)

    cache = EmbeddingCache(tmp_path / "cache", folder, torch.device("cpu"), torch.float32)
    texts = cache.texts(captions, TextEncoding(77))
    objective = family_objective(lookalike_family, folder)
    x0, layout = lookalike_family.model_input(latents, lookalike_family.latent_normalisation(folder))
    with torch.no_grad():
        prediction = lookalike_family.predict(unet, unet.config, objective.noisy(x0, noise, timesteps), timesteps,
                                              [texts[c] for c in captions], 1.0, layout, torch.device("cpu"),
                                              torch.float32)
        ours = objective.loss(prediction, x0, noise, timesteps, settings).item()
        reference = reference_loss(folder, family, unet, captions, latents, noise, timesteps, 64, snr_gamma).item()
    print(f"{family} {prediction_type} snr_gamma {snr_gamma}: lookalike {ours:.8f}, reference script "
          f"{reference:.8f}, difference {abs(ours - reference):.2e}")
    assert abs(ours - reference) < 1e-5


def test_noise_offset_adds_per_channel_noise_as_the_reference_scripts_do():
    """noise + offset * randn(B, C, 1, 1), drawn after the noise and before the timesteps, from the run's generator."""
    objective = NoisePrediction(resolve_base("tiny-sd15"))
    shape = torch.Size([2, 4, 8, 8])
    noise, timesteps = objective.draw(shape, torch.Generator().manual_seed(3), TrainConfig(noise_offset=0.1))
    generator = torch.Generator().manual_seed(3)
    expected = torch.randn(shape, generator=generator)
    expected = expected + 0.1 * torch.randn((2, 4, 1, 1), generator=generator)
    torch.testing.assert_close(noise, expected, rtol=0, atol=0)
    torch.testing.assert_close(timesteps, torch.randint(0, 1000, (2,), generator=generator), rtol=0, atol=0)
    plain, _ = objective.draw(shape, torch.Generator().manual_seed(3), TrainConfig())
    torch.testing.assert_close(plain, torch.randn(shape, generator=torch.Generator().manual_seed(3)), rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("family", TINY)
def test_a_run_trains_samples_and_draws_what_the_stock_pipeline_draws(tiny_config, tmp_path, family):
    """Also in kohya's layout: the exported file, loaded by the stock pipeline, draws the same image."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from lookalike.models.export import export_lora

    lora, ours = train_sampled_run(tiny_config, TINY[family])
    with safe_open(str(lora), "pt") as handle:
        assert all(key.startswith("unet.") for key in handle.keys())
        assert handle.metadata()["lookalike.base_model"] == TINY[family]
    assert np.abs(ours - stock_image(TINY[family], lora, guidance_scale=4.0)).max() <= 1, \
        "within 1/255 of the stock pipeline with the LoRA"
    assert np.abs(ours - stock_image(TINY[family], guidance_scale=4.0)).max() > 1, "the LoRA changed the image"
    kohya = export_lora(lora, tmp_path / "kohya.safetensors", "kohya")
    assert np.abs(ours - stock_image(TINY[family], kohya, guidance_scale=4.0)).max() <= 1, \
        "the kohya file draws the same image"
    comfyui = export_lora(lora, tmp_path / "comfyui.safetensors", "comfyui")
    assert load_file(comfyui).keys() == load_file(kohya).keys(), "ComfyUI reads SD LoRAs in kohya's layout"


@pytest.mark.slow
@pytest.mark.parametrize("family", TINY)
def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(tiny_config, family):
    path = tiny_config(model={"base": TINY[family]}, train={"max_train_steps": 40, "checkpoint_every": 10,
                                                            "checkpoints_keep": 2, "learning_rate": 1e-3,
                                                            "batch_size": 2, "noise_offset": 0.05, "snr_gamma": 5.0})
    assert_a_killed_run_resumes_exactly(path, steps=40, killed_after="step-000010")


# The published UNets' parameters, in millions (SD 1.x: 859.5 M; SDXL base: 2,567.5 M).
PUBLISHED_MILLIONS = {"sd15": 859.5, "sd14": 859.5, "sdxl": 2567.5}


@pytest.mark.parametrize("base", PUBLISHED_MILLIONS)
def test_a_hub_base_is_estimated_from_its_published_unet_without_any_download(tiny_config, monkeypatch, tmp_path,
                                                                             base):
    from lookalike.train.memory import estimate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: anything read from the hub would fail
    config = load_config(tiny_config(model={"base": base}, data={"resolution": 1024 if base == "sdxl" else 512}))
    bf16 = estimate(config, "bf16")
    assert bf16.counts.frozen / 1e6 == pytest.approx(PUBLISHED_MILLIONS[base], abs=0.1)
    checkpointed = config.model_copy(update={"train": config.train.model_copy(update={"gradient_checkpointing": True})})
    assert 0 < estimate(checkpointed, "bf16").activations < bf16.activations / 3
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("base", ["sd15", "sdxl"])
def test_kohya_export_round_trips_through_diffusers_converter_on_full_size_shapes(tmp_path, base):
    """Every layer of the published UNet the wider preset adapts, with random LoRA weights: the kohya file reads
    back, through the stock pipeline's own converter (SGM block numbers mapped by the UNet's config for SDXL),
    as the same tensors under the same layer names."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    from lookalike.models.export import export_lora
    from lookalike.models.lora import save_lora

    architecture = base_info(base).architecture
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(architecture)
    add_lora(unet, 2, 2.0, "attention+mlp")
    generator = torch.Generator().manual_seed(0)
    ours = {f"unet.{key}": torch.randn(tensor.shape, generator=generator)
            for key, tensor in get_peft_model_state_dict(unet).items()}
    source = tmp_path / "lora.safetensors"
    save_lora(source, ours, unet.peft_config["default"], {"base_model": base})
    kohya = export_lora(source, tmp_path / "kohya.safetensors", "kohya")
    written = load_file(str(kohya))
    assert all(key.startswith("lora_unet_") for key in written)
    first = "input_blocks_4_1" if base == "sdxl" else "down_blocks_0_attentions_0"
    assert f"lora_unet_{first}_transformer_blocks_0_attn1_to_q.lora_down.weight" in written
    assert len(written) == len(ours) // 2 * 3, "down, up and alpha for every layer"

    pipeline = folder_family(resolve_base(TINY["sdxl" if base == "sdxl" else "sd1"])).pipeline_class()
    converted, alphas = pipeline.lora_state_dict(str(kohya), unet_config=unet.config if base == "sdxl" else None)
    assert set(alphas.values()) == {2.0}, "alpha = rank: the scale is 1, as the source's"
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    assert {f"unet.{key}" for key in peft} == set(ours)
    for key, tensor in peft.items():
        torch.testing.assert_close(tensor, ours[f"unet.{key}"], rtol=0, atol=0)


def test_each_base_trains_at_its_own_size_unless_the_run_says_otherwise(tiny_config):
    from lookalike.generate import image_size
    from lookalike.models.base import training_resolution

    study = load_config(tiny_config(data={"resolution": 1024}))

    def at(base, **train):
        config = study.with_experiment({"base": base, **train}, "test")
        return training_resolution(config), image_size(config)

    assert at("sd15") == (512, 512) and at("sd14") == (512, 512), "SD 1.x trains and draws at 512 in a 1024 study"
    assert at("sdxl") == (1024, 1024) and at("flux-dev") == (1024, 1024)
    assert at("sd15", resolution=768) == (768, 768), "[train] resolution wins"
    small = load_config(tiny_config(data={"resolution": 256}))
    assert training_resolution(small.with_experiment({"base": "sdxl"}, "test")) == 256, "never above [data]'s"


def test_a_vae_that_overflows_in_float16_encodes_in_float32(tmp_path, faces):
    """SDXL's VAE config says force_upcast: under fp16 training its latents are cached as float32 encodes them."""
    from lookalike.data.dataset import TrainingImage

    photo = TrainingImage(next((faces / "train" / "obama").iterdir()), "sks")
    folder = resolve_base("tiny-sdxl")
    assert json.loads((folder / "vae" / "config.json").read_text())["force_upcast"]
    half = EmbeddingCache(tmp_path / "half", folder, torch.device("cpu"), torch.float16).latents([photo], [(64, 64)])[0]
    full = EmbeddingCache(tmp_path / "full", folder, torch.device("cpu"), torch.float32).latents([photo], [(64, 64)])[0]
    torch.testing.assert_close(half.mean, full.mean, rtol=0, atol=0)


def test_a_negative_prompt_guides_as_the_stock_pipelines_and_is_refused_where_none_is_taken(tiny_config, tmp_path):
    from lookalike.errors import LookalikeError

    negative = "blurry, lowres"
    config = load_config(tiny_config(model={"base": "tiny-sd15"}, generate={
        "num_inference_steps": 3, "guidance_scales": [4.0], "negative_prompt": negative}))
    folder = generate(config, out=tmp_path / "with")
    ours = np.asarray(Image.open(folder / "p00_s0_g4.png")).astype(int)
    assert json.loads((folder / "p00_s0_g4.json").read_text())["settings"]["negative_prompt"] == negative
    assert np.abs(ours - stock_image("tiny-sd15", guidance_scale=4.0, negative_prompt=negative)).max() <= 1
    assert np.abs(ours - stock_image("tiny-sd15", guidance_scale=4.0)).max() > 1, "the negative prompt changed it"
    flux = load_config(tiny_config(name="flux.toml", generate={"negative_prompt": negative}))
    with pytest.raises(LookalikeError, match="generate.negative_prompt: tiny does not guide against a negative"):
        generate(flux, out=tmp_path / "flux")
