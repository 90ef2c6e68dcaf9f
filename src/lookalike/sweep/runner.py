"""lookalike sweep: every experiment of a study trained in a process of its own, or (by default) on a warm worker
(sweep/warm.py): one long-lived process per slot that trains its runs one after another on the base it holds.

A run's output is streamed line by line to the console, prefixed with its name, and appended to
runs/<name>/train.log; the trainer keeps runs/<name>/status.json. A run that fails never stops the others.
Finished runs are skipped; interrupted ones (Ctrl-C, SIGTERM, a killed sweep, a dead process) are resumed
from their latest checkpoint; failed ones are left alone unless retry_failed. Runs go to local processes
(`jobs` at once, one GPU each where there are GPUs) or to a Ray cluster, one GPU and one process per task.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lookalike import display
from lookalike.config import StudyConfig
from lookalike.data.dataset import training_images
from lookalike.display import cell
from lookalike.errors import RunBusy
from lookalike.processes import how_it_ended
from lookalike.store import record_run
from lookalike.sweep.plan import Planned
from lookalike.sweep.warm import WarmWorker
from lookalike.trained_on import stale_reason, trains_on
from lookalike.workspace import RunPaths, Workspace, read_metrics

STOP_GRACE_S = 60  # how long an interrupted run may take to write its status before it is killed


@dataclass
class Outcome:
    name: str
    state: str  # done | failed | interrupted | skipped (done earlier) | running elsewhere
    reason: str | None = None
    seconds: float | None = None
    exit_code: int | None = None
    best: dict | None = None  # the scored sample step the run names best (train.score_samples), with its scores


def best_sample(run: RunPaths) -> dict | None:
    """The record of the run's best scored sample step (status.json's best_step), if it has one."""
    step = (run.read_status() or {}).get("best_step")
    return next((record for record in read_metrics(run.sample_scores) if record["step"] == step), None)


def train_command(config_file: Path, name: str, overrides: list[str]) -> list[str]:
    sets = [arg for override in overrides for arg in ("--set", override)]
    return [sys.executable, "-m", "lookalike", "train", str(config_file), "--run", name, "--resume", *sets]


def stream_child(command: list[str], name: str, log: Path, emit, env: dict[str, str],
                 children: dict | None = None) -> int:
    """Run one child, passing each output line to emit(prefixed line) and to the log as it comes; its exit code.
    The child gets its own session, so a Ctrl-C reaches it once, from the sweep, not also from the terminal."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **env, "PYTHONUNBUFFERED": "1", "LOOKALIKE_PARENT_PID": str(os.getpid())}
    with log.open("a") as log_file:
        log_file.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
        log_file.flush()
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                 env=env, start_new_session=True)
        if children is not None:
            children[name] = child
        try:
            for line in child.stdout:
                log_file.write(line)
                log_file.flush()
                emit(f"[{name}] {line.rstrip()}")
            return child.wait()
        finally:
            if children is not None:
                children.pop(name, None)


def _gpu_ids() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [v for v in visible.split(",") if v.strip()]
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith("GPU ")]


def child_outcome(run: RunPaths, exit_code: int, seconds: float, store: Path) -> Outcome:
    """The run's outcome from its status file; a child that died without saying why gets a status that does."""
    if exit_code == RunBusy.exit_code:  # another process holds the run: its status is that process's to write
        return Outcome(run.name, "running elsewhere", "another process is training it", round(seconds, 1), exit_code)
    state = run.state()
    status = run.read_status() or {}
    if state != "done" and exit_code != 0:
        seconds_so_far = run.seconds_so_far()
        reason = status.get("reason") if status.get("state") == "failed" else None
        if reason is None:
            last = [line for line in run.log.read_text().splitlines() if line.strip()][-1:] if run.log.is_file() else []
            reason = (f"{how_it_ended(exit_code)}" + (f"; its last line: {last[0]}" if last else "") +
                      "; `lookalike sweep --retry-failed` resumes it from its last checkpoint")
        interrupted = reason == "interrupted" or exit_code in (130, -signal.SIGINT, -signal.SIGTERM, 143)
        run.write_status("failed", reason="interrupted" if interrupted else reason, exit_code=exit_code,
                         resumable=True, seconds=round(seconds_so_far, 2))
        state = "interrupted" if interrupted else "failed"
    record_run(store, run)
    status = run.read_status() or {}
    return Outcome(run.name, state, status.get("reason"), round(seconds, 1), exit_code, best_sample(run))


