"""The photos a run trains on, with their captions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lookalike.data.images import center_square, list_images, load_rgb
from lookalike.errors import LookalikeError


@dataclass(frozen=True)
class TrainingImage:
    path: Path
    caption: str
    crop: str  # how the square is taken from the photo


def caption_for(photo: Path, default: str) -> str:
    """A caption .txt beside the photo wins over the config's default caption."""
    caption_file = photo.with_suffix(".txt")
    if caption_file.is_file():
        text = caption_file.read_text().strip()
        if text:
            return text
    return default


def training_images(config) -> list[TrainingImage]:
    """The subject's photos, each with its caption ({token} and {class_word} filled in)."""
    default = config.fill(config.subject.caption)
    return [
        TrainingImage(photo, config.fill(caption_for(photo, default)), "center")
        for photo in list_images(config.subject.images)
    ]


def load_training_image(image: TrainingImage, resolution: int):
    """The photo as the square RGB image that is encoded for training."""
    try:
        return center_square(load_rgb(image.path), resolution)
    except OSError as error:
        raise LookalikeError(f"{image.path}: cannot read image ({error})") from None
