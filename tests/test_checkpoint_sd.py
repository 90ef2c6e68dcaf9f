"""[model] checkpoint for SD 1.x and SDXL: a community fine-tune's single file in the original layout (UNet, VAE and
text encoders) becomes a diffusers folder of the base with all that the file holds; a run trains on it and draws
what the stock pipeline draws from that file with the run's LoRA."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from lookalike.config import ModelConfig, load_config
from lookalike.errors import LookalikeError
from lookalike.generate import generate
from lookalike.models.base import resolve_base
from lookalike.models.checkpoint import checkpoint_folder
from lookalike.models.families import FAMILIES
from lookalike.models.families.stable_diffusion import TinyStableDiffusionSpec, build_tiny_stable_diffusion
from lookalike.models.tiny import ensure_built
from lookalike.train.trainer import train
from tests.conftest import run_in_process
from tests.original_layout import original_state_dict


def tiny_sdxl() -> str:
    """A tiny SDXL whose two text encoders differ in width, as the real ones do (768 and 1280): diffusers tells them
    apart in a single file by that width."""
    spec = TinyStableDiffusionSpec(xl=True, text_hidden_2=48)
    return str(ensure_built(spec.folder_name, lambda: build_tiny_stable_diffusion(spec)))


def fine_tuned(family, base: str):
    """The base's pipeline with every weight of its UNet, VAE and text encoders moved a little: a fine-tune."""
    pipe = family.pipeline_class().from_pretrained(resolve_base(base), **family.pipeline_overrides())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in family.single_file_parts:
            for parameter in getattr(pipe, name).parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return pipe


