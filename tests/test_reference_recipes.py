"""Every base trains at its diffusers reference script's recipe and draws at its pipeline's (or model card's) settings
when the study leaves them unset: the noise levels, the VAE posterior, the diffusers preset, the guidance scale.
Each reference below is transcribed from the script or the stock pipeline (named beside it), never from lookalike's
own constants; where lookalike keeps a deliberate difference (docs/bases.md), the script's value is set on
lookalike's side and the comparison made there."""

from __future__ import annotations

import inspect
import re

import numpy as np
import pytest
import torch
from PIL import Image

from lookalike.config import load_config
from lookalike.errors import LookalikeError
from lookalike.models.base import guidance_scales, resolve_base, text_encoding
from lookalike.models.card import card_plan, write_card
from lookalike.models.families import FAMILIES, KNOWN_BASES
from lookalike.models.families.interface import TextEncoding
from lookalike.train.cache import EmbeddingCache, LatentStats
from lookalike.train.objectives import family_objective
from lookalike.train.reference_recipe import with_reference_recipe
from lookalike.workspace import Workspace, read_json
from tests.conftest import run_in_process
from tests.helpers import denoiser_with_a_lora, stock_image, train_sampled_run
from tests.references import (
    flux1_reference_loss,
    flux2_reference_loss,
    krea2_reference_loss,
    qwen_image21_reference_loss,
    qwen_image_reference_loss,
    sd3_reference_loss,
    z_image_reference_loss,
)
from tests.references import reference_loss as stable_diffusion_reference_loss

CPU = torch.device("cpu")
TINY = {"flux1": "tiny", "flux2": "tiny-flux2-klein", "flux2-dev": "tiny-flux2-dev", "z-image": "tiny-z-image",
        "qwen-image": "tiny-qwen-image", "qwen-image21": "tiny-qwen-image21", "krea2": "tiny-krea2", "sd3": "tiny-sd3",
        "sd1": "tiny-sd15", "sdxl": "tiny-sdxl"}
FLOW_MATCHING = [family for family in TINY if family not in ("sd1", "sdxl")]

# Each flow-matching script's --weighting_scheme default (argparse, diffusers examples/dreambooth/), which draws u:
# "none" draws it uniformly. And what its training loop encodes photos to: vae.encode(pixels).latent_dist.sample()
# or .mode(). (The DDPM scripts, train_dreambooth_lora.py and _sdxl.py, draw torch.randint timesteps on sampled
# latents.)
SCRIPT = {
    "flux1": ("train_dreambooth_lora_flux.py", "none", "sample"),
    "flux2": ("train_dreambooth_lora_flux2_klein.py", "none", "mode"),
    "flux2-dev": ("train_dreambooth_lora_flux2.py", "none", "mode"),
    "z-image": ("train_dreambooth_lora_z_image.py", "none", "mode"),
    "qwen-image": ("train_dreambooth_lora_qwen_image.py", "none", "sample"),
    "qwen-image21": ("train_dreambooth_lora_qwenimage21.py", "none", "sample"),
    "krea2": ("train_dreambooth_lora_krea2.py", "none", "sample"),
    "sd3": ("train_dreambooth_lora_sd3.py", "logit_normal", "sample"),
}
# The scripts' --guidance_scale default (3.5), fed to a guidance-distilled transformer while training; lookalike
# trains at 1.0 by choice (train.guidance), so the comparison at the defaults sets the script's value.
SCRIPT_TRAINING_GUIDANCE = 3.5


