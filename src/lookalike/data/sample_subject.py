"""A sample subject for trying lookalike without photos of your own: varied crops and mirror images of
Grace Hopper's portrait, which ships inside matplotlib (mpl-data/sample_data/grace_hopper.jpg).

    python -m lookalike.data.sample_subject DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

from lookalike.workspace import atomic_path

# (left, top, side) as fractions of the portrait's width: framings of the face, from close to loose.
_FRAMINGS = [(0.10, 0.00, 0.80), (0.00, 0.05, 0.95), (0.20, 0.05, 0.65), (0.15, 0.15, 0.70), (0.05, 0.10, 0.85)]


def write_sample_subject(folder: Path) -> list[Path]:
    """Write the sample photos into `folder` (kept if already there); return their paths."""
    from matplotlib import cbook
    from PIL import Image, ImageOps

    folder.mkdir(parents=True, exist_ok=True)
    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as portrait:
        portrait = portrait.convert("RGB")
    width = portrait.width
    written = []
    for index, (left, top, side) in enumerate(_FRAMINGS):
        for mirrored in (False, True):
            path = folder / f"hopper_{index}{'_mirrored' if mirrored else ''}.jpg"
            if not path.exists():
                box = (int(left * width), int(top * width), int((left + side) * width), int((top + side) * width))
                photo = portrait.crop(box)
                with atomic_path(path) as tmp:
                    (ImageOps.mirror(photo) if mirrored else photo).save(tmp, format="JPEG", quality=95)
            written.append(path)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m lookalike.data.sample_subject DIR")
    print(f"{len(write_sample_subject(Path(sys.argv[1])))} sample photos in {sys.argv[1]}")
