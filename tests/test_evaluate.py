"""`lookalike evaluate` on plain folders: real photos, noise and blank images, an unreadable file."""

import csv
import json
import shutil

import numpy as np
from PIL import Image

from tests.conftest import run_cli


def test_evaluate_folders_scores_every_image_and_counts_face_failures(faces, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for person in ("paul_allen", "elon_musk"):
        shutil.copy(faces / "test" / f"{person}.jpg", images / f"{person}.jpg")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(
        images / "noise.png")
    Image.new("RGB", (256, 256), (200, 200, 200)).save(images / "blank.png")
    (images / "broken.jpg").write_text("a text file named .jpg")
    (tmp_path / "prompts.txt").write_text("a photo of a man\n")

    result = run_cli("evaluate", "--images", str(images), "--references", str(faces / "train" / "paul_allen"),
                     "--prompts", str(tmp_path / "prompts.txt"), "--face-backend", "dlib", "--clip-model", "tiny",
                     "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    rows = {row["image"]: row for row in csv.DictReader((tmp_path / "out" / "scores.csv").open())}
    assert set(rows) == {"paul_allen.jpg", "elon_musk.jpg", "noise.png", "blank.png", "broken.jpg"}
    assert rows["paul_allen.jpg"]["id_match"] == "True" and rows["elon_musk.jpg"]["id_match"] == "False"
    assert float(rows["paul_allen.jpg"]["face_distance"]) < float(rows["elon_musk.jpg"]["face_distance"])
    assert rows["noise.png"]["face_found"] == "False" and rows["blank.png"]["face_found"] == "False"
    assert "unreadable" in rows["broken.jpg"]["error"]
    assert all(rows[name]["clip_score"] for name in ("paul_allen.jpg", "noise.png"))

    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (metrics["images"], metrics["unreadable"], metrics["faceless"]) == (5, 1, 2)
    assert metrics["id_match_rate"] == 0.25
    assert metrics["face_distance"] == np.mean([float(rows[n]["face_distance"])
                                                for n in ("paul_allen.jpg", "elon_musk.jpg")])
    assert metrics["face_backend"] == "dlib" and metrics["face_backend_version"]


def test_references_without_any_face_is_a_clear_error(tmp_path):
    references = tmp_path / "refs"
    references.mkdir()
    Image.new("RGB", (128, 128)).save(references / "dark.png")
    result = run_cli("evaluate", "--images", str(references), "--references", str(references),
                     "--face-backend", "dlib")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: references: no face found in any photo of {references}"
