"""train.train_text_encoder (SD 1.x and SDXL): a LoRA on the text encoders too. The loss and the text encoders'
gradients equal the reference scripts' (--train_text_encoder) on one fixed batch; a trained run draws what the
stock pipeline draws with the file loaded (its text encoders' part included, and it matters), in kohya's layout
and merged too; a killed run resumes exactly; init_lora carries the text encoders' part; misuse is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from lookalike.config import TrainConfig, load_config
from lookalike.errors import LookalikeError
from lookalike.models.base import resolve_base
from lookalike.models.export import export_lora
from lookalike.models.families import folder_family
from lookalike.models.lora import lora_state_dict, modules_of, save_lora, text_layer_in_model
from lookalike.models.merge import merge_loras
from lookalike.train.cache import EmbeddingCache
from lookalike.train.init_lora import start_from
from lookalike.train.text_encoders import TEXT_ENCODER_LAYERS, TrainedTextEncoders
from tests.test_families import denoiser_with_a_lora, stock_image, train_sampled_run
from tests.test_stable_diffusion import reference_loss, reference_text_encoders
from tests.test_train import assert_a_killed_run_resumes_exactly

TINY = {"sd1": "tiny-sd15", "sdxl": "tiny-sdxl"}
CPU = torch.device("cpu")


def text_encoders_with_a_lora(folder, rank: int = 4) -> TrainedTextEncoders:
    """The base's text encoders with a seeded LoRA that changes something (peft starts its B matrices at zero)."""
    torch.manual_seed(0)
    texts = TrainedTextEncoders(folder, folder_family(folder), TrainConfig(rank=rank, train_text_encoder=True), CPU,
                                torch.float32, 77)
    with torch.no_grad():
        for encoder in texts.encoders.values():
            for name, parameter in encoder.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.05)
    return texts


@pytest.mark.parametrize("family", TINY)
def test_the_loss_and_the_text_encoders_gradients_equal_the_reference_scripts(family):
    """One fixed batch: lookalike's loss through its text encoders' LoRA (the pipeline's encode_prompt) and its
    gradients on that LoRA, against the scripts' computation: their LoraConfig on the text encoders' q, k, v and
    out projections, with the same weights, and their own prompt encoding."""
    folder = resolve_base(TINY[family])
    lookalike_family = folder_family(folder)
    texts = text_encoders_with_a_lora(folder)
    unet = denoiser_with_a_lora(folder, "unet")
    captions = ["a photo of sks man", "sks"]
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.tensor([100, 700])
    objective = lookalike_family.objective(folder)
    x0, layout = lookalike_family.model_input(latents, lookalike_family.latent_normalisation(folder))
    prediction = lookalike_family.predict(unet, unet.config, objective.noisy(x0, noise, timesteps), timesteps,
                                          [texts[c] for c in captions], 1.0, layout, CPU, torch.float32)
    ours = objective.loss(prediction, x0, noise, timesteps, TrainConfig())
    ours.backward()

    encoders = reference_text_encoders(folder, family)
    weights = texts.lora_state_dict()
    for name, encoder in encoders.items():
        encoder.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                       target_modules=TEXT_ENCODER_LAYERS))
        loaded = set_peft_model_state_dict(encoder, {text_layer_in_model(encoder, k.removeprefix(f"{name}.")): v
                                                     for k, v in weights.items() if k.split(".", 1)[0] == name})
        assert not loaded.unexpected_keys
    unet.zero_grad()
    reference = reference_loss(folder, family, unet, captions, latents, noise, timesteps, 64, encoders=encoders)
    reference.backward()
    print(f"{family} with its text encoders trained: lookalike {ours.item():.8f}, reference script "
          f"{reference.item():.8f}, difference {abs(ours.item() - reference.item()):.2e}")
    assert abs(ours.item() - reference.item()) < 1e-5
    compared = 0
    for name, encoder in encoders.items():
        for key, parameter in encoder.named_parameters():
            if parameter.requires_grad:
                ours_grad = texts.encoders[name].get_parameter(key).grad
                torch.testing.assert_close(ours_grad, parameter.grad, rtol=1e-4, atol=1e-7)
                compared += 1
    assert compared == 8 * len(encoders) * 2, "q, k, v and out of both tiny layers, A and B, in every encoder"
    assert any(parameter.grad.abs().max() > 0 for parameter in texts.parameters())


