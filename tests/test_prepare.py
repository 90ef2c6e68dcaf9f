"""lookalike prepare on the real faces: crops, checks, bad files, idempotent re-runs."""

from __future__ import annotations

import hashlib
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from lookalike.config import load_config
from lookalike.data.images import load_rgb
from lookalike.data.prepare import prepare
from lookalike.faces import FaceRule
from lookalike.faces.facenet_backend import MtcnnDetector
from tests.conftest import run_cli

PEOPLE = ("obama", "biden", "alex_lacamoire")


def run_prepare(tiny_config, photos, checks=None, **data):
    sections = {"data.checks": checks} if checks else {}
    config = load_config(tiny_config(subject={"images": str(photos)}, data={"resolution": 128, **data}, **sections))
    return config, prepare(config, Console(file=io.StringIO()))


def by_name(photos):
    return {p.source.rsplit("/", 1)[-1]: p for p in photos}


@pytest.fixture(scope="module")
def detector():
    return MtcnnDetector()


@pytest.mark.parametrize("person", PEOPLE)
def test_every_training_photo_gets_a_crop_at_the_size_around_its_face(person, tiny_config, faces, detector):
    config, photos = run_prepare(tiny_config, faces / "train" / person)
    assert [p.status for p in photos] == ["kept"] * 4
    for photo in photos:
        left, top, right, bottom = photo.faces[photo.face]["box"]
        c_left, c_top, c_right, c_bottom = photo.crop_box
        assert c_left <= left and c_top <= top and right <= c_right and bottom <= c_bottom, photo.source
        crop = Image.open(config.workspace / "data" / photo.output)
        assert crop.size == (128, 128)
        assert FaceRule(0.95, 0.2).faces(detector, crop), f"no upright face in the crop of {photo.source}"
        assert (config.workspace / "data" / photo.output).with_suffix(".txt").read_text() == "a photo of sks"


