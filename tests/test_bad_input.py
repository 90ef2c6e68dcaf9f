"""The bad-input corpus: every mistake and hostile file a user may hand lookalike gives exit code 2 and one line
that starts with `error:`, never a traceback, and leaves every file it was given byte-identical."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tests.conftest import run_in_process, tiny_study, write_config


def lora_file(path: Path, tensors: dict, adapter: str | None = '{"r": 2, "lora_alpha": 2}') -> Path:
    metadata = {"format": "pt", **({"lora_adapter_metadata": adapter} if adapter is not None else {})}
    save_file(tensors, str(path), metadata=metadata)
    return path


def header_only(path: Path, length: int, header: bytes) -> Path:
    path.write_bytes(struct.pack("<Q", length) + header)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, faces) -> Path:
    """Every bad input, made once: folders of non-photos, broken images, hostile LoRA files, odd configs."""
    root = tmp_path_factory.mktemp("corpus")
    good_photos = faces / "train" / "obama"
    (root / "empty").mkdir()
    (root / "texts").mkdir()
    (root / "texts" / "notes.jpg").write_text("not an image")
    broken = root / "broken"
    broken.mkdir()
    (broken / "zero.jpg").write_bytes(b"")
    (broken / "truncated.jpg").write_bytes(next(good_photos.iterdir()).read_bytes()[:2000])
    Image.new("L", (9000, 8000)).save(broken / "bomb.png")
    loop = root / "loop"
    loop.mkdir()
    (loop / "a").symlink_to(loop / "b")
    (loop / "b").symlink_to(loop / "a")
    (root / "looping").symlink_to(root / "looping")  # a photo folder that is itself a symlink loop
    for folder in ("latin1", "caption_folder"):  # good photos, with a caption that cannot be read
        (root / folder).mkdir()
        for photo in sorted(good_photos.iterdir()):
            (root / folder / photo.name).write_bytes(photo.read_bytes())
    (root / "latin1" / "1.txt").write_bytes("a photo of sks at the café".encode("latin-1"))
    (root / "caption_folder" / "1.txt").mkdir()
    (root / "taken.safetensors").mkdir()

    a = torch.ones(2, 8)
    b = torch.ones(8, 2)
    key = "transformer.transformer_blocks.0.attn.to_q"
    lora_file(root / "good.safetensors", {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b})
    lora_file(root / "only_a.safetensors", {f"{key}.lora_A.weight": a})
    lora_file(root / "one_d.safetensors", {f"{key}.lora_A.weight": torch.ones(8), f"{key}.lora_B.weight": b})
    lora_file(root / "bad_meta.safetensors", {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}, "{nope")
    lora_file(root / "rank0.safetensors", {f"{key}.lora_A.weight": torch.ones(0, 8),
                                          f"{key}.lora_B.weight": torch.ones(8, 0)}, '{"r": 0, "lora_alpha": 0}')
    lora_file(root / "nan.safetensors", {f"{key}.lora_A.weight": a * float("nan"), f"{key}.lora_B.weight": b})
    header_only(root / "huge_header.safetensors", 2**60, b"{}")
    header_only(root / "bad_header.safetensors", 8, b"{{{{{{{{")
    (root / "pickle.safetensors.pt").write_bytes(b"\x80\x04K\x01.")

    (root / "photo.toml").write_bytes(next(good_photos.iterdir()).read_bytes())
    Image.new("RGB", (8, 8)).save(root / "config.jpg")
    (root / "list.json").write_text(json.dumps([1, 2, 3]))
    (root / "prompts.bin").write_bytes(bytes(range(256)) * 4)
    (root / "typo.toml").write_text('name = "t"\nworkspace = "w"\n[subject]\ntoken = "sks"\nimages = "empty"\n'
                                    '[trian]\nrank = 4\n')
    return root


def study(corpus: Path, faces: Path, images: str | Path | None = None, name: str = "study.toml", **sections) -> str:
    config = tiny_study(corpus, faces, name, **sections)
    if images is not None:
        config.write_text(config.read_text().replace(str(faces / "train" / "obama"),
                                                     str(corpus / images if isinstance(images, str) else images)))
    return str(config)


CASES = {
    "typo in a section": lambda c, f: ["prepare", str(c / "typo.toml")],
    "typo in a key": lambda c, f: ["train", study(c, f), "--set", "train.rnak=4", "--dry-run"],
    "wrong type": lambda c, f: ["train", study(c, f), "--set", "train.rank='sixteen'", "--dry-run"],
    "--set without =": lambda c, f: ["train", study(c, f), "--set", "train.rank", "--dry-run"],
    "infinite learning rate": lambda c, f: ["train", study(c, f), "--set", "train.learning_rate=inf", "--dry-run"],
    "NaN logit mean": lambda c, f: ["train", study(c, f), "--set", "train.logit_mean=nan", "--dry-run"],
    "resolution past the limit": lambda c, f: ["prepare", study(c, f), "--set", "data.resolution=8192"],
    "missing photo folder": lambda c, f: ["prepare", study(c, f, "nowhere")],
    "empty photo folder": lambda c, f: ["prepare", study(c, f, "empty")],
    "a folder of text files": lambda c, f: ["prepare", study(c, f, "texts")],
    "zero-byte, truncated, bomb": lambda c, f: ["prepare", study(c, f, "broken")],
    "symlink loops in the folder": lambda c, f: ["prepare", study(c, f, "loop")],
    "a folder that is a symlink loop": lambda c, f: ["prepare", study(c, f, "looping")],
    "photos in the workspace's data": lambda c, f: ["prepare", study(c, f, "work/data/qa")],
    "missing config": lambda c, f: ["prepare", str(c / "nope.toml")],
    "a photo named .toml": lambda c, f: ["prepare", str(c / "photo.toml")],
    "an image as the config": lambda c, f: ["prepare", str(c / "config.jpg")],
    "a JSON list as config, with --set": lambda c, f: ["train", str(c / "list.json"), "--set", "train.rank=4"],
    "run name escaping the workspace": lambda c, f: ["train", study(c, f), "--run", "../../x"],
    "empty run name": lambda c, f: ["train", study(c, f), "--run", ""],
    "a LoRA file as an SD checkpoint": lambda c, f: ["train", study(c, f, model={
        "base": "tiny-sd15", "checkpoint": str(c / "good.safetensors")})],
    "demo: a fine-tune that is not of the base": lambda c, f: ["demo", study(c, f, model={
        "base": "tiny-sd15", "checkpoint": str(c / "good.safetensors")}), "--port", "1"],
    "pickle LoRA": lambda c, f: ["generate", study(c, f), "--lora", str(c / "pickle.safetensors.pt")],
    "huge safetensors header": lambda c, f: ["generate", study(c, f), "--lora", str(c / "huge_header.safetensors")],
    "garbled safetensors header": lambda c, f: ["generate", study(c, f), "--lora", str(c / "bad_header.safetensors")],
    "export: only lora_A": lambda c, f: ["export", "--lora", str(c / "only_a.safetensors"), "--out",
                                         str(c / "out" / "x.safetensors")],
    "export: 1-D tensors": lambda c, f: ["export", "--lora", str(c / "one_d.safetensors"), "--out",
                                         str(c / "out" / "x.safetensors")],
    "export: metadata not JSON": lambda c, f: ["export", "--lora", str(c / "bad_meta.safetensors"), "--out",
                                               str(c / "out" / "x.safetensors")],
    "export: --out is its source": lambda c, f: ["export", "--lora", str(c / "good.safetensors"), "--out",
                                                 str(c / "good.safetensors")],
    "export: unknown dtype": lambda c, f: ["export", "--lora", str(c / "good.safetensors"), "--out",
                                           str(c / "out" / "x.safetensors"), "--dtype", "fp8"],
        "merge: rank 0": lambda c, f: ["merge", str(c / "good.safetensors"), str(c / "rank0.safetensors"), "--out",
                                   str(c / "out" / "m.safetensors")],
    "merge: NaN weights in a file": lambda c, f: ["merge", str(c / "good.safetensors"), str(c / "nan.safetensors"),
                                                  "--out", str(c / "out" / "m.safetensors")],
    "merge: --weights nan,inf": lambda c, f: ["merge", str(c / "good.safetensors"), str(c / "good.safetensors"),
                                              "--out", str(c / "out" / "m.safetensors"), "--weights", "nan,inf"],
    "merge: --out is an input": lambda c, f: ["merge", str(c / "good.safetensors"), str(c / "good.safetensors"),
                                              "--out", str(c / "good.safetensors")],
    "merge: --out not safetensors": lambda c, f: ["merge", str(c / "good.safetensors"),
                                                  str(c / "good.safetensors"), "--out", str(c / "out" / "m.pt")],
    "resize: NaN weights": lambda c, f: ["resize", str(c / "nan.safetensors"), "--rank", "1", "--out",
                                         str(c / "out" / "r.safetensors")],
    "resize: --out is its source": lambda c, f: ["resize", str(c / "good.safetensors"), "--rank", "1", "--out",
                                                 str(c / "good.safetensors")],
    "resize: --rank 0": lambda c, f: ["resize", str(c / "good.safetensors"), "--rank", "0", "--out",
                                      str(c / "out" / "r.safetensors")],
    "a caption in Latin-1": lambda c, f: ["prepare", study(c, f, "latin1", data={"crop": "center"})],
    "a folder in a caption's place": lambda c, f: ["prepare", study(c, f, "caption_folder", data={"crop": "center"})],
    "export: --out is a folder": lambda c, f: ["export", "--lora", str(c / "good.safetensors"), "--out",
                                               str(c / "taken.safetensors")],
    "export: --out is a photo": lambda c, f: ["export", "--lora", str(c / "good.safetensors"), "--out",
                                              str(c / "latin1" / "1.jpg")],
    "merge: weights that overflow": lambda c, f: ["merge", str(c / "good.safetensors"), str(c / "good.safetensors"),
                                                  "--out", str(c / "out" / "m.safetensors"), "--weights",
                                                  "1e308,1e308"],
    "generate: NaN weights in a file": lambda c, f: ["generate", study(c, f), "--lora", str(c / "nan.safetensors")],
    "evaluate: binary prompts file": lambda c, f: ["evaluate", "--images", str(f / "test"), "--references",
                                                   str(f / "train" / "obama"), "--prompts",
                                                   str(c / "prompts.bin"), "--clip-model", "tiny",
                                                   "--face-backend", "dlib", "--out", str(c / "out")],
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_error_line_and_changes_no_file(corpus, faces, case):
    args = CASES[case](corpus, faces)
    watched = [corpus, faces]
    before = [_digests(folder) for folder in watched]
    result = run_in_process(*args)
    assert result.returncode == 2, (case, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (case, result.stderr)
    assert [_digests(folder) for folder in watched] == before, case
    assert not (corpus / "out" / "m.safetensors").exists() and not (corpus / "x").exists()


def _digests(folder: Path) -> dict[str, str]:
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink() and "work" not in path.relative_to(folder).parts:
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def test_the_corpus_config_writer_makes_valid_configs(corpus, faces):
    """The corpus's study() itself is sound: with good photos, the same config prepares (the failures above are
    the inputs', not the harness's)."""
    config = write_config(corpus / "good.toml", {"": {"name": "g", "workspace": str(corpus / "good_work")},
                                                 "subject": {"token": "sks", "images": str(faces / "train" /
                                                                                            "obama")},
                                                 "data": {"resolution": 64, "crop": "center"},
                                                 "evaluate": {"face_backend": "dlib"}})
    assert run_in_process("prepare", str(config)).returncode == 0
