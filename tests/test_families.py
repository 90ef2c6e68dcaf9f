"""The families beyond FLUX.1 (Z-Image, FLUX.2 [klein] and [dev], Qwen-Image and 2.1, Krea 2, SD3), each on a tiny
model of its real classes: the family recognised from a local folder, its diffusers preset equal to its reference
script's default layers, the training objective equal to the computation of diffusers' reference script on one
fixed batch, and generation equal to the stock pipeline with the LoRA file loaded. (FLUX.1 has its own tests.)"""

from __future__ import annotations

import shutil
from functools import partial

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lookalike.config import TrainConfig, load_config
from lookalike.errors import LookalikeError
from lookalike.models.base import base_info, load_component, load_pipeline, resolve_base
from lookalike.models.export import export_lora
from lookalike.models.families import folder_family
from lookalike.models.families.interface import TextEncoding
from lookalike.models.lora import add_lora
from lookalike.train.cache import EmbeddingCache
from lookalike.train.flow_matching import noisy_latents
from lookalike.train.objectives import family_objective
from lookalike.train.trainer import train
from tests.helpers import (
    assert_a_killed_run_resumes_exactly,
    denoiser_with_a_lora,
    stock_arguments,
    stock_image,
    train_sampled_run,
)
from tests.references import (
    TRAINING_GUIDANCE,
    flux2_reference_loss,
    krea2_reference_loss,
    qwen_image21_reference_loss,
    qwen_image_reference_loss,
    sd3_reference_loss,
    z_image_reference_loss,
)

TINY = {"z-image": "tiny-z-image", "flux2": "tiny-flux2-klein", "flux2-dev": "tiny-flux2-dev",
        "qwen-image": "tiny-qwen-image", "qwen-image21": "tiny-qwen-image21", "krea2": "tiny-krea2", "sd3": "tiny-sd3"}
# The layers each reference script adapts by default (--lora_layers unset), by their own rule: a linear layer
# whose name ends in one of these. FLUX.2's scripts (train_dreambooth_lora_flux2.py and _flux2_klein.py, both since
# diffusers PR #13011 "Add train flux2 series lora config", merged 2026-01-21) name to_k, to_q, to_v, to_out.0,
# to_qkv_mlp_proj and each single block's attn.to_out (a double block's attn.to_out is a list, not a linear layer).
FLUX2_SCRIPT_LAYERS = ("to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj", "attn.to_out")
REFERENCE_LAYERS = {"z-image": ("to_k", "to_q", "to_v", "to_out.0"),
                    "flux2": FLUX2_SCRIPT_LAYERS,
                    "flux2-dev": FLUX2_SCRIPT_LAYERS,
                    "qwen-image": ("to_k", "to_q", "to_v", "to_out.0"),
                    "qwen-image21": ("to_k", "to_q", "to_v", "to_out.0"),
                    "krea2": ("img_in", "final_layer.linear", "to_q", "to_k", "to_v", "to_out.0", "to_gate", "ff.up",
                              "ff.down", "text_fusion.projector", "txt_in.linear_1", "txt_in.linear_2",
                              "time_embed.linear_1", "time_embed.linear_2", "time_mod_proj"),
                    "sd3": ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                            "attn.to_out.0", "attn.to_q", "attn.to_v")}


def test_every_family_has_what_the_interface_asks_and_one_that_lacks_a_method_cannot_be_made():
    """Family is an abstract base class: its abstract methods, and the class attributes it (or TransformerFamily)
    declares without a value, are each family's to give."""
    from lookalike.models.families import FAMILIES
    from lookalike.models.families.interface import Family, TransformerFamily

    for family in FAMILIES.values():
        required = [name for cls in type(family).__mro__ if cls in (Family, TransformerFamily)
                    for name in cls.__annotations__ if not hasattr(cls, name)]
        assert required and all(hasattr(family, name) for name in required), family.name

    class Unfinished(TransformerFamily):
        name = "unfinished"

    with pytest.raises(TypeError, match="abstract"):
        Unfinished()


@pytest.mark.parametrize("family", TINY)
def test_a_local_folder_is_recognised_by_its_pipeline_class(tmp_path, family):
    local = tmp_path / "my-base"
    shutil.copytree(resolve_base(TINY[family]), local)
    assert folder_family(local).name == family
    assert base_info(str(local)).family == family
    transformer = load_component(local, "transformer")
    assert type(transformer).__name__ == folder_family(local).components["transformer"][1]


def test_a_distilled_flux2_folder_draws_in_4_steps_without_guidance_and_an_undistilled_one_with_cfg(tmp_path):
    import json

    local = tmp_path / "klein-base"
    shutil.copytree(resolve_base("tiny-flux2-klein"), local)
    assert (base_info(str(local)).steps, base_info(str(local)).guidance) == (4, False)
    index = json.loads((local / "model_index.json").read_text())
    (local / "model_index.json").write_text(json.dumps({**index, "is_distilled": False}))
    assert (base_info(str(local)).steps, base_info(str(local)).guidance) == (50, True)


