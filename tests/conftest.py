"""Shared fixtures: an isolated lookalike home (the tiny model is built once per test session), the real test
faces laid out as a study uses them, a writer of study configs on the tiny model, and a tiny random captioning model."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# One thread per torch process: the tiny models gain nothing from two, and tests that run two processes at once
# (a sweep's jobs, distributed ranks) on 2 cores ran a step up to 15 times slower with two threads each. Set
# before torch is imported, here and in every lookalike process a test starts.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# pytest-xdist (`make test` runs the tests on two workers) gives its workers COLUMNS=80, and lookalike's console
# would then wrap long paths where a plain run prints them whole: the commands a test starts see no such setting.
if "PYTEST_XDIST_WORKER" in os.environ:
    for name in ("COLUMNS", "LINES"):
        os.environ.pop(name, None)


@pytest.fixture(scope="session", autouse=True)
def lookalike_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("lookalike-home")
    os.environ["LOOKALIKE_HOME"] = str(home)
    os.environ["HF_HUB_OFFLINE"] = "1"  # no hub here; make that explicit rather than waiting for timeouts
    return home


# Real face photos kept in the repository, with their licence and sources (tests/data/faces/SOURCES.md).
PHOTOS = REPO / "tests" / "data" / "faces"
# Each person's photos in the repository, and the one of them held out of training (test/<person>.jpg).
PEOPLE = {"obama": (["1.jpg", "2.jpg", "3.jpg", "4.jpg"], "held_out.jpg"),
          "biden": (["1.jpg"], "2.jpg"),
          "alex_lacamoire": (["1.png"], "2.jpg")}


@pytest.fixture(scope="session")
def faces(tmp_path_factory) -> Path:
    """The test photos laid out as a study uses them: train/<person>/1..4.jpg (a person with fewer photos of their
    own gets them mirrored, and turned by a few degrees, as more photos), test/<person>.jpg held out of training,
    test/lin_manuel_miranda.jpg a person seen nowhere else, and group/ a photo of two people with a reference
    photo of each. Made once per session from tests/data/faces."""
    from PIL import Image, ImageOps

    folder = tmp_path_factory.mktemp("faces")
    for person, (training, held_out) in PEOPLE.items():
        photos = [Image.open(PHOTOS / person / name).convert("RGB") for name in training]
        variants = photos + [ImageOps.mirror(photo) for photo in photos] + \
            [photo.rotate(angle, resample=Image.BICUBIC) for angle in (6, -6) for photo in photos]
        (folder / "train" / person).mkdir(parents=True)
        for index, photo in enumerate(variants[:4], start=1):
            photo.save(folder / "train" / person / f"{index}.jpg", quality=95)
        (folder / "test").mkdir(exist_ok=True)
        Image.open(PHOTOS / person / held_out).convert("RGB").save(folder / "test" / f"{person}.jpg", quality=95)
    Image.open(PHOTOS / "unknown" / "lin_manuel_miranda.png").convert("RGB").save(
        folder / "test" / "lin_manuel_miranda.jpg", quality=95)
    (folder / "group").mkdir()
    shutil.copy(PHOTOS / "group" / "obama_and_biden.jpg", folder / "group" / "obama_and_biden.jpg")
    shutil.copy(PHOTOS / "obama" / "1.jpg", folder / "group" / "obama.jpg")
    shutil.copy(PHOTOS / "biden" / "1.jpg", folder / "group" / "biden.jpg")
    return folder


def toml_value(value) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)


def write_config(path: Path, sections: dict) -> Path:
    """Write a TOML config from {"": top-level keys, "section": {...}}."""
    lines = [f"{k} = {toml_value(v)}" for k, v in sections.get("", {}).items()]
    for name, keys in sections.items():
        if name:
            lines.append(f"[{name}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in keys.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_study(folder: Path, faces: Path, name: str = "study.toml", **sections) -> Path:
    """A config file for the tiny model on one real person's photos, workspace folder/work; sections override."""
    base = {
        "": {"name": "test", "workspace": str(folder / "work")},
        "model": {"base": "tiny"},
        "subject": {"token": "sks", "class_word": "man", "images": str(faces / "train" / "obama")},
        "data": {"resolution": 64},
        "train": {"max_train_steps": 20, "checkpoint_every": 0, "sample_every": 0, "rank": 4},
        # One guidance scale for every base, so that image names (p00_s0_g5) do not follow each base's own default.
        "generate": {"seeds": [0], "num_inference_steps": 4, "guidance_scales": [5.0]},
        "evaluate": {"face_backend": "dlib", "clip_model": "tiny"},  # offline: facenet and CLIP cannot be downloaded
    }
    for section, keys in sections.items():
        base.setdefault(section, {}).update(keys)
    return write_config(folder / name, base)


@pytest.fixture
def tiny_config(tmp_path, faces):
    """A function making a tiny study's config file in the test's folder; sections override."""

    def make(name: str = "study.toml", **sections) -> Path:
        return tiny_study(tmp_path, faces, name, **sections)

    return make


@pytest.fixture(scope="session")
def tiny_blip(tmp_path_factory):
    """A BlipForConditionalGeneration with its BlipProcessor (a BertTokenizer over a few words), random weights."""
    import string

    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder = tmp_path_factory.mktemp("tiny-blip")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *string.ascii_lowercase, "man", "photo", "suit"]
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(words)) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]", model_max_length=64)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.sep_token_id, sep_token_id=tokenizer.sep_token_id,
                pad_token_id=tokenizer.pad_token_id, encoder_hidden_size=32)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(1)
    BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32)) \
        .save_pretrained(folder / "model")
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer) \
        .save_pretrained(folder / "model")
    return folder / "model"


def run_in_process(*args: str) -> subprocess.CompletedProcess:
    """`lookalike ARGS` through the same entry point as run_cli, in this process: its exit code, stdout and
    stderr, without a new interpreter's seconds of imports (for commands that fail or finish fast)."""
    import contextlib
    import io
    import signal
    from unittest import mock

    from lookalike.cli import main

    out, err, code = io.StringIO(), io.StringIO(), 0
    handler = signal.getsignal(signal.SIGTERM)  # main() sets its own
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            mock.patch.object(sys, "argv", ["lookalike", *args]):
        try:
            main()
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
        finally:
            signal.signal(signal.SIGTERM, handler)
    return subprocess.CompletedProcess(["lookalike", *args], code, out.getvalue(), err.getvalue())


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m lookalike ARGS` as a user would, capturing its output."""
    return subprocess.run([sys.executable, "-m", "lookalike", *args], capture_output=True, text=True,
                          timeout=timeout, env=os.environ.copy())


def drawn_by_its_lora(run, facts: dict) -> dict:
    """A run's image's sidecar facts as generate writes them: its settings name the run's LoRA file by content (a
    stand-in file is made where the run has none), as evaluate, the card and the report check."""
    from lookalike.workspace import file_sha256

    if not run.lora.is_file():
        run.lora.parent.mkdir(parents=True, exist_ok=True)
        run.lora.write_bytes(b"stands in for the run's LoRA, which the report's image grid fingerprints")
    return {**facts, "settings": {"loras": [{"sha256": file_sha256(run.lora), "weight": 1.0}]}}