def test_exif_orientation_is_applied_before_cropping(tiny_config, faces, tmp_path):
    """A photo stored sideways with an EXIF 'rotate 90' tag gives the same crop as the upright photo."""
    upright = Image.open(faces / "train" / "biden" / "1.jpg").convert("RGB")
    folder = tmp_path / "photos"
    folder.mkdir()
    upright.save(folder / "a_upright.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # the stored pixels must be turned 90 degrees clockwise to be seen upright
    upright.transpose(Image.Transpose.ROTATE_90).save(folder / "b_sideways.jpg", quality=95, exif=exif)
    config, photos = run_prepare(tiny_config, folder, near_duplicate_bits=0, min_photos=1,
                                 checks={"duplicate": "off"})
    first, second = (np.asarray(Image.open(config.workspace / "data" / p.output), dtype=float) for p in photos)
    assert photos[1].size == list(upright.size)
    assert np.abs(first - second).mean() < 8, "the sideways file was cropped as it is seen, upright"


def test_a_stranger_among_the_photos_is_the_only_identity_outlier(tiny_config, faces, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(faces / "train" / "obama", folder)
    shutil.copy(faces / "test" / "biden.jpg", folder / "5.jpg")
    _, photos = run_prepare(tiny_config, folder)
    flagged = {name for name, p in by_name(photos).items() if p.checks["identity_outlier"]["result"] != "pass"}
    assert flagged == {"5.jpg"}
    assert by_name(photos)["5.jpg"].status == "excluded"
    assert "looks like someone else" in by_name(photos)["5.jpg"].reasons[0]


def test_a_group_photo_is_flagged_and_the_subjects_face_is_used(tiny_config, faces, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("obama.jpg", "obama_and_biden.jpg"):
        shutil.copy(faces / "group" / name, folder / name)
    _, photos = run_prepare(tiny_config, folder, min_photos=1)
    group = by_name(photos)["obama_and_biden.jpg"]
    assert group.checks["several_faces"]["result"] == "warn" and group.status == "kept"
    assert "2 faces; used face" in group.checks["several_faces"]["reason"]
    obama = np.asarray(by_name(photos)["obama.jpg"].embeddings[0])
    distances = [np.linalg.norm(np.asarray(e) - obama) for e in group.embeddings]
    assert group.face == int(np.argmin(distances)), "the face chosen is the one most like the other photo"


def bad_corpus(folder, faces):
    """Broken and awkward files, plus one real photo in several encodings."""
    portrait = Image.open(faces / "test" / "obama.jpg").convert("RGB")
    jpeg = io.BytesIO()
    portrait.save(jpeg, format="JPEG")
    (folder / "zero_bytes.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (folder / "text.jpg").write_text("not an image")
    Image.new("RGB", (1, 1)).save(folder / "one_pixel.png")
    Image.new("1", (9000, 8000)).save(folder / "bomb.png")  # 72 M pixels in a few kB
    portrait.convert("CMYK").save(folder / "cmyk.jpg")
    grey16 = (np.asarray(portrait.convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(grey16).save(folder / "grey16.png")
    assert Image.open(folder / "grey16.png").mode.startswith("I")
    with_alpha = portrait.convert("RGBA")
    with_alpha.putalpha(200)
    with_alpha.save(folder / "alpha.png")
    mirrored = portrait.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    portrait.save(folder / "animated.gif", save_all=True, append_images=[mirrored])


def test_bad_files_each_get_a_reason_and_stop_nothing(tiny_config, faces, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(faces / "train" / "obama", folder)
    bad_corpus(folder, faces)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}

    _, photos = run_prepare(tiny_config, folder)
    photos = by_name(photos)
    assert {photos[f"{i}.jpg"].status for i in range(1, 5)} == {"kept"}
    for name in ("zero_bytes.jpg", "truncated.jpg", "text.jpg", "bomb.png"):
        assert photos[name].status == "excluded" and photos[name].reasons[0].startswith("unreadable"), name
    assert "pixels" in photos["bomb.png"].reasons[0]
    assert photos["one_pixel.png"].reasons == ["no face found"]
    for name in ("cmyk.jpg", "grey16.png", "alpha.png", "animated.gif"):  # decoded as the photo it is
        assert len(photos[name].faces) == 1 and photos[name].faces[0]["probability"] > 0.99, name
    assert any("first of its 2 frames" in reason for reason in photos["animated.gif"].reasons)
    encodings = [photos[n] for n in ("alpha.png", "animated.gif", "cmyk.jpg", "grey16.png")]
    assert [p.status for p in encodings].count("kept") == 1, "one encoding kept, the others near duplicates"
    assert all("near duplicate of alpha.png" in p.reasons[-1] for p in encodings[1:])
    assert "note: transparency flattened onto white" in photos["alpha.png"].reasons
    assert "note: converted from CMYK to RGB" in photos["cmyk.jpg"].reasons
    assert all(photos[name].reasons for name in photos if name not in {f"{i}.jpg" for i in range(1, 5)})
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()} == before


@pytest.mark.slow
def test_rerun_does_nothing_and_a_changed_photo_is_redone(tiny_config, faces, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(faces / "train" / "alex_lacamoire", folder)
    config_file = tiny_config(subject={"images": str(folder)}, data={"resolution": 128})
    assert run_cli("prepare", str(config_file)).returncode == 0
    data = tmp_path / "work" / "data"
    stamps = {p: p.stat().st_mtime_ns for p in data.rglob("*") if p.is_file()}

    again = run_cli("prepare", str(config_file))
    assert again.returncode == 0 and "prepare sks: up to date (4 photos kept" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*") if p.is_file()} == stamps

    shutil.copy(faces / "test" / "alex_lacamoire.jpg", folder / "2.jpg")
    changed = run_cli("prepare", str(config_file))
    assert changed.returncode == 0 and "1 photos inspected" in changed.stdout
    manifest = json.loads((data / "manifest.json").read_text())
    outputs = sorted(p["output"] for p in manifest["photos"])
    assert sorted(f"images/{p.name}" for p in (data / "images").glob("*.png")) == outputs, "the old crop is gone"
    assert load_rgb(data / outputs[0]).size == (128, 128)


@pytest.mark.slow
def test_too_few_photos_is_an_error_that_points_at_the_report(tiny_config, faces, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(faces / "test" / "biden.jpg", folder / "1.jpg")
    result = run_cli("prepare", str(tiny_config(subject={"images": str(folder)})))
    assert result.returncode == 2
    assert "only 1 usable photos" in result.stderr and "data.min_photos is 3" in result.stderr
    assert "qa.html" in result.stderr and (tmp_path / "work" / "data" / "qa.html").is_file()


@pytest.mark.slow
def test_processes_sharing_a_workspace_prepare_one_at_a_time(tiny_config, tmp_path):
    """A sweep's parallel runs all prepare the same data: while one holds the workspace's prepare lock, another
    waits (it would otherwise remove the crops the first is still writing), then finds everything done."""
    import subprocess
    import sys
    import time

    from lookalike.workspace import Workspace, exclusive

    config = tiny_config()
    with exclusive(Workspace(tmp_path / "work").data / ".prepare.lock"):
        waiting = subprocess.Popen([sys.executable, "-m", "lookalike", "prepare", str(config)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(8)  # long enough to prepare 4 photos many times over
        assert waiting.poll() is None, "the second process went on while the lock was held"
        assert not (tmp_path / "work" / "data" / "manifest.json").exists()
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err
    assert "4 photos inspected, 4 kept" in out, "the waiting process did the work once the lock was free"