def script_sigmas(folder, weighting_scheme: str, count: int) -> torch.Tensor:
    """The script's noise levels, drawn from torch's global generator as the script does: u from diffusers'
    compute_density_for_timestep_sampling (--logit_mean 0, --logit_std 1, --mode_scale 1.29), indices
    (u * num_train_timesteps).long() into its noise_scheduler_copy's timesteps, and get_sigmas' sigma of each
    (the scheduler's own sigmas, loaded from the base as the script loads it). Its timesteps are distinct, so the
    sigma get_sigmas finds for timesteps[index] is sigmas[index]."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    assert len(set(scheduler.timesteps.tolist())) == len(scheduler.timesteps)
    u = compute_density_for_timestep_sampling(weighting_scheme=weighting_scheme, batch_size=count, logit_mean=0.0,
                                              logit_std=1.0, mode_scale=1.29)
    return scheduler.sigmas[(u * scheduler.config.num_train_timesteps).long()]


def default_train(tiny_config, family: str, **model):
    """A study's [train] on the family's tiny base at every default (and [model] `model`), with the unset recipe keys
    filled in as the trainer fills them; and its [model]."""
    folder = resolve_base(TINY[family])
    config = load_config(tiny_config(model={"base": TINY[family], **model}))
    return with_reference_recipe(config.train, FAMILIES[family], folder), folder, config.model


@pytest.mark.parametrize("family", FLOW_MATCHING)
def test_the_default_noise_levels_are_drawn_as_the_reference_script_draws_them(tiny_config, family):
    """100,000 levels each: lookalike's at the defaults against the script's sampling, quantile by quantile, within
    sampling error (a quantile's standard error at n = 100,000 is below 0.002 here)."""
    t, folder, _ = default_train(tiny_config, family)
    objective = family_objective(FAMILIES[family], folder)
    ours = objective.draw(torch.Size([100_000, 1]), torch.Generator().manual_seed(1), t)[1]
    torch.manual_seed(2)
    theirs = script_sigmas(folder, SCRIPT[family][1], 100_000)
    quantiles = torch.tensor([0.1, 0.5, 0.9])
    ours_q, theirs_q = torch.quantile(ours, quantiles), torch.quantile(theirs, quantiles)
    print(f"{family}: sigma 10/50/90 % lookalike {[round(q, 3) for q in ours_q.tolist()]}, "
          f"{SCRIPT[family][0]} {[round(q, 3) for q in theirs_q.tolist()]}")
    torch.testing.assert_close(ours_q, theirs_q, atol=0.01, rtol=0)


def test_sd3_and_z_image_train_at_high_noise_as_their_scripts_do(tiny_config):
    """The published figures: SD3's script (logit-normal on a grid shifted by 3) has its median level at 0.75, and
    Z-Image's (uniform, shifted by 3) 0.25 / 0.75 / 0.96 at 10 / 50 / 90 %: where identity and composition are set."""
    expected = {"sd3": [0.46, 0.75, 0.92], "z-image": [0.25, 0.75, 0.96]}
    for family, quantiles in expected.items():
        t, folder, _ = default_train(tiny_config, family)
        objective = family_objective(FAMILIES[family], folder)
        sigmas = objective.draw(torch.Size([100_000, 1]), torch.Generator().manual_seed(0), t)[1]
        torch.testing.assert_close(torch.quantile(sigmas, torch.tensor([0.1, 0.5, 0.9])), torch.tensor(quantiles),
                                   atol=0.01, rtol=0)


def test_a_recipe_key_the_study_sets_wins(tiny_config):
    config = load_config(tiny_config(model={"base": "tiny-z-image"},
                                     train={"timestep_sampling": "logit_normal", "timestep_shift": 1.0,
                                            "vae_posterior": "sample"}))
    t = with_reference_recipe(config.train, FAMILIES["z-image"], resolve_base("tiny-z-image"))
    assert (t.timestep_sampling, t.timestep_shift, t.vae_posterior) == ("logit_normal", 1.0, "sample")


def script_layout_noise(family: str, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise as the script draws it, torch.randn_like of its model_input; the same values as lookalike lays them
    out): FLUX.2 draws it beside 2x2 patches, the Qwen-Image VAE families beside one-frame latents, and FLUX.1,
    FLUX.2, Qwen-Image and 2.1 pack it into tokens with their pipelines' _pack_latents."""
    from diffusers import Flux2KleinPipeline, FluxPipeline, QwenImage21Pipeline, QwenImagePipeline

    batch, channels, height, width = latents.shape
    if family.startswith("flux2"):
        noise = torch.randn(batch, channels * 4, height // 2, width // 2)
        return noise, Flux2KleinPipeline._pack_latents(noise)
    if family in ("qwen-image", "krea2", "qwen-image21"):
        noise = torch.randn(batch, channels, 1, height, width)
        pack = QwenImage21Pipeline._pack_latents if family == "qwen-image21" else QwenImagePipeline._pack_latents
        return noise, pack(noise[:, :, 0], batch, channels, height, width)
    noise = torch.randn(latents.shape)
    if family == "flux1":
        return noise, FluxPipeline._pack_latents(noise, batch, channels, height, width)
    return noise, noise


def reference_loss(family: str, folder, transformer, captions, latents, noise, levels,
                   text_encoder_out_layers=None) -> torch.Tensor:
    """The family's script's loss of one batch (tests/test_families.py and its neighbours transcribe them);
    text_encoder_out_layers: FLUX.2 [klein]'s script's argument, where the test sets it."""
    if family == "flux1":
        from transformers import CLIPTextModel, T5EncoderModel

        encoders = {"text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
                    "text_encoder_2": T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_2")}
        return flux1_reference_loss(folder, transformer, encoders, captions, latents, noise, levels,
                                    SCRIPT_TRAINING_GUIDANCE)
    if family in ("sd1", "sdxl"):
        return stable_diffusion_reference_loss(folder, family, transformer, captions, latents, noise, levels, 64)
    if family == "flux2-dev":
        return flux2_reference_loss(folder, transformer, captions, latents, noise, levels, dev=True)
    if family == "flux2":
        return flux2_reference_loss(folder, transformer, captions, latents, noise, levels,
                                    text_encoder_out_layers=text_encoder_out_layers)
    return {"z-image": z_image_reference_loss, "qwen-image": qwen_image_reference_loss,
            "qwen-image21": qwen_image21_reference_loss, "krea2": krea2_reference_loss,
            "sd3": sd3_reference_loss}[family](folder, transformer, captions, latents, noise, levels)


# FLUX.2 [klein]'s one deliberate difference set to the script's value: train_dreambooth_lora_flux2_klein.py's
# --text_encoder_out_layers default (argparse: nargs="+", default=[10, 20, 30]), which its compute_text_embeddings
# passes to Flux2KleinPipeline.encode_prompt as text_encoder_out_layers.
KLEIN_SCRIPT_TEXT_LAYERS = [10, 20, 30]
AT_THE_DEFAULTS = [(family, {}) for family in TINY] + [("flux2", {"text_encoder_out_layers": KLEIN_SCRIPT_TEXT_LAYERS})]


@pytest.mark.parametrize("family, model", AT_THE_DEFAULTS,
                         ids=[family + ("-script-text-layers" if model else "") for family, model in AT_THE_DEFAULTS])
def test_the_loss_at_the_defaults_equals_the_reference_scripts_on_one_batch(tiny_config, tmp_path, family, model):
    """One batch at every default (no pinned noise level, posterior or guidance): lookalike draws the photos'
    latents, the noise and the levels from one generator seeded with 7, the script from torch's global generator
    seeded with 7 (its --seed), in the script's order (posterior, noise, levels), and both draw the same latents and
    levels. The noise is the same draw too, in another order: the script draws it beside its latents (or patches)
    and packs it into tokens, lookalike draws it in token order. The losses are compared on the script's noise, packed
    as lookalike lays it out."""
    t, folder, model_config = default_train(tiny_config, family, **model)
    if family in ("flux1", "flux2-dev"):  # lookalike trains distilled guidance at 1.0 by choice: set the script's
        t = t.model_copy(update={"guidance": SCRIPT_TRAINING_GUIDANCE})
    lookalike_family = FAMILIES[family]
    denoiser = denoiser_with_a_lora(folder, lookalike_family.denoiser)
    captions = ["a photo of sks man", "sks"]
    channels = 4 if family in ("sd1", "sdxl") else denoiser.config.in_channels // (
        1 if family in ("z-image", "sd3", "qwen-image21") else 4)
    # The photos' VAE posterior, as diffusers' DiagonalGaussianDistribution holds it (mean and log-variance).
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    parameters = torch.cat([torch.randn(2, channels, 8, 8, generator=torch.Generator().manual_seed(3)),
                            torch.full((2, channels, 8, 8), -3.0)], dim=1)
    posterior = DiagonalGaussianDistribution(parameters)

    generator = torch.Generator().manual_seed(7)
    x0 = torch.stack([LatentStats(posterior.mean[i], posterior.std[i]).latent(generator, t.vae_posterior)
                      for i in range(2)])
    x0_in, layout = lookalike_family.model_input(x0, lookalike_family.latent_normalisation(folder))
    objective = family_objective(lookalike_family, folder)
    our_noise, levels = objective.draw(x0_in.shape, generator, t)

    torch.manual_seed(7)  # the script's draws
    latents = posterior.mode() if family in SCRIPT and SCRIPT[family][2] == "mode" else posterior.sample()
    noise, packed_noise = script_layout_noise(family, latents)
    if family in SCRIPT:
        script_levels = script_sigmas(folder, SCRIPT[family][1], 2)
    else:  # train_dreambooth_lora.py / _sdxl.py: torch.randint(0, num_train_timesteps, (bsz,))
        script_levels = torch.randint(0, 1000, (2,))
    torch.testing.assert_close(x0, latents, rtol=0, atol=0)
    torch.testing.assert_close(levels, script_levels, rtol=0, atol=0)
    torch.testing.assert_close(our_noise.flatten().sort().values, noise.flatten().sort().values, rtol=0, atol=0)

    # The scripts' text length pinned to the tiny encoders' (32 tokens; SD's CLIP: its 77); the layers as the study
    # sets them.
    text = TextEncoding(32 if family in SCRIPT else 77, text_encoding(model_config).layers)
    texts = EmbeddingCache(tmp_path / "cache", folder, CPU, torch.float32).texts(captions, text)
    with torch.no_grad():
        noisy = objective.noisy(x0_in, packed_noise, levels)
        prediction = lookalike_family.predict(denoiser, denoiser.config, noisy, levels, [texts[c] for c in captions],
                                              t.guidance, layout, CPU, torch.float32)
        ours = objective.loss(prediction, x0_in, packed_noise, levels, t).item()
        reference = reference_loss(family, folder, denoiser, captions, latents, noise, levels, **model).item()
    print(f"{family} at the defaults{' and ' + str(model) if model else ''}: levels "
          f"{[round(v, 4) for v in levels.tolist()]}, posterior's "
          f"{t.vae_posterior}; loss lookalike {ours:.8f}, reference script {reference:.8f}, "
          f"difference {abs(ours - reference):.2e}")
    assert abs(ours - reference) < 1e-5


def stock_guidance_default(family) -> float:
    """The guidance scale the family's stock pipeline's __call__ defaults to (guidance_scale; true_cfg_scale for
    Qwen-Image and 2.1), read from diffusers itself."""
    parameters = inspect.signature(family.pipeline_class().__call__).parameters
    return parameters["true_cfg_scale" if family.name.startswith("qwen-image") else "guidance_scale"].default


def test_each_familys_guidance_is_its_stock_pipelines_default():
    """The scale a base of the family draws at unless its model card says otherwise."""
    for family in FAMILIES.values():
        assert family.pipeline_guidance == stock_guidance_default(family), family.name


# Model cards whose example draws at another scale than their pipeline's default: FLUX.1 Krea [dev]'s (4.5),
# SD3.5 Large's (3.5) and SD3.5 Medium's (4.5), on their Hugging Face pages' diffusers examples.
MODEL_CARD_GUIDANCE = {"flux-krea-dev": 4.5, "sd3.5-large": 3.5, "sd3.5-medium": 4.5}


def without_guidance_scales(config):
    """The study with [generate] guidance_scales unset (the test studies set one)."""
    return config.model_copy(update={"generate": config.generate.model_copy(update={"guidance_scales": None})})


def test_every_base_draws_at_its_own_guidance_unless_the_study_sets_one(tiny_config):
    for base, info in KNOWN_BASES.items():
        config = without_guidance_scales(load_config(tiny_config(model={"base": base})))
        expected = MODEL_CARD_GUIDANCE.get(base) or stock_guidance_default(FAMILIES[info.family])
        assert guidance_scales(config) == ([expected] if info.guidance else [None]), base
    study = without_guidance_scales(load_config(tiny_config(model={"base": "tiny"})))
    sweep_run = study.with_experiment({"base": "tiny-sd3"}, "experiment sd3")
    assert (guidance_scales(study), guidance_scales(sweep_run)) == ([3.5], [7.0]), "each base of a sweep at its own"
    assert guidance_scales(load_config(tiny_config(model={"base": "tiny-sd3"}))) == [5.0], "the study's scale wins"


def test_the_flux2_dev_diffusers_preset_is_its_scripts_layers_on_the_published_architecture():
    """train_dreambooth_lora_flux2.py's default target_modules since diffusers PR #13011: to_k, to_q, to_v, to_out.0,
    to_qkv_mlp_proj and single_transformer_blocks.{i}.attn.to_out for each of the 48 single blocks, matched by peft
    on FLUX.2 [dev]'s transformer built on the meta device."""
    from accelerate import init_empty_weights
    from peft import LoraConfig

    from lookalike.models.families.flux2_dev import DEV_TRANSFORMER
    from lookalike.models.lora import add_lora

    family = FAMILIES["flux2-dev"]

    def adapted(target) -> dict[str, int]:
        with init_empty_weights():
            model = family.component_class("transformer").from_config(DEV_TRANSFORMER)
            if isinstance(target, str):
                add_lora(model, 16, 16.0, target)
            else:
                model.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=target))
        return {name: sum(p.numel() for p in module.parameters())
                for name, module in model.named_modules() if name.endswith((".lora_A", ".lora_B"))}

    script = ["to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj",
              *[f"single_transformer_blocks.{i}.attn.to_out" for i in range(DEV_TRANSFORMER["num_single_layers"])]]
    reference, ours = adapted(script), adapted("diffusers")
    assert ours.keys() == reference.keys()
    assert len(ours) // 2 == 128 and round(sum(ours.values()) / 1e6, 1) == 77.1


