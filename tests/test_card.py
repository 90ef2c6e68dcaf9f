"""`lookalike export --card`: a model card beside the exported LoRA, as the Hugging Face Hub reads one, whose
measurements are the run's evaluation and whose code draws its first image with the stock pipeline."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import yaml
from PIL import Image

from lookalike import display
from lookalike.config import load_config
from lookalike.display import cell
from lookalike.evaluate.command import evaluate_runs
from lookalike.generate import generate
from lookalike.train.trainer import train
from lookalike.workspace import Workspace, read_json
from tests.conftest import run_in_process


@pytest.fixture
def evaluated_run(tiny_config, request):
    """A tiny FLUX.1 run (of a LoRA, or the adapter a test's parameter names) with its images drawn at two
    strengths, and scored."""
    adapter = getattr(request, "param", "lora")
    path = tiny_config(train={"max_train_steps": 2, "learning_rate": 1e-2, "adapter": adapter},
                       generate={"prompts": ["a photo of {token}", "{token} smiling"], "num_inference_steps": 3,
                                 "lora_scales": [0.5, 1.0]})
    config = load_config(path)
    quiet = display.console(quiet=True)
    train(config, "r4", console=quiet)
    generate(config, run="r4", console=quiet)
    evaluate_runs(config, quiet, run="r4")
    return path, config


@pytest.mark.slow
@pytest.mark.parametrize("evaluated_run", ["lora", "lokr"], indirect=True)
def test_the_card_describes_the_run_measures_it_and_draws_its_first_image(evaluated_run, tmp_path, monkeypatch):
    """A LoKr's card loads it with the denoiser's load_lora_adapter: FLUX.1's load_lora_weights takes no LoKr."""
    path, config = evaluated_run
    out = tmp_path / "shared" / "sks.safetensors"
    result = run_in_process("export", str(path), "--run", "r4", "--format", "diffusers", "--out", str(out), "--card")
    assert result.returncode == 0, result.stderr
    text = (out.parent / "README.md").read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["instance_prompt"] == "sks" and "lora" in front["tags"]
    lokr = config.train.adapter == "lokr"
    assert ("lokr" in front["tags"]) == lokr and f"# r4: a {'LoKr' if lokr else 'LoRA'} of `sks` (man)" in text
    assert "base_model" not in front, "a base built here has no Hub repository to name"
    run = Workspace(config.workspace).run("r4")
    widget = front["widget"]
    assert [entry["text"] for entry in widget] == ["a photo of sks", "sks smiling"], "the full-strength images"
    for entry in widget:
        copied = out.parent / entry["output"]["url"]
        original = run.images / copied.name.removeprefix("r4-final-")
        assert copied.read_bytes() == original.read_bytes()

    at_full = read_json(run.root / "metrics.json")["per_lora_scale"]["1.0"]
    assert f"| CLIP Score (prompt adherence) | {cell(at_full['clip_score'])} |" in text
    assert f"| images without a face | {cell(at_full['faceless'])} |" in text
    assert f"on its {at_full['images']} images at full strength" in text
    assert "| steps | 2 of 2 |" in text and "| photos | 4 |" in text

    # Its code, run as it stands in the card's folder, draws the card's first image (within 1/255).
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(out.parent)
    scope: dict = {}
    exec(code, scope)
    drawn = np.asarray(scope["image"]).astype(int)
    first = np.asarray(Image.open(out.parent / widget[0]["output"]["url"])).astype(int)
    assert np.abs(drawn - first).max() <= 1


@pytest.mark.slow
def test_a_readme_the_card_did_not_write_is_never_written_over(evaluated_run, tmp_path):
    path, _ = evaluated_run
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "README.md").write_text("# my notes\n")
    result = run_in_process("export", str(path), "--run", "r4", "--format", "comfyui", "--out",
                            str(theirs / "sks.safetensors"), "--card")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {theirs / 'README.md'}: a README.md that lookalike did not write is "
                                     "there; export with --out into another folder")
    assert os.listdir(theirs) == ["README.md"] and (theirs / "README.md").read_text() == "# my notes\n", \
        "refused before anything is written"
    # Nor an image of its own in a folder without lookalike's card.
    (theirs / "README.md").unlink()
    (theirs / "images").mkdir()
    (theirs / "images" / "r4-final-p00_s0_g5_l1.png").write_bytes(b"my picture")
    result = run_in_process("export", str(path), "--run", "r4", "--format", "comfyui", "--out",
                            str(theirs / "sks.safetensors"), "--card")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {theirs / 'images' / 'r4-final-p00_s0_g5_l1.png'}: a file lookalike "
                                     "did not write is there; export with --out into another folder")
    assert os.listdir(theirs) == ["images"] and os.listdir(theirs / "images") == ["r4-final-p00_s0_g5_l1.png"]
    assert (theirs / "images" / "r4-final-p00_s0_g5_l1.png").read_bytes() == b"my picture"
    ours = tmp_path / "ours"
    assert run_in_process("export", str(path), "--run", "r4", "--format", "comfyui", "--out",
                          str(ours / "sks.safetensors"), "--card").returncode == 0
    assert "LoraLoader" in (ours / "README.md").read_text()
    assert run_in_process("export", str(path), "--run", "r4", "--format", "comfyui", "--out",
                          str(ours / "sks.safetensors"), "--card", "--force").returncode == 0, \
        "its own card: written again"
    assert sorted(os.listdir(ours / "images")) == ["r4-final-p00_s0_g5_l1.png", "r4-final-p01_s0_g5_l1.png"]
    (ours / "README.md").unlink()  # a card cut short before its README: its own images are no one else's
    assert run_in_process("export", str(path), "--run", "r4", "--format", "comfyui", "--out",
                          str(ours / "sks.safetensors"), "--card", "--force").returncode == 0


def test_a_card_needs_a_run(tmp_path):
    result = run_in_process("export", "--lora", str(tmp_path / "x.safetensors"), "--card")
    assert result.returncode == 2 and "--card describes a run's LoRA: give CONFIG --run NAME" in result.stderr


@pytest.mark.slow
def test_a_card_of_a_run_not_drawn_yet_says_how_to_measure_it(tiny_config, tmp_path):
    path = tiny_config(train={"max_train_steps": 2})
    train(load_config(path), "r4", console=display.console(quiet=True))
    out = tmp_path / "shared" / "sks.safetensors"
    assert run_in_process("export", str(path), "--run", "r4", "--format", "diffusers", "--out", str(out),
                          "--card").returncode == 0
    text = (out.parent / "README.md").read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert "widget" not in front and not (out.parent / "images").exists()
    assert ("Not evaluated yet: `lookalike generate CONFIG --run r4 --checkpoint final`, then `lookalike evaluate "
            "CONFIG --run r4 --checkpoint final` measure it.") in text
    assert "image = pipe(\n    prompt='a photo of sks',\n    generator=" in text
