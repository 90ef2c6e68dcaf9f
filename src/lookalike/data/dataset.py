"""The photos a run trains on, with their captions: the crops prepare made of the subject's photos."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console

from lookalike import display
from lookalike.data.crop import Size, bucket_size
from lookalike.data.images import load_rgb
from lookalike.errors import LookalikeError


@dataclass(frozen=True)
class TrainingImage:
    path: Path  # a crop at [data].resolution (square, or its bucket's size), written by prepare; or a class image
    caption: str
    face: tuple[float, float, float, float] | None = None  # the face's box, as fractions of the crop's sides
    mirrored: bool = False  # trained mirrored left to right ([train] flip)


def mirrored(image: TrainingImage) -> TrainingImage:
    """The same photo mirrored left to right: a training example of its own, its face's box mirrored with it."""
    face = None if image.face is None else (1 - image.face[2], image.face[1], 1 - image.face[0], image.face[3])
    return replace(image, face=face, mirrored=True)


def training_images(config, console: Console | None = None) -> list[TrainingImage]:
    """The prepared crops of the subject's photos, preparing them first when missing or out of date. Each has its
    own caption, or with train.captions = false its person's [subject] caption (a sweep measures what the photos'
    own captions add)."""
    from lookalike.data.prepare import prepared_photos

    return [TrainingImage(photo.crop, photo.caption if config.train.captions else
                          config.fill(photo.person.caption, photo.person), photo.face)
            for photo in prepared_photos(config, console or display.console())]


def crop_pixel_size(image: TrainingImage) -> Size:
    """The crop's (width, height) in pixels, read from its header."""
    from PIL import Image

    try:
        with Image.open(image.path) as crop:
            return crop.size
    except OSError as error:
        raise LookalikeError(f"{image.path}: cannot read image ({error})") from None


def training_size(image: TrainingImage, resolution: int, multiple: int) -> Size:
    """The size a crop trains at in a run at `resolution`: its bucket (square crops: resolution x resolution)."""
    width, height = crop_pixel_size(image)
    return bucket_size(width / height, resolution, multiple)


def fitted_fractions(crop_size: Size, size: Size) -> tuple[float, float, float, float]:
    """The part of a crop that load_training_image keeps at `size` (ImageOps.fit's centred cut), as (left, top,
    width, height) fractions of the crop's sides."""
    crop_aspect, aspect = crop_size[0] / crop_size[1], size[0] / size[1]
    if crop_aspect > aspect:
        width = aspect / crop_aspect
        return (1 - width) / 2, 0.0, width, 1.0
    height = crop_aspect / aspect
    return 0.0, (1 - height) / 2, 1.0, height


def load_training_image(image: TrainingImage, size: Size):
    """The crop as the RGB image that is encoded for training: scaled to `size` (a centred strip cut away where
    its aspect differs a little), and mirrored when the example is."""
    from PIL import Image, ImageOps

    try:
        fitted = ImageOps.fit(load_rgb(image.path), size, method=Image.Resampling.LANCZOS)
        return ImageOps.mirror(fitted) if image.mirrored else fitted
    except OSError as error:
        raise LookalikeError(f"{image.path}: cannot read image ({error})") from None
