"""Generation: prompts x seeds x guidance scales, sidecars, determinism, resuming, LoRA or base model."""

import json

import numpy as np
import pytest
from PIL import Image

from lookalike.config import load_config
from lookalike.generate import generate
from lookalike.models.families.flux1 import Flux1
from lookalike.models.families.interface import TextEncoding
from lookalike.train.trainer import train


def pixels(path):
    return np.asarray(Image.open(path))


@pytest.mark.slow
def test_generate_every_combination_with_sidecars(tiny_config):
    config = load_config(tiny_config(generate={"prompts": ["a photo of {token}", "{token} smiling"],
                                               "seeds": [0, 1], "guidance_scales": [3.5, 5.0],
                                               "num_inference_steps": 2}))
    folder = generate(config)
    images = sorted(folder.glob("*.png"))
    assert len(images) == 8
    sidecar = json.loads((folder / "p01_s1_g3.5.json").read_text())
    assert sidecar["prompt"] == "sks smiling"
    assert (sidecar["seed"], sidecar["guidance_scale"], sidecar["steps"], sidecar["size"]) == (1, 3.5, 2, 64)
    assert sidecar["loras"] == [] and sidecar["base_model"] == "tiny"
    assert pixels(images[0]).shape == (64, 64, 3)
    assert json.loads((folder / "config.json").read_text()) == config.to_json_dict()


@pytest.mark.slow
def test_same_settings_and_seed_give_the_same_image(tiny_config, tmp_path):
    first = generate(load_config(tiny_config("a.toml", **{"": {"workspace": str(tmp_path / "a")}})))
    second = generate(load_config(tiny_config("b.toml", **{"": {"workspace": str(tmp_path / "b")}})))
    np.testing.assert_array_equal(pixels(first / "p00_s0_g5.png"), pixels(second / "p00_s0_g5.png"))


@pytest.mark.slow
def test_existing_images_are_kept_and_missing_ones_made(tiny_config):
    config = load_config(tiny_config(generate={"seeds": [0, 1], "num_inference_steps": 2}))
    folder = generate(config)
    kept = (folder / "p00_s0_g5.png").stat().st_mtime_ns
    (folder / "p00_s1_g5.png").unlink()
    generate(config)
    assert (folder / "p00_s0_g5.png").stat().st_mtime_ns == kept
    assert (folder / "p00_s1_g5.png").exists()


@pytest.mark.slow
def test_run_lora_and_lora_file_change_the_image(tiny_config):
    config = load_config(tiny_config(train={"max_train_steps": 30, "learning_rate": 1e-2}))
    lora = train(config, "r")
    from_run = generate(config, run="r")
    from_file = generate(config, loras=[lora])
    base = generate(config)
    assert from_run == lora.parent / "images" and from_file != from_run
    np.testing.assert_array_equal(pixels(from_run / "p00_s0_g5.png"), pixels(from_file / "p00_s0_g5.png"))
    assert not np.array_equal(pixels(from_run / "p00_s0_g5.png"), pixels(base / "p00_s0_g5.png"))
    sidecar = json.loads((from_run / "p00_s0_g5.json").read_text())
    assert sidecar["run"] == "r" and sidecar["loras"][0]["trigger_word"] == "sks"


@pytest.mark.slow
def test_vae_tiling_decodes_tile_by_tile(tiny_config, tmp_path, monkeypatch):
    """The tiny VAE's tiles (64 px) are smaller than a 256 px image, so tiling really splits the decode. (Its
    random weights blend tiles badly, so the picture itself is not compared.)"""
    from diffusers import AutoencoderKL

    tiled_calls = []
    original = AutoencoderKL.tiled_decode

    def counting(self, *args, **kwargs):
        tiled_calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "tiled_decode", counting)
    settings = {"num_inference_steps": 2, "resolution": 256}
    generate(load_config(tiny_config("whole.toml", **{"": {"workspace": str(tmp_path / "whole")}},
                                     generate=settings)))
    assert tiled_calls == []
    folder = generate(load_config(tiny_config("tiled.toml", **{"": {"workspace": str(tmp_path / "tiled")}},
                                              generate={**settings, "vae_tiling": True})))
    assert len(tiled_calls) == 1 and pixels(folder / "p00_s0_g5.png").shape == (256, 256, 3)


