"""The sweep's own cost per run, warm workers against a process per run: process start, imports, model loading and
caching, against training time.

A sweep of three tiny experiments (the quickstart's model and sample subject, 64 px, 200 steps each) runs through
`lookalike sweep` as a user would start it, once with `--workers warm` (one worker process trains the three runs
one after another on the base it holds) and once with `--workers separate` (a `python -m lookalike train` process
per run), alternating for `--rounds` rounds in one bench run, each in a fresh workspace. Training time is read from
each run's metrics.jsonl (the time between its first and last step, plus one step); everything else in the sweep's
wall time is overhead: the sweep's own start, the processes with their imports, prepare's up-to-date check, the
model loads and the cached embeddings. A run's start-up is the time from the previous run's last step to its own
first one (saving the previous run included), for the second and later runs.

    .venv/bin/python bench/sweep.py [--steps 200] [--rounds 2] [--base tiny|FOLDER] [--resolution 64]

bench/gpu_sweep.py runs the same comparison on a GPU, on a base of FLUX.1-dev's size.

Measure on a quiet machine. Last line: warm_startup_ratio=<warm start-up over separate start-up, median>.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lookalike.data.sample_subject import write_sample_subject

RUNS = ("a", "b", "c")


def records(metrics: Path) -> list[dict]:
    return [json.loads(line) for line in metrics.read_text().splitlines() if line]


def one_sweep(steps: int, workers: str, base: str, resolution: int) -> tuple[float, list[float], list[float]]:
    """Wall time, each run's training time, and the start-up of each run after the first."""
    with tempfile.TemporaryDirectory() as tmp:
        write_sample_subject(Path(tmp) / "photos")
        config = Path(tmp) / "bench.toml"
        config.write_text(
            f'name = "bench"\nworkspace = "work"\n[model]\nbase = "{base}"\n'
            '[subject]\ntoken = "hpr"\nclass_word = "woman"\nimages = "photos"\n'
            f'[data]\nresolution = {resolution}\n[evaluate]\nface_backend = "dlib"\n'
            f'[train]\nmax_train_steps = {steps}\ncheckpoint_every = 100\nsample_every = 0\n'
            + "".join(f'[[sweep.experiments]]\nname = "{name}"\nrank = {4 * (i + 1)}\n' for i, name in enumerate(RUNS)))
        # Prepare and the embedding cache once beforehand, as after a study's first run: what remains is the
        # cost that every run of a sweep pays.
        subprocess.run([sys.executable, "-m", "lookalike", "prepare", str(config)], check=True, capture_output=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lookalike", "sweep", str(config), "--workers", workers], check=True,
                       capture_output=True)
        wall = time.perf_counter() - start
        runs = [records(Path(tmp) / "work" / "runs" / name / "metrics.jsonl") for name in RUNS]
    training = [r[-1]["time"] - r[0]["time"] + r[0]["s_per_step"] for r in runs]
    startups = [run[0]["time"] - run[0]["s_per_step"] - before[-1]["time"] for before, run in zip(runs, runs[1:])]
    return wall, training, startups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--base", default="tiny", help="a known base or a diffusers folder")
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args()
    compare(args.steps, args.rounds, args.base, args.resolution)


def compare(steps: int, rounds: int, base: str, resolution: int) -> None:
    overheads: dict[str, list[float]] = {"separate": [], "warm": []}
    startups: dict[str, list[float]] = {"separate": [], "warm": []}
    for round_ in range(rounds):
        for workers in ("separate", "warm"):
            wall, training, startup = one_sweep(steps, workers, base, resolution)
            overheads[workers].append((wall - sum(training)) / len(RUNS))
            startups[workers].extend(startup)
            print(f"round {round_ + 1}, {workers:8s}: {wall:5.1f} s wall, training "
                  f"{' + '.join(f'{t:.1f}' for t in training)} s, overhead per run {overheads[workers][-1]:.2f} s, "
                  f"start-up of runs 2 and 3: {', '.join(f'{s:.2f}' for s in startup)} s", flush=True)
    median = {workers: (statistics.median(overheads[workers]), statistics.median(startups[workers]))
              for workers in overheads}
    for workers, (overhead, startup) in median.items():
        print(f"{workers:8s}: overhead per run {overhead:.2f} s, start-up of a later run {startup:.2f} s (medians)")
    print(f"warm over separate: overhead per run {median['warm'][0] / median['separate'][0]:.3f}, "
          f"start-up of a later run {median['warm'][1] / median['separate'][1]:.3f}")
    print(f"warm_startup_ratio={median['warm'][1] / median['separate'][1]:.3f}")


if __name__ == "__main__":
    main()
