"""train.train_text_encoder (FLUX.1's CLIP, SD 1.x, SDXL, SD3's CLIPs): a LoRA on the text encoders too. The loss
and the text encoders' gradients equal the reference scripts' (--train_text_encoder) on one fixed batch; a trained
run draws what the stock pipeline draws with the file loaded (its text encoders' part included, and it matters), in
kohya's layout (where there is one) and merged too; a killed run resumes exactly; init_lora carries the text
encoders' part; misuse is refused."""

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
from lookalike.models.families.interface import TextEncoding
from lookalike.models.lora import lora_state_dict, modules_of, save_lora, text_layer_in_model
from lookalike.models.merge import merge_loras
from lookalike.train.cache import EmbeddingCache
from lookalike.train.flow_matching import noisy_latents, velocity_target
from lookalike.train.init_lora import read_start, start_from
from lookalike.train.objectives import family_objective
from lookalike.train.text_encoders import TEXT_ENCODER_LAYERS, TrainedTextEncoders
from lookalike.train.trainer import train
from tests.helpers import assert_a_killed_run_resumes_exactly, denoiser_with_a_lora, stock_image, train_sampled_run
from tests.references import flux1_reference_loss, reference_loss, reference_text_encoders, sd3_reference_loss

TINY = {"sd1": "tiny-sd15", "sdxl": "tiny-sdxl"}  # FLUX.1's CLIPs and SD3's have tests of their own here
CPU = torch.device("cpu")


def text_encoders_with_a_lora(folder, rank: int = 4, tokens: int = 77) -> TrainedTextEncoders:
    """The base's text encoders with a seeded LoRA that changes something (peft starts its B matrices at zero)."""
    torch.manual_seed(0)
    texts = TrainedTextEncoders(folder, folder_family(folder), TrainConfig(rank=rank, train_text_encoder=True), CPU,
                                torch.float32, TextEncoding(tokens))
    with torch.no_grad():
        for encoder in texts.encoders.values():
            for name, parameter in encoder.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.05)
    return texts


CAPTIONS = ["a photo of sks man", "sks"]


def with_the_scripts_lora(encoder, name: str, weights: dict) -> None:
    """Give a reference text encoder the scripts' LoraConfig (q, k, v and out projections, rank 4, alpha = rank),
    set to lookalike's weights for that component (every one of them taken)."""
    encoder.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TEXT_ENCODER_LAYERS))
    loaded = set_peft_model_state_dict(encoder, {text_layer_in_model(encoder, k.removeprefix(f"{name}.")): v
                                                 for k, v in weights.items() if k.split(".", 1)[0] == name})
    assert not loaded.unexpected_keys


def backpropagated_loss(folder, denoiser, texts, channels: int, levels):
    """lookalike's loss on one fixed batch (unpacked latents of `channels`, noise, the two CAPTIONS through the text
    encoders' LoRA), backpropagated: (the loss, the latents, the noise)."""
    family = folder_family(folder)
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, channels, 8, 8, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    objective = family_objective(family, folder)
    x0, layout = family.model_input(latents, family.latent_normalisation(folder))
    prediction = family.predict(denoiser, denoiser.config, objective.noisy(x0, noise, levels), levels,
                                [texts[c] for c in CAPTIONS], 1.0, layout, CPU, torch.float32)
    loss = objective.loss(prediction, x0, noise, levels, TrainConfig())
    loss.backward()
    return loss, latents, noise


@pytest.mark.parametrize("family", TINY)
def test_the_loss_and_the_text_encoders_gradients_equal_the_reference_scripts(family):
    """One fixed batch: lookalike's loss through its text encoders' LoRA (the pipeline's encode_prompt) and its
    gradients on that LoRA, against the scripts' computation: their LoraConfig on the text encoders' q, k, v and
    out projections, with the same weights, and their own prompt encoding."""
    folder = resolve_base(TINY[family])
    texts = text_encoders_with_a_lora(folder)
    unet = denoiser_with_a_lora(folder, "unet")
    timesteps = torch.tensor([100, 700])
    ours, latents, noise = backpropagated_loss(folder, unet, texts, 4, timesteps)

    encoders = reference_text_encoders(folder, family)
    weights = texts.lora_state_dict()
    for name, encoder in encoders.items():
        with_the_scripts_lora(encoder, name, weights)
    unet.zero_grad()
    reference = reference_loss(folder, family, unet, CAPTIONS, latents, noise, timesteps, 64, encoders=encoders)
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


