"""Identity in the training loop: the share of a run's wall time that scoring its samples takes.

The same run twice in this process, on the bench's tiny FLUX (hidden 256, 2 double + 4 single blocks, 512 px,
rank 16) with samples at the default interval (train.sample_every = 250, one prompt): once with
train.score_samples = false, once with it on (the evaluator's loading included: it happens once per training
process, as in a real run). Faces by dlib and CLIP by the tiny model (offline); a real CLIP ViT-L/14 costs
more per image, and a GPU makes the training steps cheaper, so check the GPU figure with a lent GPU. A warm-up
run first prepares the photos and fills the caches.

    .venv/bin/python bench/score_overhead.py [--steps 500] [--every 250]

Last line: scoring_share=<(scored - unscored) / scored wall time>.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from train_step import REPO, SPEC, bench_config  # bench/ is on sys.path when run as a script

from lookalike.config import load_config
from lookalike.models.base import quiet_libraries
from lookalike.models.families.flux1 import ensure_tiny_model
from lookalike.train.trainer import train


def seconds(folder: Path, photos: Path, workdir: Path, name: str, steps: int, every: int, score: bool) -> float:
    config = load_config(bench_config(folder, photos, workdir, name, steps, sample_every=every, score_samples=score))
    started = time.perf_counter()
    train(config, name)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--photos", type=Path, default=REPO / "tests" / "data" / "faces" / "obama")
    args = parser.parse_args()
    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        folder = ensure_tiny_model(SPEC, cache_dir=workdir / "models")
        photos = args.photos.resolve()
        seconds(folder, photos, workdir, "warm-up", 2, 0, False)
        unscored = seconds(folder, photos, workdir, "unscored", args.steps, args.every, False)
        scored = seconds(folder, photos, workdir, "scored", args.steps, args.every, True)
    print(f"model: hidden {SPEC.attention_head_dim * SPEC.num_attention_heads}, {args.steps} steps, samples every "
          f"{args.every}, torch threads {torch.get_num_threads()}")
    print(f"unscored_s={unscored:.1f}")
    print(f"scored_s={scored:.1f}")
    print(f"scoring_share={(scored - unscored) / scored:.3f}")


if __name__ == "__main__":
    main()
