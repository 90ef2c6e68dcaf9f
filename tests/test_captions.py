"""Captions by a vision-language model: a tiny random BLIP (the real classes, built offline) describes each kept
photo, the trigger word takes the person's place, the captions are written once where a user may edit them, shown
in qa.html, and trained on."""

from __future__ import annotations

import codecs
import html
from pathlib import Path

import pytest

from lookalike import display
from lookalike.config import load_config
from lookalike.data.captions import Captioner, caption_file, with_trigger
from lookalike.data.crop import crop_and_resize
from lookalike.data.images import load_rgb
from lookalike.data.prepare import prepare_study, prepared_photos
from tests.conftest import run_in_process


def test_the_trigger_word_takes_the_place_of_the_person_described():
    assert with_trigger("a man in a suit at a desk", "man") == "{token} man in a suit at a desk"
    assert with_trigger("The smiling woman waves", "woman") == "{token} woman waves"
    assert with_trigger("an old gentleman reading", "man") == "{token} gentleman reading"
    assert with_trigger("a red car on a street", "man") == "{token} man, a red car on a street"
    assert with_trigger("", "man") == "{token} man"


def test_photos_are_captioned_once_editably_shown_and_trained_on(tiny_config, tiny_blip):
    config = load_config(tiny_config(data={"resolution": 64, "captioner": str(tiny_blip)}))
    quiet = display.console(quiet=True)
    photos = [p for p in prepare_study(config, quiet)["sks"] if p.status == "kept"]
    data = config.workspace / "data"
    captioner = Captioner(str(tiny_blip))
    for photo in photos:  # the model's words for the training crop, the trigger word in front of them
        crop = crop_and_resize(load_rgb(Path(photo.source)), tuple(photo.crop_box), 64)
        assert caption_file(data, photo).read_text() == with_trigger(captioner.describe(crop), "man") + "\n"
    files = sorted((data / "captions").glob("*.txt"))
    assert len(files) == len(photos) == 4
    captions = [photo.caption for photo in prepared_photos(config, quiet)]
    assert all(caption.startswith("sks man, ") for caption in captions), captions
    assert html.escape(captions[0]) in (data / "qa.html").read_text()

    # An edited caption is kept, and used from then on, with the captioner set or not.
    files[0].write_text("{token} man at the beach\n")
    plain = config.model_copy(update={"data": config.data.model_copy(update={"captioner": None})})
    assert "sks man at the beach" in [photo.caption for photo in prepared_photos(plain, quiet)]
    assert files[0].read_text() == "{token} man at the beach\n"
    for photo in prepared_photos(plain, quiet):
        assert photo.crop.with_suffix(".txt").read_text() == photo.caption, "the caption beside the crop trains"


def test_the_caption_command_captions_with_the_model_it_is_given(tiny_config, tiny_blip):
    path = tiny_config()
    result = run_in_process("caption", str(path))
    assert result.returncode == 2 and "give --model ID, or set [data] captioner" in result.stderr
    assert run_in_process("caption", str(path), "--model", str(tiny_blip)).returncode == 0
    assert len(list((load_config(path).workspace / "data" / "captions").glob("*.txt"))) == 4


def test_a_caption_file_is_read_in_the_encoding_its_byte_order_mark_names(tmp_path):
    """Notepad's UTF-16, and UTF-8 with or without a mark, read alike; another encoding is refused by name."""
    from lookalike.data.captions import read_caption
    from lookalike.errors import LookalikeError

    text = "sks at the café, smiling"
    for name, data in {"utf8": (text + "\n").encode(), "utf8-mark": text.encode("utf-8-sig"),
                       "utf16": text.encode("utf-16"), "utf16-be": codecs.BOM_UTF16_BE + text.encode("utf-16-be"),
                       "utf32": text.encode("utf-32")}.items():
        (tmp_path / f"{name}.txt").write_bytes(data)
        assert read_caption(tmp_path / f"{name}.txt") == text, name
    (tmp_path / "latin1.txt").write_bytes(text.encode("latin-1"))
    with pytest.raises(LookalikeError, match=r"latin1.txt: not UTF-8 text"):
        read_caption(tmp_path / "latin1.txt")
    assert read_caption(tmp_path / "none.txt") is None


def test_an_emptied_caption_file_is_said_and_the_default_caption_trains(tiny_config, faces, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for photo in sorted((faces / "train" / "obama").iterdir()):
        (photos / photo.name).write_bytes(photo.read_bytes())
    (photos / "1.txt").write_text("  \n")
    result = run_in_process("prepare", str(tiny_config(subject={"images": str(photos)}, data={"crop": "center"})))
    assert result.returncode == 0, result.stderr
    assert f"warning: {photos / '1.txt'} is empty: its photo trains with the default caption" in \
        " ".join(result.stdout.split())