def test_flux1s_loss_and_its_clip_gradients_equal_the_reference_scripts():
    """FLUX.1's --train_text_encoder trains its CLIP (T5 stays frozen): the same one-batch check."""
    from diffusers import FluxPipeline
    from transformers import CLIPTextModel, T5EncoderModel

    folder = resolve_base("tiny")
    family = folder_family(folder)
    texts = text_encoders_with_a_lora(folder, tokens=32)
    transformer = denoiser_with_a_lora(folder, "transformer")
    captions = CAPTIONS
    generator = torch.Generator().manual_seed(1)
    channels = transformer.config.in_channels // 4
    latents = torch.randn(2, channels, 8, 8, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    sigmas = torch.tensor([0.3, 0.8])
    x0, layout = family.model_input(latents, family.latent_normalisation(folder))
    packed_noise = FluxPipeline._pack_latents(noise, 2, channels, 8, 8)
    prediction = family.predict(transformer, transformer.config, noisy_latents(x0, packed_noise, sigmas), sigmas,
                                [texts[c] for c in captions], 3.5, layout, CPU, torch.float32)
    ours = torch.nn.functional.mse_loss(prediction, velocity_target(x0, packed_noise))
    ours.backward()
    assert not any(p.requires_grad for p in texts.pipe.text_encoder_2.parameters()), "T5 stays frozen"

    clip = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    with_the_scripts_lora(clip, "text_encoder", texts.lora_state_dict())
    t5 = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_2")
    encoders = {"text_encoder": clip, "text_encoder_2": t5}
    transformer.zero_grad()
    reference = flux1_reference_loss(folder, transformer, encoders, captions, latents, noise, sigmas, 3.5)
    reference.backward()
    print(f"flux1 with its CLIP trained: lookalike {ours.item():.8f}, reference script {reference.item():.8f}, "
          f"difference {abs(ours.item() - reference.item()):.2e}")
    assert abs(ours.item() - reference.item()) < 1e-5
    for key, parameter in clip.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(texts.encoders["text_encoder"].get_parameter(key).grad, parameter.grad,
                                       rtol=1e-4, atol=1e-7)


def test_misuse_is_refused_by_name(tiny_config):
    refusal = "trains the text encoders of the bases of flux1, sd1, sd3, sdxl .* this base is flux2's"
    with pytest.raises(LookalikeError, match=refusal):
        TrainedTextEncoders(resolve_base("tiny-flux2-klein"), folder_family(resolve_base("tiny-flux2-klein")),
                            TrainConfig(train_text_encoder=True), CPU, torch.float32, 32)
    klein = load_config(tiny_config(model={"base": "tiny-flux2-klein"}, train={"train_text_encoder": True}))
    with pytest.raises(LookalikeError, match=refusal):
        train(klein, "r")  # before anything is encoded
    assert not (klein.workspace / "cache").exists()
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
        read_start(source, source, 4, "tiny-sd15", trains_text_encoders=False)
    torch.manual_seed(3)
    started = TrainedTextEncoders(folder, folder_family(folder), TrainConfig(rank=8, alpha=2.0,
                                                                             train_text_encoder=True),
                                  CPU, torch.float32, 77)
    start = read_start(source, source, 8, "tiny-sd15", trains_text_encoders=True)
    start_from(fresh_unet, "unet", start, source, 8, 2.0, started.encoders)
    expected, got = texts.lora_state_dict(), started.lora_state_dict()
    for name, (down, up) in modules_of(expected, "text_encoder").items():  # the source's scale 1, the run's 1/4
        new_down, new_up = modules_of(got, "text_encoder")[name]
        torch.testing.assert_close(new_up.double() @ new_down.double() * (2.0 / 8), up.double() @ down.double(),
                                   rtol=1e-6, atol=1e-9)


@pytest.mark.slow
def test_sd3s_loss_and_its_clip_gradients_equal_the_reference_scripts():
    """SD3's --train_text_encoder trains both CLIPs (T5 stays frozen): the same one-batch check, against the
    script's own prompt encoding through the CLIPs with its LoraConfig and lookalike's weights."""
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    folder = resolve_base("tiny-sd3")
    texts = text_encoders_with_a_lora(folder, tokens=32)
    transformer = denoiser_with_a_lora(folder, "transformer")
    sigmas = torch.tensor([0.3, 0.8])
    ours, latents, noise = backpropagated_loss(folder, transformer, texts, 16, sigmas)
    assert not any(p.requires_grad for p in texts.pipe.text_encoder_3.parameters()), "T5 stays frozen"

    encoders = {"text_encoder_3": T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_3")}
    weights = texts.lora_state_dict()
    for name in ("text_encoder", "text_encoder_2"):
        clip = encoders[name] = CLIPTextModelWithProjection.from_pretrained(folder, subfolder=name)
        with_the_scripts_lora(clip, name, weights)
    transformer.zero_grad()
    reference = sd3_reference_loss(folder, transformer, CAPTIONS, latents, noise, sigmas, encoders=encoders)
    reference.backward()
    print(f"sd3 with its CLIPs trained: lookalike {ours.item():.8f}, reference script {reference.item():.8f}, "
          f"difference {abs(ours.item() - reference.item()):.2e}")
    assert abs(ours.item() - reference.item()) < 1e-5
    compared = 0
    for name in ("text_encoder", "text_encoder_2"):
        for key, parameter in encoders[name].named_parameters():
            if parameter.requires_grad:
                torch.testing.assert_close(texts.encoders[name].get_parameter(key).grad, parameter.grad,
                                           rtol=1e-4, atol=1e-7)
                compared += 1
    assert compared == 2 * 8 * 2, "q, k, v and out of both tiny layers, A and B, in both CLIPs"


@pytest.mark.slow
@pytest.mark.parametrize("family", {"flux1": "tiny", **TINY, "sd3": "tiny-sd3"})
def test_a_run_that_trains_its_text_encoders_draws_what_the_stock_pipeline_draws(tiny_config, tmp_path, family):
    base = {"flux1": "tiny", **TINY, "sd3": "tiny-sd3"}[family]
    lora, ours = train_sampled_run(tiny_config, base, train_text_encoder=True, text_encoder_lr=5e-3)
    tensors = load_file(lora)
    denoiser = folder_family(resolve_base(base)).denoiser
    encoders = ["text_encoder"] + (["text_encoder_2"] if family in ("sdxl", "sd3") else [])
    assert sorted({key.split(".", 1)[0] for key in tensors}) == sorted([denoiser, *encoders])
    t5_length = {"max_sequence_length": 32} if family in ("flux1", "sd3") else {}  # the tiny T5's prompt length
    stock = {"guidance_scale": 4.0, **t5_length}
    with_lora = stock_image(base, lora, **stock)
    assert np.abs(ours - with_lora).max() <= 1, "within 1/255 of the stock pipeline with the LoRA"
    denoiser_only = tmp_path / "denoiser-only.safetensors"
    save_file({k: v for k, v in tensors.items() if k.startswith(f"{denoiser}.")}, str(denoiser_only))
    assert np.abs(with_lora - stock_image(base, denoiser_only, **stock)).max() > 1, \
        "the text encoders' LoRA changes the image"

    halves = merge_loras(lora, lora, tmp_path / "halves.safetensors", (0.5, 0.5))
    assert np.abs(ours - stock_image(base, halves, **stock)).max() <= 1, \
        "half of it plus half of it is it, text encoders included"
    if family == "sd3":  # no kohya layout: diffusers' layout, which ComfyUI reads too, keeps every key
        assert load_file(export_lora(lora, tmp_path / "comfyui.safetensors", "comfyui")).keys() == tensors.keys()
        return
    kohya = load_file(export_lora(lora, tmp_path / "kohya.safetensors", "kohya"))
    prefixes = {"flux1": ["lora_te1", "lora_unet"], "sd1": ["lora_te", "lora_unet"],
                "sdxl": ["lora_te1", "lora_te2", "lora_unet"]}[family]
    assert sorted({key.split("_text_model_")[0] if "_text_model_" in key else "lora_unet" for key in kohya}) == prefixes
    for encoder, prefix in folder_family(resolve_base(base)).trainable_text_encoders.items():
        for name, (down, up) in modules_of(tensors, encoder).items():  # one for one: the file's scale is 1
            kohya_name = f"{prefix}_{name.replace('.', '_')}"
            assert torch.equal(kohya[f"{kohya_name}.lora_down.weight"], down)
            assert torch.equal(kohya[f"{kohya_name}.lora_up.weight"], up)
            assert kohya[f"{kohya_name}.alpha"].item() == down.shape[0]
    if family != "flux1":  # diffusers' converter of kohya's FLUX.1 files takes full-size layer widths only
        assert np.abs(ours - stock_image(base, tmp_path / "kohya.safetensors", **stock)).max() <= 1, \
            "the kohya file, text encoders included, draws the same image"


@pytest.mark.slow
def test_a_killed_run_that_trains_its_text_encoder_resumes_exactly(tiny_config):
    path = tiny_config(model={"base": "tiny-sd15"}, train={"max_train_steps": 40, "checkpoint_every": 10,
                                                           "learning_rate": 1e-3, "train_text_encoder": True,
                                                           "text_encoder_lr": 5e-4, "caption_dropout": 0.2})
    assert_a_killed_run_resumes_exactly(path, steps=40, killed_after="step-000010")


def test_a_run_that_trains_its_text_encoders_caches_no_caption(tiny_config, monkeypatch):
    """Its captions are encoded by the text encoders as they learn: the cache's text encoders never load."""
    def cached(*args, **kwargs):
        raise AssertionError("a run that trains its text encoders encoded captions into the cache")

    monkeypatch.setattr(EmbeddingCache, "texts", cached)
    config = load_config(tiny_config(model={"base": "tiny-sd15"}, train={"max_train_steps": 2,
                                                                         "train_text_encoder": True}))
    assert train(config, "r").is_file()


@pytest.mark.slow  # 13 s: the published text encoders built on the meta device
def test_the_dry_run_counts_the_text_encoders_a_run_trains(tiny_config, monkeypatch, tmp_path):
    """On the tiny SDXL, against the encoders as the run holds them; on the hub's SDXL and FLUX.1-dev from their
    published configs (OpenAI's CLIP ViT-L/14 text model, 123.1 M, OpenCLIP ViT-bigG/14's, 694.7 M, T5-XXL's
    encoder), with nothing downloaded."""
    from lookalike.train.memory import GB, estimate, fitting_lines, lighter_settings

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
    # FLUX.1 holds its frozen T5 (google/t5-v1_1-xxl's encoder, 4,893.9 M: its 9.79 GB fp16 file) beside the CLIP.
    flux_config = load_config(tiny_config(model={"base": "flux-dev"}, data={"resolution": 1024},
                                          train={"train_text_encoder": True}))
    flux = estimate(flux_config, "bf16")
    assert flux.text_encoder_parameters / 1e6 == pytest.approx(123.1 + 4893.9, abs=0.2)
    # SD3.5 holds both CLIPs (the first with its 0.6 M projection, CLIPTextModelWithProjection) and its frozen T5.
    sd3 = estimate(load_config(tiny_config(model={"base": "sd3.5-large"}, train={"train_text_encoder": True})), "bf16")
    assert sd3.text_encoder_parameters / 1e6 == pytest.approx(123.1 + 0.6 + 694.7 + 4893.9, abs=0.2)
    lighter = dict(lighter_settings(flux_config, "bf16", flux))
    without = estimate(flux_config.with_train({"train_text_encoder": False}, "test"), "bf16").total
    assert lighter["train.train_text_encoder=false (the captions cached, the text encoders unloaded)"] == \
        pytest.approx(without)
    advice = fitting_lines(flux_config, "bf16", flux, 24)
    assert advice[0].startswith("does not fit a 24 GB GPU") and not any("shard" in line for line in advice), \
        "a run that trains its text encoders is never told to shard, which it cannot"
    assert not (tmp_path / "hf").exists()
