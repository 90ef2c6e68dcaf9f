"""[model] checkpoint: a single-file fine-tune of a base's transformer, in diffusers' layout or Black Forest Labs',
becomes the base's transformer in a folder made once; a run trains on it and draws what the stock pipeline draws
with that file's transformer and the run's LoRA; files it cannot read are refused by name."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from lookalike.config import ModelConfig, load_config
from lookalike.data.dataset import training_images
from lookalike.errors import LookalikeError
from lookalike.generate import generate
from lookalike.models.base import load_component, resolve_base
from lookalike.models.checkpoint import checkpoint_folder
from lookalike.store import connect, run_table
from lookalike.train.prior import class_folder
from lookalike.trained_on import stale_reason
from lookalike.train.trainer import train
from lookalike.workspace import Workspace
from tests.conftest import run_in_process


def fine_tune() -> dict[str, torch.Tensor]:
    """Tiny FLUX.1's transformer weights, each moved a little: a fine-tune of it."""
    generator = torch.Generator().manual_seed(0)
    weights = load_component(resolve_base("tiny"), "transformer").state_dict()
    return {k: (v + 0.05 * torch.randn(v.shape, generator=generator)).contiguous() for k, v in weights.items()}


def test_a_fine_tunes_single_file_becomes_the_bases_transformer_once(tmp_path, monkeypatch):
    """In diffusers' layout (Black Forest Labs' is tested at FLUX.1's full width below)."""
    tuned = fine_tune()
    file = tmp_path / "my-flux-finetune.safetensors"
    save_file(tuned, str(file))
    model = ModelConfig(base="tiny", checkpoint=file)
    folder = checkpoint_folder(model, tmp_path / "work")
    assert folder.parent == tmp_path / "work" / "bases" and folder.name.startswith("my-flux-finetune-")
    loaded = load_component(folder, "transformer").state_dict()
    assert loaded.keys() == tuned.keys()
    for key, value in tuned.items():
        assert torch.equal(loaded[key], value), key
    assert (folder / "vae").resolve() == (resolve_base("tiny") / "vae").resolve(), "the rest is the base's"

    from diffusers import FluxTransformer2DModel

    def never(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(FluxTransformer2DModel, "from_single_file", never)
    assert checkpoint_folder(model, tmp_path / "work") == folder, "made once, found again without hashing"

    # Touched (the same bytes, a new time): hashed once more, then found by its new time, never converted again.
    os.utime(file, ns=(file.stat().st_atime_ns, file.stat().st_mtime_ns + 10**9))
    hashed = []
    monkeypatch.setattr("lookalike.models.checkpoint.file_sha256", lambda path: hashed.append(path) or
                        hashlib.sha256(Path(path).read_bytes()).hexdigest())
    assert checkpoint_folder(model, tmp_path / "work") == folder and len(hashed) == 1
    assert checkpoint_folder(model, tmp_path / "work") == folder and len(hashed) == 1, "its record brought up to date"

    # A conversion killed before its rename leaves a hidden folder with a record: never taken, and cleared.
    debris = folder.parent / f".{folder.name}.0123abcd.tmp"
    shutil.copytree(folder, debris, symlinks=True)
    os.utime(file, ns=(file.stat().st_atime_ns, file.stat().st_mtime_ns + 10**9))
    assert checkpoint_folder(model, tmp_path / "work") == folder and not debris.exists()

    # A file that is no safetensors file is told by its header, before it is hashed whole.
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{{{{{{{{" + b"\0" * 1000)
    with pytest.raises(LookalikeError, match="is not a readable .safetensors file"):
        checkpoint_folder(ModelConfig(base="tiny", checkpoint=bad), tmp_path / "work")
    assert all(Path(path) != bad for path in hashed)


def in_bfl_layout(weights: dict[str, torch.Tensor], double: int, single: int) -> dict[str, torch.Tensor]:
    """FLUX.1 transformer weights as Black Forest Labs' checkpoints hold them, transcribed from their model
    (flux/modules/layers.py: q, k and v in one qkv layer, a single block's q, k, v and MLP input in one linear1, the
    last layer's modulation as shift then scale) and ComfyUI's flux_to_diffusers, which pairs each with diffusers'
    layer."""
    used: set[str] = set()

    def take(*names: str) -> torch.Tensor:
        used.update(names)
        return torch.cat([weights[name] for name in names])

    out = {}
    linear = {"img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
              "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
              "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
              "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
              "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
              "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
              "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2"}
    for i in range(double):
        d = f"transformer_blocks.{i}"
        linear.update({f"double_blocks.{i}.{ours}": f"{d}.{theirs}" for ours, theirs in {
            "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear", "img_attn.proj": "attn.to_out.0",
            "txt_attn.proj": "attn.to_add_out", "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
            "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2"}.items()})
        for end in ("weight", "bias"):
            out[f"double_blocks.{i}.img_attn.qkv.{end}"] = take(*(f"{d}.attn.to_{p}.{end}" for p in "qkv"))
            out[f"double_blocks.{i}.txt_attn.qkv.{end}"] = take(*(f"{d}.attn.add_{p}_proj.{end}" for p in "qkv"))
        for stream, norm in (("img", ""), ("txt", "added_")):
            for part in ("query", "key"):
                out[f"double_blocks.{i}.{stream}_attn.norm.{part}_norm.scale"] = take(
                    f"{d}.attn.norm_{norm}{part[0]}.weight")
    for i in range(single):
        s = f"single_transformer_blocks.{i}"
        linear.update({f"single_blocks.{i}.linear2": f"{s}.proj_out",
                       f"single_blocks.{i}.modulation.lin": f"{s}.norm.linear"})
        for end in ("weight", "bias"):
            out[f"single_blocks.{i}.linear1.{end}"] = take(*(f"{s}.attn.to_{p}.{end}" for p in "qkv"),
                                                           f"{s}.proj_mlp.{end}")
        for part in ("query", "key"):
            out[f"single_blocks.{i}.norm.{part}_norm.scale"] = take(f"{s}.attn.norm_{part[0]}.weight")
    for ours, theirs in linear.items():
        for end in ("weight", "bias"):
            out[f"{ours}.{end}"] = take(f"{theirs}.{end}")
    for end in ("weight", "bias"):  # diffusers' norm_out gives scale then shift
        scale, shift = weights[f"norm_out.linear.{end}"].chunk(2)
        out[f"final_layer.adaLN_modulation.1.{end}"] = torch.cat([shift, scale])
        used.add(f"norm_out.linear.{end}")
    assert used == weights.keys(), sorted(weights.keys() - used)  # every weight has its place
    return {key: value.contiguous() for key, value in out.items()}


@pytest.mark.slow  # 16 s and 4.5 GB: one double and one single block of FLUX.1's full width, in bf16
def test_a_fine_tune_in_black_forest_labs_layout_becomes_the_bases_transformer(tmp_path):
    """diffusers' converter of that layout knows FLUX.1's full sizes (3072 wide, MLP 12288) only: a base of that
    width with one block of each kind, its other components tiny's (only the transformer's config is read)."""
    import shutil

    from diffusers import FluxTransformer2DModel

    from lookalike.models.families.flux1 import FLUX_TRANSFORMER

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**dict(FLUX_TRANSFORMER, num_layers=1, num_single_layers=1))
    generator = torch.Generator().manual_seed(0)
    tuned = {name: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
             for name, shape in ((k, v.shape) for k, v in transformer.state_dict().items())}
    file = tmp_path / "flux1-dev-finetune.safetensors"
    save_file(in_bfl_layout(tuned, 1, 1), str(file))
    base = tmp_path / "wide-base"
    shutil.copytree(resolve_base("tiny"), base, ignore=shutil.ignore_patterns("transformer"))
    transformer.save_config(base / "transformer")

    folder = checkpoint_folder(ModelConfig(base=str(base), checkpoint=file), tmp_path / "work")
    loaded = {}
    for part in (folder / "transformer").glob("*.safetensors"):
        loaded.update(load_file(part))
    assert loaded.keys() == tuned.keys()
    for key, value in tuned.items():
        assert torch.equal(loaded[key], value), key


def test_a_file_it_cannot_read_is_refused_by_name(tmp_path, tiny_config):
    z_image = tmp_path / "z-image-transformer.safetensors"
    save_file(load_component(resolve_base("tiny-z-image"), "transformer").state_dict(), str(z_image))
    with pytest.raises(LookalikeError, match="model.checkpoint: .*z-image-transformer.safetensors is not a checkpoint "
                                             "of tiny's transformer"):
        checkpoint_folder(ModelConfig(base="tiny", checkpoint=z_image), tmp_path / "work")
    assert not (tmp_path / "work" / "bases").exists() or not any((tmp_path / "work" / "bases").iterdir())
    with pytest.raises(LookalikeError, match="model.checkpoint: file not found: .*nope.safetensors"):
        checkpoint_folder(ModelConfig(base="tiny", checkpoint=tmp_path / "nope.safetensors"), tmp_path / "work")
    with pytest.raises(LookalikeError, match="model.checkpoint: .*z-image-transformer.safetensors holds no sd1 UNet "
                                             "\\(no key starts with 'model.diffusion_model.'\\)"):
        checkpoint_folder(ModelConfig(base="tiny-sd15", checkpoint=z_image), tmp_path / "work")
    not_safetensors = tmp_path / "broken.safetensors"
    not_safetensors.write_bytes(b"not a safetensors file")
    with pytest.raises(LookalikeError, match="model.checkpoint: .*broken.safetensors is not a readable .safetensors"):
        checkpoint_folder(ModelConfig(base="tiny-sd15", checkpoint=not_safetensors), tmp_path / "work")
    config = load_config(tiny_config(model={"checkpoint": "finetune.safetensors"}))
    assert config.model.checkpoint == tmp_path / "finetune.safetensors", "taken relative to the config file"


@pytest.mark.slow
def test_a_run_on_a_checkpoint_draws_what_the_stock_pipeline_draws_with_its_transformer_and_the_lora(tiny_config,
                                                                                                     tmp_path,
                                                                                                     monkeypatch):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    file = tmp_path / "finetune.safetensors"
    save_file(fine_tune(), str(file))
    study_file = tiny_config(model={"checkpoint": str(file)}, data={"crop": "center"},
                             train={"max_train_steps": 4, "learning_rate": 1e-2, "sample_every": 0,
                                    "checkpoint_every": 2},
                             generate={"num_inference_steps": 3, "guidance_scales": [4.0]})
    study = load_config(study_file)
    lora = train(study, "default")
    with connect(Workspace(study.workspace).results) as db:
        assert [row["base"] for row in run_table(db)] == ["tiny + finetune.safetensors"], "never shown as the base's"
    assert "lookalike.checkpoint" in _header(lora) and _header(lora)["lookalike.checkpoint"] == file.name
    ours = np.asarray(Image.open(generate(study, run="default") / "p00_s0_g4.png")).astype(int)

    def stock(transformer) -> np.ndarray:
        pipe = FluxPipeline.from_pretrained(resolve_base("tiny"), transformer=transformer)
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
        pipe.set_progress_bar_config(disable=True)
        image = pipe(prompt="a photo of sks", height=64, width=64, num_inference_steps=3, guidance_scale=4.0,
                     max_sequence_length=32, generator=torch.Generator("cpu").manual_seed(0)).images[0]
        return np.asarray(image).astype(int)

    tuned = FluxTransformer2DModel.from_single_file(str(file), config=str(resolve_base("tiny")),
                                                    subfolder="transformer", local_files_only=True)
    assert np.abs(ours - stock(tuned)).max() <= 1, "the stock pipeline with the file's transformer and the LoRA"
    base = load_component(resolve_base("tiny"), "transformer")
    assert np.abs(ours - stock(base)).max() > 1, "the fine-tune's weights made the difference"

    result = run_in_process("export", str(study_file), "--run", "default", "--format", "diffusers", "--out",
                            str(tmp_path / "shared" / "sks.safetensors"), "--card")
    assert result.returncode == 0, result.stderr
    card = (tmp_path / "shared" / "README.md").read_text()
    assert "| checkpoint | finetune.safetensors |" in card and "on tiny + finetune.safetensors" in card
    # Its code, run in the card's folder with the fine-tune beside it, draws the card's first image (within 1/255).
    shutil.copy(file, tmp_path / "shared" / file.name)
    monkeypatch.chdir(tmp_path / "shared")
    scope: dict = {}
    exec(re.search(r"```python\n(.*?)```", card, re.S).group(1), scope)
    first = re.search(r"url: (images/\S+)", card).group(1)
    assert np.abs(np.asarray(scope["image"]).astype(int) -
                  np.asarray(Image.open(tmp_path / "shared" / first)).astype(int)).max() <= 1

    # The file changed in place: the finished run is named stale, and a started one will not resume on it.
    save_file({k: v + 0.01 for k, v in fine_tune().items()}, str(file))
    run = Workspace(study.workspace).run("default")
    stale = stale_reason(run, study, training_images(study), study.workspace)
    assert f"model.checkpoint: {file} changed since the run trained on it" in stale
    # Its LoRA is never drawn on the changed file, nor on the plain base once the key is removed: `lookalike run`
    # leaves its images as they are, generate refuses by name, the demo does not list it.
    images = {path.name: path.read_bytes() for path in run.images.iterdir()}
    result = run_in_process("run", str(study_file))
    assert ("generate: skipped: run 'default' was trained on tiny + finetune.safetensors, and the config now draws on "
            "tiny + finetune.safetensors (a changed file)") in " ".join(result.stdout.split()), result.stdout
    assert {path.name: path.read_bytes() for path in run.images.iterdir()} == images
    with pytest.raises(LookalikeError, match=r"drawn only on the base it trained on"):
        generate(study, run="default")
    plain = load_config(study_file, ["model.checkpoint="])
    with pytest.raises(LookalikeError, match=r"trained on tiny \+ finetune.safetensors, and the config now draws on "
                                             r"tiny: its LoRA is drawn only on the base it trained on"):
        generate(plain, run="default")
    from lookalike.demo import DemoModels

    assert DemoModels(plain).lora_choices() == [] and DemoModels(study).lora_choices() == []
    run.write_status("failed", reason="interrupted")  # as if killed after its checkpoint of step 2
    with pytest.raises(LookalikeError,
                       match="cannot resume run 'default': model.checkpoint .* changed since it started"):
        train(study, "default", resume=True)


def _header(path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


def test_a_hub_base_under_a_checkpoint_is_downloaded_without_its_transformers_weights(tmp_path, monkeypatch):
    """The file's weights replace them: FLUX.1-dev's 24 GB are not fetched (the download is played by tiny's folder,
    of the same family)."""
    asked = []

    def download(repo, revision, ignore):
        asked.append((repo, ignore))
        return resolve_base("tiny")

    monkeypatch.setattr("lookalike.models.base._download", download)
    file = tmp_path / "finetune.safetensors"
    save_file(fine_tune(), str(file))
    folder = checkpoint_folder(ModelConfig(base="flux-dev", checkpoint=file), tmp_path / "work")
    assert asked == [("black-forest-labs/FLUX.1-dev", ["transformer/*.safetensors"])]
    assert (folder / "transformer" / "config.json").is_file()


def test_images_of_the_base_and_of_a_fine_tune_of_it_are_never_taken_for_each_other(tiny_config, tmp_path):
    """The base's own images (generated/base) and class images are drawn again by the fine-tune, never reused."""
    file = tmp_path / "finetune.safetensors"
    save_file(fine_tune(), str(file))
    drawing = {"prompts": ["a photo of {token}"], "seeds": [0], "num_inference_steps": 2, "guidance_scales": [4.0]}
    plain = load_config(tiny_config(generate=drawing))
    tuned = load_config(tiny_config("tuned.toml", model={"checkpoint": str(file)}, generate=drawing))
    folder = generate(plain)
    drawn_by_base = (folder / "p00_s0_g4.png").read_bytes()
    assert "checkpoint" not in json.loads((folder / "p00_s0_g4.json").read_text())["settings"]
    assert generate(tuned) == folder
    settings = json.loads((folder / "p00_s0_g4.json").read_text())["settings"]
    assert settings["checkpoint"].startswith(f"finetune.safetensors, {file.stat().st_size} bytes, modified ")
    assert (folder / "p00_s0_g4.png").read_bytes() != drawn_by_base, "drawn again by the fine-tune"
    assert class_folder(tuned) != class_folder(plain)


def test_an_all_in_one_file_is_read_for_its_transformer_and_says_what_else_it_holds(tmp_path, capsys):
    """ComfyUI's all-in-one files hold text encoders and a VAE beside the transformer: lookalike says it keeps the
    base's."""
    tuned = fine_tune()
    file = tmp_path / "all-in-one.safetensors"
    save_file({**tuned, "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.ones(4),
               "vae.encoder.conv_in.weight": torch.ones(2, 2)}, str(file))
    folder = checkpoint_folder(ModelConfig(base="tiny", checkpoint=file), tmp_path / "work")
    loaded = load_component(folder, "transformer").state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in tuned.items())
    assert "all-in-one.safetensors also holds text encoders and VAE; lookalike reads its transformer only, and keeps " \
           "tiny's text encoders and VAE" in " ".join(capsys.readouterr().out.split())
