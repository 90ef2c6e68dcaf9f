"""Reading photos as a person sees them: EXIF orientation applied, any mode flattened to 8-bit RGB.

Whatever a file holds, reading it either gives an upright RGB image or raises OSError with the reason:
corrupt, truncated, not an image, or so many pixels that decoding it could exhaust memory.
"""

from __future__ import annotations

from pathlib import Path

from lookalike.errors import LookalikeError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
MAX_PIXELS = 64_000_000  # 8000 x 8000: beyond any camera photo worth training on, below a decompression bomb


def list_images(folder: Path, what: str = "subject.images") -> list[Path]:
    """The image files directly in `folder`, sorted by name; a clear error, naming `what`, when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LookalikeError(f"{what}: folder not found: {folder}")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise LookalikeError(f"{what}: no images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)})")
    return images


def _to_rgb(image):
    from PIL import Image

    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit greyscale: PIL's own conversion clips every value above 255 to white; scale to 8 bits instead.
        import numpy as np

        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        return Image.fromarray((values >> 8).astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")  # CMYK, palette, greyscale, 16-bit RGB


def not_an_image(path: Path) -> str | None:
    """Why `path` is no image, told from its header alone (a video or an archive is not read whole), or None."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path):
            return None
    except UnidentifiedImageError:
        return "not an image file (its header is no image format's)"
    except Image.DecompressionBombError as error:
        return str(error)
    except OSError as error:
        return str(error)


def load_rgb(path: Path):
    """Open an image upright (EXIF orientation) as 8-bit RGB, with transparency flattened onto white.

    Raises OSError, with the reason, for anything that does not decode to a whole image of a sane size.
    """
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_PIXELS:
                raise OSError(f"{image.width}x{image.height} pixels is more than the {MAX_PIXELS:,} read "
                              "(a decompression bomb, or a scan far larger than a photo)")
            image.load()  # a truncated file fails here, not later
            return _to_rgb(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError as error:
        raise OSError(str(error)) from None
