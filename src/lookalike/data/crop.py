"""Where the training crop of a photo lies, and at what size it trains: a square around the chosen face or in the
centre, or ([data] buckets) the photo's own framing trimmed to the nearest of a few aspect ratios."""

from __future__ import annotations

import math

Box = tuple[int, int, int, int]  # left, top, right, bottom in pixels
Size = tuple[int, int]  # width, height in pixels

# The framings of photos as cameras and phones take them (width:height), each a bucket of about the same pixel count.
ASPECT_RATIOS = ((1, 1), (4, 5), (5, 4), (3, 4), (4, 3), (2, 3), (3, 2), (9, 16), (16, 9))


def face_crop_box(face_box: tuple[float, float, float, float], image_size: Size, face_scale: float) -> Box:
    """A square centred on the face whose side is the face's longer side / face_scale, shrunk to fit the
    image and slid inside it where the face sits near an edge (the face then stays whole but off-centre)."""
    width, height = image_size
    left, top, right, bottom = face_box
    side = round(min(max(right - left, bottom - top) / face_scale, width, height))
    x = min(max(round((left + right) / 2 - side / 2), 0), width - side)
    y = min(max(round((top + bottom) / 2 - side / 2), 0), height - side)
    return x, y, x + side, y + side


def center_crop_box(image_size: Size) -> Box:
    """The largest centred square."""
    width, height = image_size
    side = min(width, height)
    x, y = (width - side) // 2, (height - side) // 2
    return x, y, x + side, y + side


def nearest_ratio(image_size: Size) -> tuple[int, int]:
    """The aspect ratio of ASPECT_RATIOS nearest the image's own (by the ratio of the two: 3:2 is as far from
    1:1 as 2:3 is)."""
    width, height = image_size
    return min(ASPECT_RATIOS, key=lambda ratio: abs(math.log(width / height * ratio[1] / ratio[0])))


def bucket_crop_box(face_box: tuple[float, float, float, float] | None, image_size: Size) -> Box:
    """The largest box of the photo's nearest aspect ratio inside it: the whole photo less a strip, the strip
    taken where it keeps the face nearest the box's centre (from both sides equally without a face)."""
    width, height = image_size
    ratio_w, ratio_h = nearest_ratio(image_size)
    box_w, box_h = min(width, round(height * ratio_w / ratio_h)), min(height, round(width * ratio_h / ratio_w))
    if face_box is None:
        centre_x, centre_y = width / 2, height / 2
    else:
        centre_x, centre_y = (face_box[0] + face_box[2]) / 2, (face_box[1] + face_box[3]) / 2
    x = min(max(round(centre_x - box_w / 2), 0), width - box_w)
    y = min(max(round(centre_y - box_h / 2), 0), height - box_h)
    return x, y, x + box_w, y + box_h


def bucket_size(aspect: float, resolution: int, multiple: int) -> Size:
    """The size a crop of this aspect (width / height) trains at: resolution x resolution for a square, else
    about resolution² pixels at that aspect, each side a multiple of `multiple` (what the denoiser's patches and
    downsampling need). Crops of one aspect ratio share a bucket."""
    if math.isclose(aspect, 1.0, rel_tol=0.02):
        return resolution, resolution
    root = math.sqrt(aspect)
    return (max(multiple, round(resolution * root / multiple) * multiple),
            max(multiple, round(resolution / root / multiple) * multiple))


def largest_bucket_share(resolution: int, multiple: int) -> float:
    """The pixels of the largest bucket at `resolution` over the square's (what activations grow with)."""
    return max(math.prod(bucket_size(w / h, resolution, multiple)) for w, h in ASPECT_RATIOS) / resolution**2


def crop_size(box: Box, resolution: int) -> Size:
    """The size prepare writes a crop at: its bucket at [data] resolution (16: every base's multiple or a
    divisor of it)."""
    left, top, right, bottom = box
    return bucket_size((right - left) / (bottom - top), resolution, 16)


Fractions = tuple[float, float, float, float]  # left, top, right, bottom as fractions of an image's sides


def clipped_to_image(box: Fractions) -> Fractions:
    """A box in fractions of an image's sides, cut to the image (each value between 0 and 1)."""
    return tuple(min(max(value, 0.0), 1.0) for value in box)


def box_in_crop(box: tuple[float, float, float, float], crop: Box) -> Fractions:
    """A box of the photo (a face's) within its crop, as fractions of the crop's width and height (they hold at
    any size the crop is resized to), clipped to it."""
    left, top, right, bottom = crop
    width, height = right - left, bottom - top
    return clipped_to_image(((box[0] - left) / width, (box[1] - top) / height, (box[2] - left) / width,
                             (box[3] - top) / height))


def crop_and_resize(image, box: Box, resolution: int):
    """The crop, resized to its size at `resolution` with Lanczos (sharp when shrinking, smooth when enlarging)."""
    from PIL import Image

    return image.crop(box).resize(crop_size(box, resolution), Image.Resampling.LANCZOS)