@pytest.mark.slow
def test_images_are_what_the_stock_pipeline_draws_with_the_lora_file_loaded(tiny_config, tmp_path):
    """By default the LoRA is applied as load_lora_weights applies it (what users of the file get); fusing it into
    bf16 weights rounds small changes away, which the test measures."""
    import torch
    from diffusers import FluxPipeline

    from lookalike.generate import apply_loras, render
    from lookalike.models.base import load_pipeline
    from lookalike.models.families.flux1 import ensure_tiny_model

    config = load_config(tiny_config(train={"max_train_steps": 20, "learning_rate": 1e-2}, data={"crop": "center"},
                                     generate={"num_inference_steps": 3}))
    lora = train(config, "r")
    ours = pixels(generate(config, run="r") / "p00_s0_g5.png").astype(int)

    stock = FluxPipeline.from_pretrained(ensure_tiny_model())
    stock.load_lora_weights(str(lora.parent), weight_name=lora.name)
    stock.set_progress_bar_config(disable=True)
    theirs = np.asarray(stock("a photo of sks", height=64, width=64, num_inference_steps=3, guidance_scale=5.0,
                              max_sequence_length=32, generator=torch.Generator("cpu").manual_seed(0)).images[0])
    assert np.abs(ours - theirs.astype(int)).max() <= 1, "within 1/255 of the stock pipeline with the file loaded"

    def latents(fuse: bool):
        pipe = load_pipeline(ensure_tiny_model(), dtype=torch.bfloat16)
        pipe.set_progress_bar_config(disable=True)
        apply_loras(pipe, [(lora, 1.0)], fuse=fuse)
        return render(pipe, prompt="a photo of sks", seed=0, guidance=5.0, steps=3, size=64, text=TextEncoding(32),
                      output_type="latent").float()

    moved = (latents(True) - latents(False)).abs().max().item()
    assert moved > 0, "fused into bf16 weights, the LoRA draws something else than the file loaded as is"


@pytest.mark.slow
def test_a_base_without_guidance_generates_with_its_own_steps_and_no_guidance_scale(tiny_config, tmp_path, monkeypatch):
    """A local folder like FLUX.1-schnell (its transformer has no guidance embedding) makes 4-step images, one per
    prompt and seed: guidance scales would draw the same image under different labels."""
    from lookalike import display
    from lookalike.models import base
    from lookalike.models.families.flux1 import TinySpec, ensure_tiny_model

    schnell = ensure_tiny_model(TinySpec(guidance_embeds=False))
    assert base.base_info(str(schnell)) == Flux1.local_without_guidance and base.base_info("flux-schnell").steps == 4
    steps_run = []  # one transformer call per denoising step (FLUX has no classifier-free guidance pass)
    real = base.load_pipeline

    def counting(*args, **kwargs):
        pipe = real(*args, **kwargs)
        pipe.transformer.register_forward_hook(lambda *_: steps_run.append(1))
        return pipe

    monkeypatch.setattr("lookalike.generate.load_pipeline", counting)
    config = load_config(tiny_config(model={"base": str(schnell)},
                                     generate={"guidance_scales": [3.5, 5.0, 7.5], "seeds": [0]}))
    console = display.console(record=True, width=1000)
    folder = generate(config, console=console)
    assert "takes no guidance: generate.guidance_scales is not used" in console.export_text()
    assert sorted(p.name for p in folder.glob("*.png")) == ["p00_s0.png"]
    sidecar = json.loads((folder / "p00_s0.json").read_text())
    assert sidecar["guidance_scale"] is None and sidecar["steps"] == 4 and len(steps_run) == 4


