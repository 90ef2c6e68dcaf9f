"""The photos a run trains on, with their captions: the crops prepare made of the subject's photos."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from lookalike import display
from lookalike.data.images import center_square, load_rgb
from lookalike.errors import LookalikeError


@dataclass(frozen=True)
class TrainingImage:
    path: Path  # a square crop at [data].resolution, written by prepare
    caption: str


def training_images(config, console: Console | None = None) -> list[TrainingImage]:
    """The prepared crops of the subject's photos, preparing them first when missing or out of date. Each has its
    own caption, or with train.captions = false its person's [subject] caption (a sweep measures what the photos'
    own captions add)."""
    from lookalike.data.prepare import prepared_photos

    return [TrainingImage(path, caption if config.train.captions else config.fill(person.caption, person))
            for path, caption, person in prepared_photos(config, console or display.console())]


def load_training_image(image: TrainingImage, resolution: int):
    """The crop as the square RGB image that is encoded for training."""
    try:
        return center_square(load_rgb(image.path), resolution)
    except OSError as error:
        raise LookalikeError(f"{image.path}: cannot read image ({error})") from None