@pytest.mark.parametrize("family_name", ["sd1", "sdxl"])
def test_a_fine_tunes_single_file_becomes_the_bases_unet_vae_and_text_encoders(tmp_path, family_name):
    family = FAMILIES[family_name]
    base = "tiny-sd15" if family_name == "sd1" else tiny_sdxl()
    tuned = fine_tuned(family, base)
    file = tmp_path / "my-finetune.safetensors"
    save_file(original_state_dict(tuned, family.xl), str(file))
    folder = checkpoint_folder(ModelConfig(base=base, checkpoint=file), tmp_path / "work")
    made = family.pipeline_class().from_pretrained(folder, **family.pipeline_overrides())
    for name in family.single_file_parts:
        ours, theirs = getattr(made, name).state_dict(), getattr(tuned, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        for key, value in theirs.items():
            assert torch.equal(ours[key], value), f"{name}: {key}"
        assert not (folder / name).is_symlink(), f"{name} is the file's"
    assert (folder / "tokenizer").resolve() == (resolve_base(base) / "tokenizer").resolve(), "the rest is the base's"


def test_a_file_without_a_vae_keeps_the_bases(tmp_path):
    family = FAMILIES["sd1"]
    state = {k: v for k, v in original_state_dict(fine_tuned(family, "tiny-sd15"), False).items()
             if not k.startswith("first_stage_model.")}
    file = tmp_path / "unet-and-clip.safetensors"
    save_file(state, str(file))
    folder = checkpoint_folder(ModelConfig(base="tiny-sd15", checkpoint=file), tmp_path / "work")
    assert (folder / "vae").resolve() == (resolve_base("tiny-sd15") / "vae").resolve()
    assert not (folder / "unet").is_symlink() and not (folder / "text_encoder").is_symlink()


def test_a_file_of_another_sd_base_is_refused_by_name(tmp_path):
    file = tmp_path / "sd15-finetune.safetensors"
    save_file(original_state_dict(fine_tuned(FAMILIES["sd1"], "tiny-sd15"), False), str(file))
    with pytest.raises(LookalikeError, match=f"model.checkpoint: {file} is not a checkpoint of .*tiny-sd-v1-.*True"):
        checkpoint_folder(ModelConfig(base=tiny_sdxl(), checkpoint=file), tmp_path / "work")
    assert not (tmp_path / "work" / "bases").exists() or not any((tmp_path / "work" / "bases").iterdir())


def test_a_hub_sd_base_under_a_checkpoint_is_downloaded_without_the_weights_the_file_holds(tmp_path, monkeypatch):
    """SDXL's 7 GB of UNet, VAE and text encoders are not fetched (the download is played by a tiny SDXL's folder)."""
    asked = []

    def download(repo, revision, ignore):
        asked.append((repo, ignore))
        return resolve_base(tiny_sdxl())

    monkeypatch.setattr("lookalike.models.base._download", download)
    file = tmp_path / "finetune.safetensors"
    save_file(original_state_dict(fine_tuned(FAMILIES["sdxl"], tiny_sdxl()), True), str(file))
    checkpoint_folder(ModelConfig(base="sdxl", checkpoint=file), tmp_path / "work")
    repo, ignore = asked[0]
    assert repo == "stabilityai/stable-diffusion-xl-base-1.0"
    assert {"unet/*.safetensors", "vae/*.safetensors", "text_encoder/*.safetensors",
            "text_encoder_2/*.safetensors"} <= set(ignore)


@pytest.mark.slow
@pytest.mark.parametrize("family_name", ["sd1", "sdxl"])
def test_a_run_on_a_checkpoint_draws_what_the_stock_pipeline_draws_from_that_file_with_the_lora(tiny_config, tmp_path,
                                                                                               family_name,
                                                                                               monkeypatch):
    family = FAMILIES[family_name]
    base = "tiny-sd15" if family_name == "sd1" else tiny_sdxl()
    file = tmp_path / "finetune.safetensors"
    save_file(original_state_dict(fine_tuned(family, base), family.xl), str(file))
    study_file = tiny_config(model={"base": base, "checkpoint": str(file)}, data={"crop": "center"},
                             train={"max_train_steps": 4, "learning_rate": 1e-2, "sample_every": 0},
                             generate={"num_inference_steps": 3, "guidance_scales": [4.0]})
    study = load_config(study_file)
    lora = train(study, "r")
    with safe_open(str(lora), "pt") as handle:
        assert handle.metadata()["ss_sd_model_name"] == "finetune.safetensors", "the fine-tune it was trained on"
    ours = np.asarray(Image.open(generate(study, run="r") / "p00_s0_g4.png")).astype(int)

    def stock(pipe) -> np.ndarray:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
        pipe.set_progress_bar_config(disable=True)
        image = pipe(prompt="a photo of sks", height=64, width=64, num_inference_steps=3, guidance_scale=4.0,
                     generator=torch.Generator("cpu").manual_seed(0)).images[0]
        return np.asarray(image).astype(int)

    pipeline = family.pipeline_class()
    from_file = pipeline.from_single_file(str(file), config=str(resolve_base(base)), local_files_only=True,
                                          **family.pipeline_overrides())
    assert np.abs(ours - stock(from_file)).max() <= 1, "the stock pipeline from the file, with the LoRA"
    original = pipeline.from_pretrained(resolve_base(base), **family.pipeline_overrides())
    assert np.abs(ours - stock(original)).max() > 1, "the fine-tune's weights made the difference"

    # The model card's code, run in its folder with the fine-tune beside it, draws the card's first image.
    shared = tmp_path / "shared"
    result = run_in_process("export", str(study_file), "--run", "r", "--format", "diffusers", "--out",
                            str(shared / "sks.safetensors"), "--card")
    assert result.returncode == 0, result.stderr
    card = (shared / "README.md").read_text()
    shutil.copy(file, shared / file.name)
    monkeypatch.chdir(shared)
    scope: dict = {}
    exec(re.search(r"```python\n(.*?)```", card, re.S).group(1), scope)
    first = np.asarray(Image.open(shared / re.search(r"url: (images/\S+)", card).group(1))).astype(int)
    assert np.abs(np.asarray(scope["image"]).astype(int) - first).max() <= 1


def test_a_file_that_fails_as_its_parts_are_saved_is_refused_by_name(tmp_path, monkeypatch):
    """An SDXL file whose second text encoder is of another width than the base's (at the real widths) converts,
    leaving that encoder on the meta device, and fails only as it is saved ("Cannot copy out of meta tensor"):
    played here by that failure itself. One error line, and no folder left behind."""
    from transformers import CLIPTextModelWithProjection

    def on_the_meta_device(self, *args, **kwargs):
        raise NotImplementedError("Cannot copy out of meta tensor; no data!")

    file = tmp_path / "sdxl-finetune.safetensors"
    save_file(original_state_dict(fine_tuned(FAMILIES["sdxl"], tiny_sdxl()), True), str(file))
    monkeypatch.setattr(CLIPTextModelWithProjection, "save_pretrained", on_the_meta_device)
    with pytest.raises(LookalikeError, match=f"model.checkpoint: {file} is not a checkpoint of .*NotImplementedError: "
                                             "Cannot copy out of meta tensor"):
        checkpoint_folder(ModelConfig(base=tiny_sdxl(), checkpoint=file), tmp_path / "work")
    assert not (tmp_path / "work" / "bases").exists() or not any((tmp_path / "work" / "bases").iterdir())
