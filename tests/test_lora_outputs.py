"""Every command that writes a LoRA (merge, resize, export) refuses, with one `error:` line and every file left
byte-identical, an --out that is no .safetensors file, a source photo, a file lookalike manages, a LoRA being read,
or an existing file without --force; and no LoRA with NaN or infinite weights is written or drawn."""

from __future__ import annotations

import shutil

import pytest
import torch

from lookalike.workspace import write_json
from tests.helpers import digests, random_lora
from tests.conftest import run_in_process


@pytest.fixture
def study(tmp_path, faces, tiny_config):
    """A study whose runs `a`, `b` and `c` hold LoRAs, with its photos and class images in folders of its own."""
    photos = tmp_path / "photos"
    shutil.copytree(faces / "train" / "obama", photos)
    classes = tmp_path / "classes"
    shutil.copytree(faces / "train" / "biden", classes)
    config = tiny_config(subject={"images": str(photos)}, prior={"images": str(classes), "num_class_images": 2})
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        run = tmp_path / "work" / "runs" / name
        run.mkdir(parents=True)
        random_lora(run / "lora.safetensors", rank=2, alpha=2, target="attention", seed=seed)
        write_json(run / "status.json", {"state": "done"})
    (tmp_path / "work" / "data").mkdir()
    return config


def refused(*args: str, because: str, tmp_path) -> None:
    before = digests(tmp_path)
    result = run_in_process(*args)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --out: ") and because in lines[0], result.stderr
    assert digests(tmp_path) == before, "a refused command changed a file"


def test_a_lora_is_never_written_over_a_photo_a_managed_file_or_a_source(study, tmp_path):
    work, photo = tmp_path / "work", tmp_path / "photos" / "1.jpg"
    config = str(study)
    # The reported faults: export over the subject's photo; merge over another run's trained LoRA.
    refused("export", config, "--run", "a", "--out", str(photo), because="must end in .safetensors", tmp_path=tmp_path)
    refused("merge", "a", "b@final", "--config", config, "--out", str(work / "runs" / "c" / "lora.safetensors"),
            "--force", because="inside the workspace's runs/ folder", tmp_path=tmp_path)
    # Without a config, a workspace is still known by its files.
    refused("merge", str(work / "runs" / "a" / "lora.safetensors"), str(work / "runs" / "b" / "lora.safetensors"),
            "--out", str(work / "runs" / "d" / "lora.safetensors"), because="runs/ folder", tmp_path=tmp_path)
    for folder in ("data", "prior", "bases"):
        refused("resize", "a", "--config", config, "--rank", "1", "--out", str(work / folder / "x.safetensors"),
                because=f"inside the workspace's {folder}/ folder", tmp_path=tmp_path)
    for folder in ("photos", "classes"):
        refused("export", config, "--run", "a", "--out", str(tmp_path / folder / "a.safetensors"),
                because=f"inside the study's photo folder {tmp_path / folder}", tmp_path=tmp_path)
    refused("export", "--lora", str(work / "runs" / "a" / "lora.safetensors"), "--out",
            str(work / "runs" / "a" / "lora.safetensors"), "--force", because="a LoRA being read", tmp_path=tmp_path)
    (tmp_path / "shared.safetensors").mkdir()
    refused("export", config, "--run", "a", "--out", str(tmp_path / "shared.safetensors"), because="is a folder",
            tmp_path=tmp_path)


def test_an_existing_file_is_replaced_only_with_force(study, tmp_path):
    out = tmp_path / "ab.safetensors"
    out.write_bytes(b"the user's own file")
    refused("merge", "a", "b", "--config", str(study), "--out", str(out), because="already exists; give --force",
            tmp_path=tmp_path)
    assert run_in_process("merge", "a", "b", "--config", str(study), "--out", str(out), "--force").returncode == 0
    assert out.read_bytes() != b"the user's own file"
    # An export into the workspace's own root (not a managed folder) is a user's file like any other.
    inside = tmp_path / "work" / "shared" / "a.safetensors"
    assert run_in_process("export", str(study), "--run", "a", "--out", str(inside)).returncode == 0
    refused("export", str(study), "--run", "a", "--out", str(inside), because="already exists", tmp_path=tmp_path)


def test_a_merge_whose_weights_overflow_writes_nothing_and_a_non_finite_file_is_never_drawn(study, tmp_path,
                                                                                          tiny_config):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "huge.safetensors"
    result = run_in_process("merge", "a", "b", "--config", str(study), "--out", str(out), "--weights", "1e308,1e308")
    assert result.returncode == 2 and "NaN or infinite values" in result.stderr, result.stderr
    assert not out.exists()
    # A file made elsewhere with an infinite weight: generate refuses it by name rather than draw noise with it.
    lora = tmp_path / "work" / "runs" / "a" / "lora.safetensors"
    tensors = load_file(lora)
    key = sorted(tensors)[0]
    tensors[key] = torch.full_like(tensors[key], float("inf"))
    poisoned = tmp_path / "poisoned.safetensors"
    save_file(tensors, str(poisoned), metadata={"format": "pt"})
    result = run_in_process("generate", str(study), "--lora", str(poisoned))
    assert result.returncode == 2 and f"{poisoned}: its LoRA weights would hold NaN or infinite values" in \
        result.stderr, result.stderr