def test_misuse_is_refused_by_name(tiny_config):
    with pytest.raises(LookalikeError, match="trains the text encoders of SD 1.x and SDXL only .* flux1's"):
        TrainedTextEncoders(resolve_base("tiny"), folder_family(resolve_base("tiny")),
                            TrainConfig(train_text_encoder=True), CPU, torch.float32, 32)
    with pytest.raises(LookalikeError, match="text_encoder_lr is set, and train_text_encoder is false"):
        load_config(tiny_config(train={"text_encoder_lr": 1e-5}))
    with pytest.raises(LookalikeError, match="train_text_encoder = true holds the text encoders whole in every "
                                             "process, and shard"):
        load_config(tiny_config(train={"train_text_encoder": True, "shard": True}))
    with pytest.raises(LookalikeError, match="text_encoder_lr cannot be combined with optimizer = 'prodigy'"):
        load_config(tiny_config(train={"train_text_encoder": True, "text_encoder_lr": 1.0, "optimizer": "prodigy",
                                       "learning_rate": 1.0}))


def test_a_sweep_over_text_encoder_training_names_its_runs_shortly():
    from lookalike.sweep.designs import experiment_name

    assert experiment_name({"train_text_encoder": True, "text_encoder_lr": 5e-6}) == "teTrue-telr5e-06"


