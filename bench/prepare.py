"""Prepare's throughput: photos per second over every test photo of the repository (tests/data/faces: 13 photos
of 240 to 2333 px, or a folder of your own with --photos), cropped to 1024 px, with the models loaded once beforehand (their loading is printed apart).

Each photo is read, hashed, searched for faces with MTCNN, its faces embedded with dlib, thumbnailed, cropped
and written; the cross-photo checks run at the end. The identity-outlier check is off (the photos show five
people).

    .venv/bin/python bench/prepare.py [--repeat 3] [--photos DIR]

Last line: photos_per_s=<n> (the best of the repeats, each into a fresh workspace).
"""

from __future__ import annotations

import argparse
import io
import shutil
import tempfile
import time
from pathlib import Path

from rich.console import Console

from lookalike.config import load_config
from lookalike.data.prepare import Inspector, prepare
from lookalike.models.base import quiet_libraries

FACES = Path(__file__).resolve().parents[1] / "tests" / "data" / "faces"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--photos", type=Path, default=FACES, help="a folder of photos, its subfolders included")
    args = parser.parse_args()
    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        photos.mkdir()
        for path in sorted(p for p in args.photos.glob("**/*") if p.suffix.lower() in (".jpg", ".png")):
            shutil.copy(path, photos / f"{path.parent.name}_{path.name}")
        config_file = Path(tmp) / "bench.toml"
        config_file.write_text(f'name = "bench"\nworkspace = "work"\n[subject]\ntoken = "sks"\nimages = "{photos}"\n'
                               '[evaluate]\nface_backend = "dlib"\n'
                               '[data]\nresolution = 1024\nmin_photos = 1\n[data.checks]\nidentity_outlier = "off"\n')
        config = load_config(config_file)
        start = time.perf_counter()
        inspector = Inspector(config)
        inspector.load()
        print(f"models loaded in {time.perf_counter() - start:.1f} s (MTCNN, dlib)")
        rates = []
        for attempt in range(args.repeat):
            workspace = Path(tmp) / f"work{attempt}"
            run = config.model_copy(update={"workspace": workspace})
            start = time.perf_counter()
            done = prepare(run, Console(file=io.StringIO()), inspector)
            seconds = time.perf_counter() - start
            rates.append(len(done) / seconds)
            print(f"run {attempt + 1}: {len(done)} photos ({sum(p.status == 'kept' for p in done)} kept) "
                  f"in {seconds:.2f} s")
    print(f"photos_per_s={max(rates):.2f}")


if __name__ == "__main__":
    main()