@pytest.mark.slow
def test_a_klein_run_at_the_scripts_text_layers_draws_at_them_as_the_stock_pipeline_does(tiny_config, monkeypatch):
    """[model] text_encoder_out_layers reaches every place a prompt is encoded: training (the one-batch test above),
    generate (its image within 1/255 of Flux2KleinPipeline's with text_encoder_out_layers and load_lora_weights, and
    its settings record the layers), drawing (render at the study's text encoding equal to the stock pipeline at
    those layers; on the tiny model the layers move pixels by less than 1/255, so this is compared in floats), and
    the model card's code, which draws the card's first image."""
    from lookalike.generate import render

    layers = {"text_encoder_out_layers": KLEIN_SCRIPT_TEXT_LAYERS}
    lora, ours = train_sampled_run(tiny_config, "tiny-flux2-klein", model=layers)
    stock = {"guidance_scale": 4.0, "max_sequence_length": 32}
    assert np.abs(ours - stock_image("tiny-flux2-klein", lora, **stock, **layers)).max() <= 1
    config = load_config(tiny_config(model={"base": "tiny-flux2-klein", **layers}))
    run = Workspace(config.workspace).run("r")
    assert read_json(run.images / "p00_s0.json")["settings"]["text_encoder_out_layers"] == [10, 20, 30]

    pipe = FAMILIES["flux2"].pipeline_class().from_pretrained(resolve_base("tiny-flux2-klein"))
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    pipe.set_progress_bar_config(disable=True)
    drawn = {"prompt": "a photo of sks", "height": 64, "width": 64, "num_inference_steps": 3, "output_type": "np"}
    ours = render(pipe, seed=0, guidance=None, steps=3, size=64, text=text_encoding(config.model),
                  prompt="a photo of sks", output_type="np")
    at_script_layers = pipe(**drawn, **layers, max_sequence_length=32,
                            generator=torch.Generator("cpu").manual_seed(0)).images[0]
    at_pipeline_layers = pipe(**drawn, max_sequence_length=32,
                              generator=torch.Generator("cpu").manual_seed(0)).images[0]
    assert np.abs(ours - at_script_layers).max() == 0
    assert np.abs(ours - at_pipeline_layers).max() > 1e-3, "the layers change the image"

    card = write_card(config, run, "final", lora, "diffusers", card_plan(run, "final", lora))
    code = re.search(r"```python\n(.*?)```", card.read_text(), re.S).group(1)
    assert "text_encoder_out_layers=(10, 20, 30)" in code
    monkeypatch.chdir(lora.parent)
    scope: dict = {}
    exec(code, scope)
    first = np.asarray(Image.open(run.images / "p00_s0.png")).astype(int)
    assert np.abs(np.asarray(scope["image"]).astype(int) - first).max() <= 1


def test_text_layers_are_refused_by_name_where_the_base_stacks_none_or_another_count(tiny_config):
    for model, message in [({"base": "tiny"}, "model.text_encoder_out_layers: tiny is a flux1 base, whose pipeline "
                                              "stacks no text-encoder layers"),
                           ({"base": "tiny-flux2-klein", "text_encoder_out_layers": [10, 20]},
                            r"model.text_encoder_out_layers: \[10, 20\] must be 3 layer numbers")]:
        path = tiny_config(model={"text_encoder_out_layers": [1, 2, 3], **model})
        with pytest.raises(LookalikeError, match=message):
            text_encoding(load_config(path).model)
        result = run_in_process("generate", str(path))
        assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(
            "error: model.text_encoder_out_layers"), result.stderr
    beyond = tiny_config(model={"base": "tiny-flux2-klein", "text_encoder_out_layers": [10, 20, 32]})
    result = run_in_process("generate", str(beyond))  # the tiny encoder's hidden states are numbered 0 to 31
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        "error: model.text_encoder_out_layers: [10, 20, 32] reads beyond this base's text encoder, whose hidden states "
        "are numbered 0 to 31"), result.stderr