@pytest.mark.slow
def test_lora_strength_is_an_inference_factor_that_is_scored_and_ranked(tiny_config, tmp_path):
    from lookalike import display
    from lookalike.evaluate.command import evaluate_runs
    from lookalike.report.build import build_report

    config = load_config(tiny_config(train={"max_train_steps": 10, "learning_rate": 1e-2},
                                     generate={"lora_scales": [0.5, 1.0], "num_inference_steps": 2}))
    run = train(config, "r").parent
    folder = generate(config, run="r")
    assert sorted(p.stem for p in folder.glob("p*.png")) == ["p00_s0_g5_l0.5", "p00_s0_g5_l1"]
    half = json.loads((folder / "p00_s0_g5_l0.5.json").read_text())
    assert half["lora_scale"] == 0.5 and half["loras"][0]["weight"] == 0.5
    # At strength 1 the image is the one made without strengths; at 0.5 another.
    trained = config.model_copy(update={"generate": config.generate.model_copy(update={"lora_scales": [1.0]})})
    plain = generate(trained, run="r", out=tmp_path / "plain")
    assert np.array_equal(pixels(plain / "p00_s0_g5.png"), pixels(folder / "p00_s0_g5_l1.png"))
    assert np.abs(pixels(folder / "p00_s0_g5_l0.5.png").astype(int) - pixels(plain / "p00_s0_g5.png")).max() > 1

    quiet = display.console(quiet=True)
    evaluate_runs(config, quiet, run="r")
    assert set(json.loads((run / "metrics.json").read_text())["per_lora_scale"]) == {"0.5", "1.0"}
    index = build_report(config, quiet)
    assert (index.parent / "figures" / "lora_strength.png").is_file()
    # The tiny CLIP measures nothing, so the report names no best strength (tests/test_report.py ranks them).
    assert "Best LoRA:" not in (index.parent / "summary.md").read_text()


@pytest.mark.slow
def test_an_offloaded_pipeline_draws_the_same_images_at_every_strength(tiny_config, tmp_path, monkeypatch):
    """[generate] offload: diffusers' group offloading of every component, after the LoRA is loaded; here on the
    CPU (onload and offload devices alike), where its hooks still move every block's weights in and out."""
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    import lookalike.generate as generation

    config = load_config(tiny_config(train={"max_train_steps": 5, "learning_rate": 1e-2},
                                     generate={"num_inference_steps": 2, "lora_scales": [0.5, 1.0]}))
    train(config, "r")
    whole = generate(config, run="r", out=tmp_path / "whole")
    offloaded_pipes = []
    offload = generation.offload_pipeline
    monkeypatch.setattr(generation, "offload_pipeline",
                        lambda pipe, device: (offload(pipe, device), offloaded_pipes.append(pipe)))
    offloaded = generate(config.model_copy(update={"generate": config.generate.model_copy(update={"offload": True})}),
                         run="r", out=tmp_path / "offloaded")
    [pipe] = offloaded_pipes
    assert _is_group_offload_enabled(pipe.transformer) and _is_group_offload_enabled(pipe.text_encoder_2)
    names = sorted(p.name for p in whole.glob("*.png"))
    assert names == ["p00_s0_g5_l0.5.png", "p00_s0_g5_l1.png"], names
    for name in names:
        np.testing.assert_array_equal(pixels(offloaded / name), pixels(whole / name))


