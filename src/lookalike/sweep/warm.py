"""Warm sweep workers: one long-lived `lookalike worker` process per GPU trains a sweep's runs one after another,
keeping the libraries it imported and the base it loaded (train/held_base.py), where a process per run pays both
again for every run.

The sweep sends a worker one JSON line per run ({"config", "run", "overrides"}); the worker trains it as `lookalike
train CONFIG --run NAME --resume --set ...` would, its output on stdout, and then writes one line that says how the
run ended (DONE_MARK and its exit code). A run that does not end well ends its worker too: the next run gets a fresh
process, so nothing a failed run left behind (memory, a broken CUDA context) reaches the runs after it.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import TextIO

from rich.console import Console

from lookalike.config import load_config
from lookalike.errors import LookalikeError, filesystem_problem
from lookalike.sweep.plan import config_for_run
from lookalike.workspace import check_run_name

DONE_MARK = "\x1elookalike-worker: run ended, exit code"  # begins with a record separator: no output line does


def serve(requests: TextIO, console: Console, errors: Console) -> int:
    """The worker's side: train each requested run in this process; its exit code (0 when the sweep closed its
    requests, else the exit code of the run that ended it)."""
    import torch

    from lookalike.train.held_base import HeldBase

    held = HeldBase()
    for line in requests:
        code = train_request(json.loads(line), held, console, errors)
        print(f"{DONE_MARK} {code}", flush=True)
        if code:
            return code
        gc.collect()  # the finished run's optimizer, activations and cached blocks go before the next run starts
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return 0


def train_request(request: dict, held, console: Console, errors: Console) -> int:
    """One run, as `lookalike train --resume` trains it, and its exit code as that command's would be. An
    interruption (Ctrl-C, SIGTERM) is not caught: it stops the worker, as it would stop the command."""
    from lookalike.train.trainer import train

    try:
        name = check_run_name(request["run"])
        config = config_for_run(load_config(Path(request["config"]), request["overrides"]), name)
        train(config, name, resume=True, console=console, held=held)
        return 0
    except LookalikeError as error:
        errors.print(f"error: {error}", highlight=False, soft_wrap=True)
        return error.exit_code
    except Exception as error:
        problem = filesystem_problem(error)
        if problem is None:
            traceback.print_exc()
            return 1
        errors.print(f"error: {problem}", highlight=False, soft_wrap=True)
        return 2


class WarmWorker:
    """The sweep's side: one worker process, its runs sent one at a time. `key` says which base, precision and
    quantisation it trains with; a run with another key needs another worker."""

    def __init__(self, key: tuple, env: dict[str, str]):
        self.key = key
        env = {**os.environ, **env, "PYTHONUNBUFFERED": "1", "LOOKALIKE_PARENT_PID": str(os.getpid())}
        # Its own session: a Ctrl-C reaches it once, from the sweep, not also from the terminal.
        self.process = subprocess.Popen([sys.executable, "-m", "lookalike", "worker"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                        env=env, start_new_session=True)

    def train(self, config_file: Path, name: str, overrides: list[str], log: Path, emit) -> tuple[int, bool]:
        """Train one run: each output line passed to emit (prefixed with the run's name) and to the run's log as it
        comes. Returns the run's exit code, and whether the worker died before the run ended (the code is then the
        worker's)."""
        request = {"config": str(config_file), "run": name, "overrides": overrides}
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as log_file:
            log_file.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} worker {self.process.pid}: "
                           f"{json.dumps(request)}\n")
            log_file.flush()
            try:
                self.process.stdin.write(json.dumps(request) + "\n")
                self.process.stdin.flush()
            except BrokenPipeError:  # it died before this run: its exit code says how
                return self.process.wait(), True
            for line in self.process.stdout:
                if line.startswith(DONE_MARK):
                    code = int(line[len(DONE_MARK):])
                    if code:  # the worker ends with the run
                        self.process.wait()
                    return code, False
                log_file.write(line)
                log_file.flush()
                emit(f"[{name}] {line.rstrip()}")
        return self.process.wait(), True

    def close(self) -> None:
        """No more runs: the worker ends when its requests close."""
        if self.process.poll() is None:
            try:
                self.process.stdin.close()
            except BrokenPipeError:
                pass
            self.process.wait()