@pytest.mark.parametrize("family", TINY)
def test_the_diffusers_preset_is_the_reference_scripts_default_layers(family):
    folder = resolve_base(TINY[family])
    transformer = load_component(folder, "transformer")
    add_lora(transformer, 2, 2.0, "diffusers")
    adapted = sorted(name.removesuffix(".lora_A.default") for name, _ in transformer.named_modules()
                     if name.endswith(".lora_A.default"))
    reference = sorted(name for name, module in load_component(folder, "transformer").named_modules()
                       if isinstance(module, torch.nn.Linear) and name.endswith(REFERENCE_LAYERS[family]))
    assert adapted == reference and adapted


@pytest.mark.parametrize("family", TINY)
def test_the_training_objective_equals_the_reference_scripts_on_one_batch(tmp_path, family):
    """One fixed batch (VAE latents, noise, sigmas, two captions): lookalike's loss, from its cached embeddings
    and the family's transformer call, against the loss as the reference script computes it from the stock
    pipeline's own prompt encoding."""
    folder = resolve_base(TINY[family])
    lookalike_family = folder_family(folder)
    transformer = denoiser_with_a_lora(folder, "transformer")
    captions = ["a photo of sks man", "sks"]
    generator = torch.Generator().manual_seed(1)
    unpacked = ("z-image", "sd3", "qwen-image21")
    channels = transformer.config.in_channels // (1 if family in unpacked else 4)  # the others pack 2x2
    latents = torch.randn(2, channels, 8, 8, generator=generator)  # as the VAE gives them, before normalisation
    sigmas = torch.tensor([0.3, 0.8])

    cache = EmbeddingCache(tmp_path / "cache", folder, torch.device("cpu"), torch.float32)
    texts = cache.texts(captions, TextEncoding(32))
    x0, layout = lookalike_family.model_input(latents, lookalike_family.latent_normalisation(folder))
    if family.startswith("flux2"):  # the script draws noise beside the unpacked patches; lookalike beside its tokens
        from diffusers import Flux2KleinPipeline

        noise = torch.randn(2, channels * 4, 4, 4, generator=generator)
        packed_noise = Flux2KleinPipeline._pack_latents(noise)
    elif family in ("qwen-image", "krea2", "qwen-image21"):  # the script's noise is beside its (B, C, 1, H, W) latents
        from diffusers import QwenImage21Pipeline, QwenImagePipeline

        noise = torch.randn(2, channels, 1, 8, 8, generator=generator)
        pack = QwenImage21Pipeline._pack_latents if family == "qwen-image21" else QwenImagePipeline._pack_latents
        packed_noise = pack(noise[:, :, 0], 2, channels, 8, 8)
    else:
        noise = packed_noise = torch.randn(latents.shape, generator=generator)
    with torch.no_grad():
        prediction = lookalike_family.predict(transformer, transformer.config, noisy_latents(x0, packed_noise, sigmas),
                                              sigmas, [texts[c] for c in captions], TRAINING_GUIDANCE, layout,
                                              torch.device("cpu"), torch.float32)
        objective = family_objective(lookalike_family, folder)
        ours = objective.loss(prediction, x0, packed_noise, sigmas, TrainConfig()).item()
        reference = {"z-image": z_image_reference_loss, "flux2": flux2_reference_loss,
                     "flux2-dev": partial(flux2_reference_loss, dev=True),
                     "qwen-image": qwen_image_reference_loss, "qwen-image21": qwen_image21_reference_loss,
                     "krea2": krea2_reference_loss,
                     "sd3": sd3_reference_loss}[family](
            folder, transformer, captions, latents, noise, sigmas).item()
    print(f"{family} loss: lookalike {ours:.8f}, reference script {reference:.8f}, "
          f"difference {abs(ours - reference):.2e}")
    assert abs(ours - reference) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("family", TINY)
