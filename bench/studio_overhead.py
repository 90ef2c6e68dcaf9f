"""What watching a run in the studio costs its training: the step time of a tiny training run while the studio's
Jobs page is open on it (the page's timer asks the server every 2 s for the runs table, the progress line, the loss
chart, the scores figure, the samples and the log, as Chromium does, through Gradio's client) against the same run
while no page is open; and the studio server's CPU time per refresh (`lookalike studio` in a process of its own, as
a user runs it; read from /proc).

One run, one `lookalike train` process, as the studio's jobs are; the page is open in alternate windows of
`--window` seconds (closed, open, closed, ...), so that whatever slows or speeds the machine during the run touches
both alike, and no difference between two processes enters the figure. Each window's time per step is its steps'
total time over their number (a poll's cost counts wherever it falls), the steps that draw or score samples or
save a checkpoint left out of both. Each open window is compared with the mean of the closed windows on either side
of it (the machine drifts over minutes: a shared machine's step time was seen to move by half between windows), and
the figure is the median of those ratios; every window is printed.

    .venv/bin/python bench/studio_overhead.py [--photos DIR] [--seconds 120] [--window 10]

Measure on a quiet machine: nothing else running (training uses one core, the server and the page's client the
other).
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

SAMPLE_EVERY, CHECKPOINT_EVERY = 1000, 2000  # a long run's intervals, scaled down
REFRESH_S = 2.0  # the Jobs page's timer (studio/app.py REFRESH_S)


def window_step_times(metrics: Path, windows: list[tuple[float, float, bool]]) -> list[tuple[bool, float]]:
    """(page open, seconds per step) of each window, from the steps that ended in it."""
    from lookalike.workspace import read_metrics

    records = read_metrics(metrics)
    figures = []
    for start, end, page_open in windows:
        intervals = [b["time"] - a["time"] for a, b in zip(records, records[1:])
                     if start <= b["time"] < end and b["step"] % SAMPLE_EVERY and b["step"] % CHECKPOINT_EVERY]
        if intervals:
            figures.append((page_open, sum(intervals) / len(intervals)))
    return figures


def cpu_seconds(pid: int) -> float:
    """The process's CPU time so far, user and system (Linux's /proc/PID/stat, fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def connect(url: str, client_class, timeout: float = 120):
    """Gradio's client on the studio once it serves."""
    deadline = time.time() + timeout
    while True:
        try:
            return client_class(url, verbose=False)
        except Exception:  # not listening yet
            if time.time() > deadline:
                raise
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, default=REPO / "tests" / "data" / "faces" / "obama")
    parser.add_argument("--seconds", type=float, default=120, help="how long the run trains (about)")
    parser.add_argument("--window", type=float, default=10, help="seconds the page is open, then closed")
    args = parser.parse_args()

    from gradio_client import Client

    workspace = Path(tempfile.mkdtemp()) / "ws"
    steps = int(args.seconds / 0.008)  # the tiny model's step on one core: about 8 ms
    study = studio_study(workspace, steps,
                         sorted(p for p in args.photos.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")))
    study.set({"train.sample_every": SAMPLE_EVERY, "train.checkpoint_every": CHECKPOINT_EVERY})
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "lookalike", "studio", str(workspace), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = connect(f"http://127.0.0.1:{port}/", Client)
    windows, polls, done = [], [], threading.Event()
    server_cpu = [cpu_seconds(server.pid)]

    def page():
        """Closed, open, closed, ... for --window seconds each, polling as the page does while open."""
        page_open = False
        while not done.is_set():
            start = time.time()
            while time.time() < start + args.window and not done.is_set():
                if page_open:
                    asked = time.perf_counter()
                    client.predict(None, api_name="/watch")  # the page as it opens: the newest run
                    polls.append(time.perf_counter() - asked)
                done.wait(REFRESH_S if page_open else 0.1)
            windows.append((start, time.time(), page_open))
            server_cpu.append(cpu_seconds(server.pid))
            page_open = not page_open

    watcher = threading.Thread(target=page)
    try:
        watcher.start()
        subprocess.run([sys.executable, "-m", "lookalike", "train", str(study.file), "--run", "watched"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:
        done.set()
        watcher.join()
        server.terminate()
        server.wait()
    figures = window_step_times(study.workspace.run("watched").metrics, windows[1:-1])  # whole windows of steps
    for index, (page_open, seconds) in enumerate(figures):
        print(f"window {index + 1}: page {'open  ' if page_open else 'closed'} {seconds * 1000:.2f} ms a step")
    # The server's CPU seconds: an open window's above the closed windows' rate, per refresh.
    cpu = [(after - before, end - start, page_open)
           for before, after, (start, end, page_open) in zip(server_cpu, server_cpu[1:], windows)]
    idle_rate = sum(c for c, _, page_open in cpu if not page_open) / sum(d for _, d, page_open in cpu if not page_open)
    refresh_cpu = sum(c - idle_rate * d for c, d, page_open in cpu if page_open) / len(polls)
    ratios = [seconds / ((figures[index - 1][1] + figures[index + 1][1]) / 2)
              for index, (page_open, seconds) in enumerate(figures[1:-1], start=1) if page_open]
    closed = statistics.median(s for page_open, s in figures if not page_open)
    print(f"studio_overhead: {len(polls)} refreshes of the Jobs page, {statistics.median(polls) * 1000:.0f} ms each "
          f"(median, as the client waited), {refresh_cpu * 1000:.0f} ms of the server's CPU each; "
          f"a step {closed * 1000:.2f} ms with the page closed (median window); "
          f"open against the closed windows beside it: {', '.join(f'{r - 1:+.1%}' for r in ratios)}; "
          f"overhead {statistics.median(ratios) - 1:+.1%} (median)")


if __name__ == "__main__":
    main()