def test_init_lora_starts_the_text_encoders_too_and_refuses_a_run_that_does_not_train_them(tmp_path):
    folder = resolve_base("tiny-sd15")
    texts = text_encoders_with_a_lora(folder, rank=4)
    unet = denoiser_with_a_lora(folder, "unet")
    source = tmp_path / "with-text.safetensors"
    save_lora(source, {**lora_state_dict(unet), **texts.lora_state_dict()}, unet.peft_config["default"],
              {"base_model": "tiny-sd15"}, text_encoder_configs=texts.configs)
    fresh_unet = denoiser_with_a_lora(folder, "unet")
    with pytest.raises(LookalikeError, match="holds a LoRA of the text_encoder too, which this run does not train: "
                                             "set train.train_text_encoder = true"):
        start_from(fresh_unet, "unet", source, source, 4, 4.0)
    torch.manual_seed(3)
    started = TrainedTextEncoders(folder, folder_family(folder), TrainConfig(rank=8, alpha=2.0,
                                                                             train_text_encoder=True),
                                  CPU, torch.float32, 77)
    start_from(fresh_unet, "unet", source, source, 8, 2.0, started.encoders)
    expected, got = texts.lora_state_dict(), started.lora_state_dict()
    for name, (down, up) in modules_of(expected, "text_encoder").items():  # the source's scale 1, the run's 1/4
        new_down, new_up = modules_of(got, "text_encoder")[name]
        torch.testing.assert_close(new_up.double() @ new_down.double() * (2.0 / 8), up.double() @ down.double(),
                                   rtol=1e-6, atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("family", TINY)
def test_a_run_that_trains_its_text_encoders_draws_what_the_stock_pipeline_draws(tiny_config, tmp_path, family):
    base = TINY[family]
    lora, ours = train_sampled_run(tiny_config, base, train_text_encoder=True, text_encoder_lr=5e-3)
    tensors = load_file(lora)
    encoders = ["text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    assert sorted({key.split(".", 1)[0] for key in tensors}) == sorted(["unet", *encoders])
    with_lora = stock_image(base, lora, guidance_scale=4.0)
    assert np.abs(ours - with_lora).max() <= 1, "within 1/255 of the stock pipeline with the LoRA"
    unet_only = tmp_path / "unet-only.safetensors"
    save_file({k: v for k, v in tensors.items() if k.startswith("unet.")}, str(unet_only))
    assert np.abs(with_lora - stock_image(base, unet_only, guidance_scale=4.0)).max() > 1, \
        "the text encoders' LoRA changes the image"

    kohya = export_lora(lora, tmp_path / "kohya.safetensors", "kohya")
    prefixes = {"sd1": ["lora_te", "lora_unet"], "sdxl": ["lora_te1", "lora_te2", "lora_unet"]}[family]
    assert sorted({key.split("_text_model_")[0] if "_text_model_" in key else "lora_unet"
                   for key in load_file(kohya)}) == prefixes
    assert np.abs(ours - stock_image(base, kohya, guidance_scale=4.0)).max() <= 1, \
        "the kohya file, text encoders included, draws the same image"
    halves = merge_loras(lora, lora, tmp_path / "halves.safetensors", (0.5, 0.5))
    assert np.abs(ours - stock_image(base, halves, guidance_scale=4.0)).max() <= 1, \
        "half of it plus half of it is it, text encoders included"


@pytest.mark.slow
def test_a_killed_run_that_trains_its_text_encoder_resumes_exactly(tiny_config):
    path = tiny_config(model={"base": "tiny-sd15"}, train={"max_train_steps": 40, "checkpoint_every": 10,
                                                           "learning_rate": 1e-3, "train_text_encoder": True,
                                                           "text_encoder_lr": 5e-4, "caption_dropout": 0.2})
    assert_a_killed_run_resumes_exactly(path, steps=40, killed_after="step-000010")


def test_a_run_that_trains_its_text_encoders_caches_no_caption(tiny_config, monkeypatch):
    """Its captions are encoded by the text encoders as they learn: the cache's text encoders never load."""
    from lookalike.train.trainer import train

    def cached(*args, **kwargs):
        raise AssertionError("a run that trains its text encoders encoded captions into the cache")

    monkeypatch.setattr(EmbeddingCache, "texts", cached)
    config = load_config(tiny_config(model={"base": "tiny-sd15"}, train={"max_train_steps": 2,
                                                                         "train_text_encoder": True}))
    assert train(config, "r").is_file()


def test_the_dry_run_counts_the_text_encoders_a_run_trains(tiny_config, monkeypatch, tmp_path):
    """On the tiny SDXL, against the encoders as the run holds them; on the hub's SDXL from its published configs
    (OpenAI's CLIP ViT-L/14 text model, 123.1 M, and OpenCLIP ViT-bigG/14's, 694.7 M), with nothing downloaded."""
    from lookalike.train.memory import GB, estimate

    config = load_config(tiny_config(model={"base": "tiny-sdxl"}, train={"train_text_encoder": True}))
    plain = estimate(config.with_train({"train_text_encoder": False}, "test"), "no")
    counted = estimate(config, "no")
    texts = TrainedTextEncoders(resolve_base("tiny-sdxl"), folder_family(resolve_base("tiny-sdxl")), config.train,
                                CPU, torch.float32, 77)
    frozen = sum(p.numel() for encoder in texts.encoders.values() for p in encoder.parameters()
                 if not p.requires_grad)
    lora = sum(p.numel() for p in texts.parameters())
    assert counted.text_encoder_parameters == frozen
    assert counted.total - plain.total == pytest.approx((frozen * 4 + lora * (4 + 4 + 8)) / GB)
    assert any(line.startswith("text encoders") for line in counted.lines())

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: anything read from the hub would fail
    hub = estimate(load_config(tiny_config(model={"base": "sdxl"}, train={"train_text_encoder": True})), "bf16")
    assert hub.text_encoder_parameters / 1e6 == pytest.approx(123.1 + 694.7, abs=0.2)
    assert not (tmp_path / "hf").exists()