class Sweep:
    def __init__(self, config: StudyConfig, config_file: Path, overrides: list[str], console: Console,
                 workers: str = "warm"):
        self.config, self.config_file, self.overrides, self.console = config, config_file, overrides, console
        self.workers = workers  # warm (a worker process per slot, runs one after another) | separate (one per run)
        self.workspace = Workspace(config.workspace)
        self.children: dict[str, subprocess.Popen] = {}  # the process training each run now
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def emit(self, line: str) -> None:
        with self.lock:
            self.console.print(line, highlight=False, soft_wrap=True)

    def todo(self, planned: list[Planned], retry_failed: bool) -> tuple[list[Planned], list[Outcome]]:
        """The experiments to run now, and the outcomes of those left as they are."""
        run, left = [], []
        for experiment in planned:
            paths = self.workspace.run(experiment.name)
            state = paths.state()
            if state == "done" and trains_on(paths, self.experiment_config(experiment)):
                run.append(experiment)  # the study asks for more steps: trained on (train --resume)
            elif state == "done":
                stale = self.why_stale(paths, experiment)
                paths.mark_stale(stale)
                left.append(Outcome(experiment.name, "skipped", "done earlier" + (f", {stale}" if stale else ""),
                                    best=best_sample(paths)))
            elif state == "running":
                left.append(Outcome(experiment.name, "running elsewhere", f"pid {paths.read_status()['pid']}"))
            elif state == "failed" and not retry_failed:
                left.append(Outcome(experiment.name, "failed", (paths.read_status() or {}).get("reason")))
            else:
                if state == "pending":
                    paths.write_status("pending")
                run.append(experiment)
        for experiment in planned:
            record_run(self.workspace.results, self.workspace.run(experiment.name))
        return run, left

    def experiment_config(self, experiment: Planned) -> StudyConfig:
        return self.config.with_experiment(experiment.overrides, f"sweep experiment {experiment.name}")

    def why_stale(self, paths: RunPaths, experiment: Planned) -> str | None:
        """Why a finished run's results are not of what the study now asks for this experiment, or None."""
        config = self.experiment_config(experiment)
        images = training_images(config, display.console(quiet=True))  # prepares what is out of date, as a run would
        return stale_reason(paths, config, images, config.workspace)

    def base_of(self, experiment: Planned) -> tuple:
        """What a warm worker holds for the experiment's run: its base, precision and quantisation (float8 compute
        included: its layers are not a plain base's)."""
        config = self.experiment_config(experiment)
        return (config.model.base, str(config.model.checkpoint), config.train.mixed_precision,
                config.train.base_quantization, config.train.fp8_compute)

    def run_local(self, planned: list[Planned], jobs: int) -> list[Outcome]:
        """The runs on `jobs` slots (one GPU each where there are GPUs), each slot taking the next run when its
        last one ends."""
        ids = _gpu_ids()
        if ids and jobs > len(ids):
            self.console.print(f"sweep: {len(ids)} GPUs, so {len(ids)} runs at a time, not {jobs}")
            jobs = len(ids)
        waiting: queue.SimpleQueue[Planned] = queue.SimpleQueue()
        for experiment in planned:
            waiting.put(experiment)
        pool = ThreadPoolExecutor(max(1, jobs))
        futures = [pool.submit(self._slot, waiting, ids[slot] if ids else None) for slot in range(max(1, jobs))]
        try:
            by_name = {o.name: o for future in futures for o in future.result()}
            return [by_name[e.name] for e in planned]
        except KeyboardInterrupt:
            self.console.print("sweep: stopping the running runs; they will resume where they stopped")
            self.stopping.set()
            self._stop_children()
            raise
        finally:
            pool.shutdown(wait=True)

    def _slot(self, waiting: queue.SimpleQueue, gpu: str | None) -> list[Outcome]:
        env = {"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}
        outcomes, worker = [], None
        try:
            while not self.stopping.is_set():
                try:
                    experiment = waiting.get_nowait()
                except queue.Empty:
                    break
                if self.workers == "separate":
                    outcomes.append(self._run_separately(experiment, env))
                    continue
                if worker is not None and worker.key != self.base_of(experiment):
                    worker.close()  # another base, precision or quantisation: a fresh worker loads it
                    worker = None
                outcome, worker = self._run_warm(experiment, worker, env)
                outcomes.append(outcome)
        finally:
            if worker is not None:
                worker.close()
        return outcomes

    def _run_separately(self, experiment: Planned, env: dict[str, str]) -> Outcome:
        paths = self.workspace.run(experiment.name)
        started = time.time()
        code = stream_child(train_command(self.config_file, experiment.name, self.overrides), experiment.name,
                            paths.log, self.emit, env, self.children)
        return child_outcome(paths, code, time.time() - started, self.workspace.results)

    def _run_warm(self, experiment: Planned, worker: WarmWorker | None,
                  env: dict[str, str]) -> tuple[Outcome, WarmWorker | None]:
        """The run on `worker` (a new one if None); its outcome, and the worker if it is there for the next run. A
        worker that dies during a run (killed, a crash in native code) is replaced once, and its run resumed from
        its last checkpoint."""
        paths = self.workspace.run(experiment.name)
        started = time.time()
        for attempt in (1, 2):
            if worker is None:
                worker = WarmWorker(self.base_of(experiment), env)
            with self.lock:
                self.children[experiment.name] = worker.process
                if self.stopping.is_set():  # the sweep was stopped after _stop_children saw its children
                    worker.process.send_signal(signal.SIGINT)
            try:
                code, died = worker.train(self.config_file, experiment.name, self.overrides, paths.log, self.emit)
            finally:
                with self.lock:
                    self.children.pop(experiment.name, None)
            if code:  # a worker ends with a run that did not end well
                worker = None
            interrupted = code in (130, -signal.SIGINT, -signal.SIGTERM, 143) or self.stopping.is_set()
            if not died or interrupted or attempt == 2:
                break
            self.emit(f"[{experiment.name}] sweep: its worker ended ({how_it_ended(code)}); a new worker resumes "
                      "the run from its last checkpoint")
        return child_outcome(paths, code, time.time() - started, self.workspace.results), worker

    def _stop_children(self) -> None:
        """Every run's process told to stop as on Ctrl-C; a run starting meanwhile stops itself (_run_warm)."""
        with self.lock:
            children = list(self.children.values())
        for child in children:
            child.send_signal(signal.SIGINT)
        deadline = time.time() + STOP_GRACE_S
        for child in children:
            try:
                child.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                child.kill()

    def run_ray(self, planned: list[Planned], address: str | None) -> list[Outcome]:
        import ray

        ray.init(address=address, include_dashboard=False, log_to_driver=True, ignore_reinit_error=True,
                 logging_level="WARNING")
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        task = ray.remote(num_gpus=gpus, num_cpus=1, max_retries=0)(_ray_train)
        refs = {task.remote(train_command(self.config_file, e.name, self.overrides), e.name,
                            str(self.workspace.run(e.name).log)): e.name for e in planned}
        outcomes = {}
        try:
            pending = list(refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                name = refs[ready[0]]
                try:
                    code, seconds = ray.get(ready[0])
                except ray.exceptions.RayError as error:  # the task itself died (node lost, ...)
                    code, seconds = 1, 0.0
                    self.workspace.run(name).write_status("failed", reason=f"ray task failed: {error}".splitlines()[0])
                outcomes[name] = child_outcome(self.workspace.run(name), code, seconds, self.workspace.results)
        except KeyboardInterrupt:
            for ref in refs:
                ray.cancel(ref)  # sends KeyboardInterrupt to the task, which stops its child
            raise
        return [outcomes[e.name] for e in planned]


def _ray_train(command: list[str], name: str, log: str) -> tuple[int, float]:
    """A Ray task: the same child process and log as a local run (exit code, seconds); its lines reach the
    driver through Ray's log forwarding."""
    children: dict = {}
    started = time.time()
    try:
        code = stream_child(command, name, Path(log), lambda line: print(line, flush=True), {}, children)
        return code, time.time() - started
    except KeyboardInterrupt:
        for child in children.values():
            child.send_signal(signal.SIGINT)
            child.wait(timeout=STOP_GRACE_S)
        raise


def summary_table(outcomes: list[Outcome]) -> Table:
    """Each run's outcome, and its best scored sample step with that step's identity and CLIP Score."""
    table = Table("run", "state", "seconds", "exit code", "best step", "identity", "CLIP", "reason", title="sweep")
    for o in outcomes:
        best = o.best or {}
        table.add_row(o.name, o.state, f"{o.seconds:.1f}" if o.seconds is not None else "-",
                      "-" if o.exit_code is None else str(o.exit_code), cell(best.get("step")),
                      cell(best.get("identity_similarity")), cell(best.get("clip_score")), o.reason or "")
    return table


def sweep(config: StudyConfig, config_file: Path, planned: list[Planned], console: Console, overrides: list[str],
          jobs: int = 1, backend: str = "local", address: str | None = None,
          retry_failed: bool = False, workers: str = "warm") -> list[Outcome]:
    """Run every experiment not finished yet; return every experiment's outcome, in plan order. `workers`: warm
    (local runs on long-lived workers) or separate (a process per run)."""
    runner = Sweep(config, config_file, overrides, console, workers)
    to_run, left = runner.todo(planned, retry_failed)
    if to_run:
        local = f", {jobs} at a time, {workers} workers" if backend == "local" else ""
        console.print(f"sweep: {len(to_run)} to run ({', '.join(e.name for e in to_run)}), {len(left)} left as "
                      f"they are; backend {backend}{local}")
    ran = runner.run_ray(to_run, address) if backend == "ray" and to_run else runner.run_local(to_run, jobs)
    by_name = {o.name: o for o in ran + left}
    outcomes = [by_name[e.name] for e in planned]
    console.print(summary_table(outcomes))
    return outcomes
