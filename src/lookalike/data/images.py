"""Reading photos as a person sees them: EXIF orientation applied, any mode flattened to RGB."""

from __future__ import annotations

from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def list_images(folder: Path, what: str = "subject.images") -> list[Path]:
    """The image files directly in `folder`, sorted by name; a clear error, naming `what`, when there are none."""
    from lookalike.errors import LookalikeError

    folder = Path(folder)
    if not folder.is_dir():
        raise LookalikeError(f"{what}: folder not found: {folder}")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise LookalikeError(f"{what}: no images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)})")
    return images


def load_rgb(path: Path):
    """Open an image upright (EXIF orientation) as 8-bit RGB, with transparency flattened onto white."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image)
        return image.convert("RGB")


def center_square(image, size: int):
    """The largest centred square of `image`, resized to size x size with a high-quality filter."""
    from PIL import Image, ImageOps

    return ImageOps.fit(image, (size, size), method=Image.Resampling.LANCZOS)
