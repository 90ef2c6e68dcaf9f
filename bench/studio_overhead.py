"""What watching a run in the studio costs its training: the step time of a tiny training run with the studio open on
its Jobs page (the page's timer asks the server every 2 s for the runs table, the progress line, both figures, the
samples and the log, as Chromium does) against the same run with no studio at all.

Each run is `lookalike train` in a process of its own, as the studio's jobs are; the step time is the median time
between consecutive steps of metrics.jsonl, the first 10 steps left out (start-up). Runs alternate, unwatched then
watched, `--rounds` times, so a machine that speeds up or slows down meanwhile touches both alike.

    .venv/bin/python bench/studio_overhead.py [--photos DIR] [--steps 3000] [--rounds 3]

Measure on a quiet machine: nothing else running (the bench itself uses one core for training, one for the
server).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from tests.test_studio import free_port, studio_study  # noqa: E402  (the studio's own test study)


def step_time(metrics: Path) -> float:
    from lookalike.workspace import read_metrics

    times = [record["time"] for record in read_metrics(metrics)][10:]
    return statistics.median(b - a for a, b in zip(times, times[1:]))


def train(study_file: Path, run: str) -> None:
    subprocess.run([sys.executable, "-m", "lookalike", "train", str(study_file), "--run", run], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, default=REPO / "tests" / "data" / "faces" / "obama")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from gradio_client import Client

    from lookalike.studio.serve import serve

    workspace = Path(tempfile.mkdtemp()) / "ws"
    study = studio_study(workspace, args.steps,
                         sorted(p for p in args.photos.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")))
    study.set({"train.sample_every": 250, "train.checkpoint_every": 1000})  # a long run's intervals, scaled down
    port = free_port()
    app, studio = serve(workspace, port=port, block=False)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    plain, watched = [], []
    try:
        for round_ in range(args.rounds):
            name = f"plain-{round_}"
            train(study.file, name)
            plain.append(step_time(study.workspace.run(name).metrics))

            name, stop, polls = f"watched-{round_}", threading.Event(), []

            def poll(stop=stop, polls=polls):
                while not stop.wait(2.0):
                    client.predict(None, api_name="/watch")  # the page as it opens: the newest run
                    polls.append(time.time())

            poller = threading.Thread(target=poll)
            poller.start()
            train(study.file, name)
            stop.set()
            poller.join()
            watched.append(step_time(study.workspace.run(name).metrics))
            print(f"round {round_ + 1}: step {plain[-1] * 1000:.1f} ms alone, {watched[-1] * 1000:.1f} ms watched "
                  f"({len(polls)} polls of the Jobs page)", flush=True)
    finally:
        app.close()
        studio.close()
    alone, seen = statistics.median(plain), statistics.median(watched)
    print(f"studio_overhead: step {alone * 1000:.1f} ms alone, {seen * 1000:.1f} ms with the Jobs page open: "
          f"overhead {seen / alone - 1:+.1%}")


if __name__ == "__main__":
    main()
