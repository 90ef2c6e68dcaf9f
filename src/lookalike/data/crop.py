"""Where the square training crop of a photo lies: around the chosen face, or in the centre."""

from __future__ import annotations

Box = tuple[int, int, int, int]  # left, top, right, bottom in pixels


def face_crop_box(face_box: tuple[float, float, float, float], image_size: tuple[int, int],
                  face_scale: float) -> Box:
    """A square centred on the face whose side is the face's longer side / face_scale, shrunk to fit the
    image and slid inside it where the face sits near an edge (the face then stays whole but off-centre)."""
    width, height = image_size
    left, top, right, bottom = face_box
    side = round(min(max(right - left, bottom - top) / face_scale, width, height))
    x = min(max(round((left + right) / 2 - side / 2), 0), width - side)
    y = min(max(round((top + bottom) / 2 - side / 2), 0), height - side)
    return x, y, x + side, y + side


def center_crop_box(image_size: tuple[int, int]) -> Box:
    """The largest centred square."""
    width, height = image_size
    side = min(width, height)
    x, y = (width - side) // 2, (height - side) // 2
    return x, y, x + side, y + side


def crop_and_resize(image, box: Box, resolution: int):
    """The crop, resized to resolution x resolution with Lanczos (sharp when shrinking, smooth when enlarging)."""
    from PIL import Image

    return image.crop(box).resize((resolution, resolution), Image.Resampling.LANCZOS)
