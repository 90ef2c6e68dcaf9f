"""What TREAD token routing (train.tread_ratio) costs in likeness and saves in time, on the tiny model: the same
run trained without routing and with half the image tokens routed around its single block, each scoring its
samples as it trains (identity similarity to the person's held-out photos, and CLIP Score: the identity-in-the-loop
scores), in one bench run.

The tiny FLUX.1 has two blocks, so the route skips one of them (train.tread_blocks = [1, 1]); on FLUX.1-dev the
default route skips 53 of 57. Step times here are the CPU's and the tiny model's: they show the mechanism, not the
GPU saving, which bench/gpu_train_step.py would measure.

    .venv/bin/python bench/tread.py [--steps 300] [--ratio 0.5]

Last line: tread_identity_change=<routed run's best identity similarity minus the plain run's> and the same for
CLIP Score. The tiny model's 64 px samples show no face a detector finds, so on it identity similarity reads "no
face" at every step and the change is nan; the CLIP Score and the loss still move.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from lookalike.data.sample_subject import write_sample_subject


def run(folder: Path, steps: int, tread: dict) -> tuple[list[dict], float, float]:
    """Train one run; its sample scores, its median step time and its mean loss over the last fifth."""
    settings = "".join(f"{key} = {json.dumps(value)}\n" for key, value in tread.items())
    config = folder / "bench.toml"
    config.write_text(
        'name = "bench"\nworkspace = "work"\n[model]\nbase = "tiny"\n'
        '[subject]\ntoken = "hpr"\nclass_word = "woman"\nimages = "photos"\n'
        '[data]\nresolution = 64\n[evaluate]\nface_backend = "dlib"\nclip_model = "tiny"\n'
        f'[train]\nmax_train_steps = {steps}\ncheckpoint_every = 0\nsample_every = {steps // 5}\n'
        f'learning_rate = 1e-3\nscore_samples = true\nseed = 0\n{settings}')
    subprocess.run([sys.executable, "-m", "lookalike", "train", str(config)], check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    runs = folder / "work" / "runs" / "default"
    scores = [json.loads(line) for line in (runs / "sample_scores.jsonl").read_text().splitlines() if line]
    metrics = [json.loads(line) for line in (runs / "metrics.jsonl").read_text().splitlines() if line]
    late = [record["loss"] for record in metrics[-max(1, steps // 5):]]
    return scores, statistics.median(record["s_per_step"] for record in metrics), statistics.mean(late)


def shown(value) -> str:
    return "no face" if value is None else f"{value:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--ratio", type=float, default=0.5)
    args = parser.parse_args()
    results = {}
    for name, tread in (("plain", {}), ("routed", {"tread_ratio": args.ratio, "tread_blocks": [1, 1]})):
        with tempfile.TemporaryDirectory() as tmp:
            write_sample_subject(Path(tmp) / "photos")
            results[name] = run(Path(tmp), args.steps, tread)
    print(f"{'step':>6} {'plain identity':>15} {'routed identity':>16} {'plain CLIP':>11} {'routed CLIP':>12}")
    for plain, routed in zip(results["plain"][0], results["routed"][0]):
        print(f"{plain['step']:>6} {shown(plain['identity_similarity']):>15} "
              f"{shown(routed['identity_similarity']):>16} {shown(plain['clip_score']):>11} "
              f"{shown(routed['clip_score']):>12}")
    # A step whose samples show no face has no identity similarity: it counts as none found.
    best = {name: max((r["identity_similarity"] for r in scores if r["identity_similarity"] is not None),
                      default=float("nan")) for name, (scores, _, _) in results.items()}
    clip = {name: max(r["clip_score"] for r in scores) for name, (scores, _, _) in results.items()}
    print(f"median step: plain {results['plain'][1] * 1000:.1f} ms, routed {results['routed'][1] * 1000:.1f} ms "
          f"({results['routed'][1] / results['plain'][1]:.2f}x)")
    print(f"mean loss over the last fifth: plain {results['plain'][2]:.4f}, routed {results['routed'][2]:.4f}")
    print(f"best identity similarity: plain {best['plain']:.4f}, routed {best['routed']:.4f} (nan: no step's "
          "samples showed a face, as the tiny model's 64 px samples do not)")
    print(f"best CLIP Score: plain {clip['plain']:.4f}, routed {clip['routed']:.4f}")
    print(f"tread_identity_change={best['routed'] - best['plain']:.4f} tread_clip_change="
          f"{clip['routed'] - clip['plain']:.4f}")


if __name__ == "__main__":
    main()