@pytest.mark.slow
def test_a_lora_trained_on_one_base_is_drawn_with_another_of_its_family(tiny_config, tmp_path):
    """Krea 2's recipe (train on RAW, draw with Turbo), with a local distilled copy of tiny Krea 2 as Turbo: its own
    8 steps and no guidance, the image the stock pipeline of that folder draws with the run's file; the training
    samples and class images stay the trained base's."""
    import shutil

    import torch
    from diffusers import Krea2Pipeline

    from lookalike.errors import LookalikeError
    from lookalike.models.base import guidance_scales, resolve_base
    from lookalike.train.prior import drawing_config

    turbo = tmp_path / "bases" / "krea2-turbo-like"
    shutil.copytree(resolve_base("tiny-krea2"), turbo)
    index = json.loads((turbo / "model_index.json").read_text())
    (turbo / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}))
    path = tiny_config(model={"base": "tiny-krea2"}, data={"crop": "center"},
                       train={"max_train_steps": 4, "learning_rate": 1e-2, "sample_every": 4, "sample_steps": 2},
                       generate={"base": "bases/krea2-turbo-like", "guidance_scales": [4.0]})
    loaded = load_config(path)
    config = loaded.model_copy(update={"generate": loaded.generate.model_copy(update={"num_inference_steps": None})})
    assert config.generate.base == str(turbo), "a local folder is taken relative to the config file"
    assert guidance_scales(config) == [None] and guidance_scales(config, config.model.base) == [4.0], \
        "drawn without guidance; the trained base's samples with it"
    assert drawing_config(config).generate.base is None, "class images come from the trained base"

    lora = train(config, "r")
    folder = generate(config, run="r")
    sidecar = json.loads((folder / "p00_s0.json").read_text())
    assert (sidecar["base_model"], sidecar["steps"], sidecar["guidance_scale"]) == (str(turbo), 8, None)
    stock = Krea2Pipeline.from_pretrained(turbo)
    stock.load_lora_weights(str(lora.parent), weight_name=lora.name)
    stock.set_progress_bar_config(disable=True)
    expected = np.asarray(stock(prompt="a photo of sks", height=64, width=64, num_inference_steps=8,
                                guidance_scale=0.0, max_sequence_length=32,
                                generator=torch.Generator("cpu").manual_seed(0)).images[0]).astype(int)
    assert np.abs(pixels(folder / "p00_s0.png").astype(int) - expected).max() <= 1

    with pytest.raises(LookalikeError, match="generate.base: tiny-z-image is a z-image base, and the LoRAs of "
                                             "model.base tiny-krea2 are krea2's"):
        generate(config.model_copy(update={"generate": config.generate.model_copy(update={"base": "tiny-z-image"})}),
                 run="r")
    with pytest.raises(LookalikeError, match="generate.base: 'krea2-trubo' is neither a known model"):
        generate(config.model_copy(update={"generate": config.generate.model_copy(update={"base": "krea2-trubo"})}),
                 run="r")


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["lora", "lokr"])
def test_a_lora_file_of_another_family_is_refused_by_name_and_one_that_loads_nothing_too(tiny_config, tmp_path,
                                                                                        adapter):
    """Before the model loads when its header names its base; else when diffusers loaded none of its layers (it
    would only warn, and the images would be labelled with a LoRA they never had)."""
    from safetensors.torch import load_file, save_file

    from lookalike.errors import LookalikeError

    sd = load_config(tiny_config("sd.toml", model={"base": "tiny-sd15"}, data={"crop": "center"},
                                 train={"max_train_steps": 1, "sample_every": 0, "adapter": adapter}))
    lora = train(sd, "r")
    flux = load_config(tiny_config(generate={"num_inference_steps": 2}))
    with pytest.raises(LookalikeError, match=r"lora.safetensors: a LoRA of tiny-sd15 \(sd1\), which tiny \(flux1\) "
                                             "cannot load: use a LoRA of a flux1 base"):
        generate(flux, loras=[lora])
    unnamed = tmp_path / "from-another-tool.safetensors"
    save_file(load_file(lora), str(unnamed))  # the same layers, with no header naming a base
    with pytest.raises(LookalikeError, match="from-another-tool.safetensors: none of its layers is one of this "
                                             r"base's \(FluxPipeline\): a LoRA of another base\?"):
        generate(flux, loras=[unnamed])
    assert not list((flux.workspace / "generated").rglob("*.png")), "no image was labelled with it"