def test_a_run_trains_samples_draws_what_the_stock_pipeline_draws_and_exports(tiny_config, tmp_path, family):
    lora, ours = train_sampled_run(tiny_config, TINY[family])
    from safetensors import safe_open

    with safe_open(str(lora), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["lookalike.base_model"] == TINY[family]
    assert "ss_base_model_version" not in metadata, "never labelled as another family's (FLUX.1's) LoRA"
    stock = stock_arguments(folder_family(resolve_base(TINY[family])))
    assert np.abs(ours - stock_image(TINY[family], lora, **stock)).max() <= 1, \
        "within 1/255 of the stock pipeline with the LoRA"
    assert np.abs(ours - stock_image(TINY[family], **stock)).max() > 1, "the LoRA changed the image"

    # Export: diffusers' layout, which the stock pipeline loads and ComfyUI reads for these families; kohya has
    # no layout for them.
    with pytest.raises(LookalikeError, match="--format kohya: kohya's layout exists for FLUX.1, SDXL and SD 1.x LoRAs"):
        export_lora(lora, tmp_path / "kohya.safetensors", "kohya")
    exported = export_lora(lora, tmp_path / "diffusers.safetensors", "diffusers")
    pipe = load_pipeline(resolve_base(TINY[family]))
    pipe.load_lora_weights(str(exported.parent), weight_name=exported.name)
    assert pipe.get_active_adapters() == ["default_0"]
    # ComfyUI reads diffusers' layout for these families (tests/test_comfyui.py applies it as ComfyUI does).
    comfyui = load_file(export_lora(lora, tmp_path / "comfyui.safetensors", "comfyui"))
    assert comfyui.keys() == load_file(exported).keys()


@pytest.mark.slow
@pytest.mark.parametrize("family", TINY)
def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(tiny_config, family):
    path = tiny_config(model={"base": TINY[family]}, train={"max_train_steps": 80, "checkpoint_every": 20,
                                                            "checkpoints_keep": 2, "learning_rate": 1e-3,
                                                            "batch_size": 2})
    assert_a_killed_run_resumes_exactly(path, steps=80, killed_after="step-000020")


@pytest.mark.parametrize("base", [*TINY.values(), "tiny-sdxl", "tiny-sd15"])
def test_dry_run_counts_the_denoisers_parameters_from_the_meta_device(tiny_config, base):
    from lookalike.train.memory import estimate

    config = load_config(tiny_config(model={"base": base}))
    denoiser = folder_family(resolve_base(base)).denoiser
    real = load_component(resolve_base(base), denoiser)
    add_lora(real, config.train.rank, config.train.lora_alpha, config.train.target_modules)
    counted = estimate(config, "no")
    assert counted.counts.lora == sum(p.numel() for p in real.parameters() if p.requires_grad)
    assert counted.counts.frozen == sum(p.numel() for p in real.parameters() if not p.requires_grad)
    assert counted.lines()[0].startswith(f"{denoiser} weights")


# The published sizes of each hub base's transformer, in billions of parameters.
PUBLISHED_BILLIONS = {"flux2-klein-4b": 3.9, "flux2-klein-9b": 9.1, "flux2-dev": 32.2, "z-image": 6.2,
                      "z-image-turbo": 6.2, "qwen-image": 20.4, "qwen-image-2512": 20.4, "flux-krea-dev": 11.9,
                      "sd3.5-large": 8.1, "sd3-medium": 2.0}


@pytest.mark.parametrize("base", PUBLISHED_BILLIONS)
def test_a_hub_base_is_estimated_from_its_published_architecture_without_any_download(tiny_config, monkeypatch,
                                                                                        tmp_path, base):
    from lookalike.train.memory import estimate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: anything read from the hub would fail
    config = load_config(tiny_config(model={"base": base}, data={"resolution": 1024}))
    bf16 = estimate(config, "bf16")
    assert bf16.counts.frozen / 1e9 == pytest.approx(PUBLISHED_BILLIONS[base], abs=0.05)
    checkpointed = config.model_copy(update={"train": config.train.model_copy(update={"gradient_checkpointing": True})})
    assert 0 < estimate(checkpointed, "bf16").activations < bf16.activations / 5
    assert not (tmp_path / "hf").exists()


def test_dry_run_says_which_settings_fit_the_gpu_it_is_given(tiny_config, tmp_path, monkeypatch):
    """The command in this process (tests/test_memory.py runs `train --dry-run` as a process)."""
    from typer.testing import CliRunner

    from lookalike.cli import app

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("COLUMNS", "200")
    config = str(tiny_config(model={"base": "z-image"}, data={"resolution": 1024}))
    result = CliRunner().invoke(app, ["train", config, "--dry-run", "--gpu-memory", "24GB"])
    assert result.exit_code == 0, result.output
    assert "(6,154.9 M parameters)" in result.output and "precision bf16" in result.output
    # Z-Image in bf16 at 1024 px needs ~32 GB; checkpointing alone brings it to ~14 GB, the fewest changes.
    assert "does not fit a 24 GB GPU as configured; it fits with (fewest changes first):\n" \
           "    train.gradient_checkpointing=true: ~" in result.output


def test_gpu_memory_is_read_as_users_write_it():
    from lookalike.train.memory import parse_gpu_memory

    assert [parse_gpu_memory(text) for text in ("24GB", "24 GiB", "80g", "12.5")] == [24, 24, 80, 12.5]
    for text in ("lots", "0GB", "24TB"):
        with pytest.raises(LookalikeError, match=f"--gpu-memory: '{text}' is not a memory size like 24GB"):
            parse_gpu_memory(text)


def test_a_side_the_denoiser_cannot_take_is_refused_by_name_before_anything_is_encoded(tiny_config):
    """Qwen-Image 2.1's pipeline takes sides in multiples of 32 px (its VAE's 16 times its 2x2 image slots)."""
    config = load_config(tiny_config(model={"base": "tiny-qwen-image21"}, train={"resolution": 48}))
    with pytest.raises(LookalikeError, match="the run trains at 48 px .* tiny-qwen-image21 takes sides that are "
                                             "multiples of 32 px"):
        train(config, "r")
    assert not (config.workspace / "cache").exists()
