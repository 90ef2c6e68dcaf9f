"""The sweep's own cost per run: process start, imports, model loading and caching, against training time.

A sweep of three tiny experiments (the quickstart's model and sample subject, 64 px, 200 steps each) runs
through `lookalike sweep` as a user would start it. Training time is read from each run's metrics.jsonl
(the time between its first and last step, plus one step); everything else in the sweep's wall time is
overhead: the sweep's own start, three `python -m lookalike train` processes with their imports, prepare's
up-to-date check, the model loads and the cached embeddings.

    .venv/bin/python bench/sweep.py [--steps 200]

Last line: overhead_per_run_s=<n>.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lookalike.data.sample_subject import write_sample_subject

RUNS = ("a", "b", "c")


def training_seconds(metrics: Path) -> float:
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line]
    return records[-1]["time"] - records[0]["time"] + records[0]["s_per_step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_sample_subject(Path(tmp) / "photos")
        config = Path(tmp) / "bench.toml"
        config.write_text(
            'name = "bench"\nworkspace = "work"\n[model]\nbase = "tiny"\n'
            '[subject]\ntoken = "hpr"\nclass_word = "woman"\nimages = "photos"\n'
            '[data]\nresolution = 64\n[evaluate]\nface_backend = "dlib"\n'
            f'[train]\nmax_train_steps = {args.steps}\ncheckpoint_every = 100\nsample_every = 0\n'
            + "".join(f'[[sweep.experiments]]\nname = "{name}"\nrank = {4 * (i + 1)}\n' for i, name in enumerate(RUNS)))
        # Prepare and the embedding cache once beforehand, as after a study's first run: what remains is the
        # cost that every run of a sweep pays.
        subprocess.run([sys.executable, "-m", "lookalike", "prepare", str(config)], check=True, capture_output=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lookalike", "sweep", str(config)], check=True, capture_output=True)
        wall = time.perf_counter() - start
        training = [training_seconds(Path(tmp) / "work" / "runs" / name / "metrics.jsonl") for name in RUNS]
    overhead = (wall - sum(training)) / len(RUNS)
    print(f"sweep of {len(RUNS)} runs x {args.steps} steps: {wall:.1f} s wall, training "
          f"{' + '.join(f'{t:.1f}' for t in training)} s")
    print(f"overhead per run: {overhead:.1f} s ({overhead / (sum(training) / len(RUNS)):.2f}x the training time)")
    print(f"overhead_per_run_s={overhead:.2f}")


if __name__ == "__main__":
    main()
