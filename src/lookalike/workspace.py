"""Paths of a study's workspace and its runs, run status, and atomic writes.

Every file a later stage reads is written to a temporary name in the same folder and then renamed, so a
crash never leaves a half-written file that looks whole.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from lookalike.errors import LookalikeError, RunBusy
from lookalike.processes import still_running

RunState = Literal["pending", "running", "done", "failed"]
# The states of a run that did not finish (as RunPaths.state tells them): reported as problems, and resumable.
UNFINISHED = ("failed", "interrupted")


def _temporary_name(path: Path) -> Path:
    """A fresh hidden name beside `path` (`.NAME.<random>.tmp`): a kill leaves it recognisable as debris."""
    return path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"


TEMPORARY_NAME = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")  # the names _temporary_name makes, and no user's file


def file_sha256(path: Path) -> str:
    """The file's SHA-256, read in chunks, however big the file."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def lora_sha256_of_image(sidecar: Path) -> str | None:
    """The SHA-256 of the one LoRA that drew a run's image, as its sidecar (generate's) records it; None for an
    image of no LoRA, of several, or of a sidecar that cannot be read."""
    try:
        loras = json.loads(sidecar.read_text()).get("settings", {}).get("loras", [])
    except (ValueError, AttributeError, OSError):
        return None
    return loras[0].get("sha256") if len(loras) == 1 and isinstance(loras[0], dict) else None


def _sync(path: Path) -> None:
    """Flush a file's or folder's contents to the disk (a rename alone may reach the disk before the data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is flushed to disk and renamed onto `path` (and the
    folder flushed), so neither a crash nor a power cut leaves a half-written or empty file; on error removed.
    The file is made with the user's umask, like any file a program creates."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp
        _sync(tmp)
        os.replace(tmp, path)
        _sync(path.parent)
    except Exception as error:
        _raise_with_place(error, path)
    finally:
        tmp.unlink(missing_ok=True)


def _raise_with_place(error: Exception, path: Path) -> None:
    """Re-raise a failed write so that it names `path`; a library's own error on a full disk (torch.save's is
    'unexpected pos ...') becomes the OSError it is."""
    if isinstance(error, OSError) and error.errno is not None:
        if error.filename is None:
            error.filename = str(path)
        raise error
    try:
        full = shutil.disk_usage(path.parent).free < 1 << 20
    except OSError:
        full = False
    if full:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from error
    raise error


@contextlib.contextmanager
def exclusive(lock_file: Path, busy: Callable[[], Exception] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file` (made if missing) while the block runs: processes sharing a workspace,
    such as a sweep's parallel runs, take turns. The system releases it when its process ends, however it ends.
    With `busy`, a process that finds the lock held raises busy() instead of waiting."""
    import fcntl

    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (fcntl.LOCK_NB if busy else 0))
        except BlockingIOError:
            raise busy() from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success its files are flushed to disk and it replaces `path`
    whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    tmp.mkdir(0o777)  # the umask applies, as for any folder a program makes
    try:
        yield tmp
        _sync_tree(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        _sync(path.parent)
    except Exception as error:
        _raise_with_place(error, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sync_tree(folder: Path) -> None:
    for item in [*folder.rglob("*"), folder]:  # files and folders alike: a folder's sync keeps its entries
        _sync(item)


def build_once(folder: Path, marker: str, save) -> Path:
    """`folder`, made by `save(tmp_folder)` on first use, then reused.

    It is saved into a temporary folder and renamed into place, so a crash or a second process building the
    same folder at the same time never leaves a half-written folder behind. `marker` is a file that only a
    complete folder has.
    """
    if (folder / marker).exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(folder)
    tmp.mkdir(0o777)
    try:
        save(tmp)
        _sync_tree(tmp)
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / marker).exists():  # not a concurrent builder that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def json_safe(data: Any) -> Any:
    """`data` with every NaN or infinity as None: JSON has no such numbers, and Python's bare NaN makes a file
    other tools refuse to read."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: json_safe(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_safe(value) for value in data]
    return data


def json_text(data: Any) -> str:
    """`data` as the JSON text of the workspace's files."""
    return json.dumps(json_safe(data), indent=2, sort_keys=False, default=str, allow_nan=False) + "\n"


def write_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json_text(data))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The step records of metrics.jsonl; a line cut short by a kill mid-write is skipped."""
    return step_records_of(path.read_bytes().splitlines()) if path.is_file() else []


def step_records_of(lines: list[bytes]) -> list[dict[str, Any]]:
    """The step records among JSON lines; a line cut short by a kill mid-write is skipped."""
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


class StepLog:
    """A JSON-lines file of step records (metrics.jsonl, sample_scores.jsonl), one line flushed per record; a
    resumed run first drops the records after its checkpoint's step, which it will make again."""

    def __init__(self, path: Path, resume_step: int):
        kept = [record for record in read_metrics(path) if record["step"] <= resume_step] if resume_step else []
        with atomic_path(path) as tmp:  # drop steps a resumed run will do again, and a line a kill cut short
            tmp.write_text("".join(json.dumps(record) + "\n" for record in kept))
        self.file = path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(json_safe(record)) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def checked_checkpoint(checkpoint: str) -> str:
    """A checkpoint is named final, best or by its step: never a path (it becomes part of a folder's name); a step
    in one spelling only (00005 is 5), so that one step's images never land in two folders."""
    if checkpoint in ("final", "best"):
        return checkpoint
    if not (checkpoint.isascii() and checkpoint.isdigit()):
        raise LookalikeError(f"--checkpoint: {checkpoint!r} is not best, final or a step number")
    return str(int(checkpoint))


@dataclass(frozen=True)
class RunPaths:
    """The files of one training run: runs/<name>/..."""

    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def status(self) -> Path:
        return self.root / "status.json"

    @property
    def photos(self) -> Path:
        """The examples the run trains on: crop -> caption (trained_on.py)."""
        return self.root / "photos.json"

    @property
    def class_photos(self) -> Path:
        """The class images the run takes from [prior] images: file -> SHA-256 (trained_on.py)."""
        return self.root / "class_photos.json"

    @property
    def checkpoint_record(self) -> Path:
        """Of a run on a single-file checkpoint ([model] checkpoint): the file it trained on (path, size, time,
        SHA-256)."""
        return self.root / "checkpoint.json"

    @property
    def init_lora(self) -> Path:
        """The copy of the LoRA file the run started from (train.init_lora), so it repeats from its own folder."""
        return self.root / "init_lora.safetensors"

    @property
    def log(self) -> Path:
        return self.root / "train.log"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def lora(self) -> Path:
        return self.root / "lora.safetensors"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def sample_scores(self) -> Path:
        return self.root / "sample_scores.jsonl"

    @property
    def front(self) -> Path:
        """The LoRAs of the scored steps no other step beats (train/sample_scores.py)."""
        return self.root / "front"

    @property
    def raw_lora(self) -> Path:
        """With train.ema_decay: the final raw weights (lora.safetensors is then their moving average)."""
        return self.root / "lora-raw.safetensors"

    @property
    def best_lora(self) -> Path:
        return self.root / "lora-best.safetensors"

    def has_distinct_best(self) -> bool:
        """The run kept a best sample step's LoRA, and that step is not its final LoRA's."""
        status = self.read_status() or {}
        return self.best_lora.is_file() and status.get("best_step") != status.get("final_step")

    def front_lora(self, step: int) -> Path:
        return self.front / f"step-{step:06d}.safetensors"

    def step_lora(self, step: int) -> Path:
        """The final LoRA of a run since trained on to more steps (train --resume with a larger max_train_steps)."""
        return self.root / f"lora-step-{step:06d}.safetensors"

    def lora_at(self, checkpoint: str) -> Path:
        """The run's LoRA at `checkpoint`: final (lora.safetensors), best (the best sample step's, by the
        report's rule), or the number of a step whose LoRA was kept (one on the front of the scored steps, or the
        final one of a run since trained on)."""
        checkpoint = checked_checkpoint(checkpoint)
        if checkpoint == "final":
            return self.lora
        if checkpoint == "best":
            if not self.best_lora.is_file():
                raise LookalikeError(f"run {self.name!r} has no best checkpoint: its samples were not scored "
                                     "(train.sample_every = 0 or train.score_samples = false), or it has not "
                                     "reached its first sample step")
            return self.best_lora
        step = int(checkpoint)
        if self.step_lora(step).is_file():  # the final LoRA of a run since trained on
            return self.step_lora(step)
        if not self.front_lora(step).is_file():
            if step == (self.read_status() or {}).get("final_step"):
                raise LookalikeError(f"step {step} is run {self.name!r}'s last: its LoRA is --checkpoint final")
            kept = sorted(int(p.stem.removeprefix("step-")) for p in self.front.glob("step-*.safetensors"))
            raise LookalikeError(f"run {self.name!r} kept no LoRA of step {step}: only the best scored "
                                 f"steps' are kept ({', '.join(map(str, kept)) or 'none'})")
        return self.front_lora(step)

    def lora_sha256(self, checkpoint: str) -> str | None:
        """The SHA-256 of the run's LoRA at `checkpoint` as it is now; None where the run has none there."""
        try:
            path = self.lora_at(checkpoint)
        except LookalikeError:
            return None
        return file_sha256(path) if path.is_file() else None

    def images_made_by(self, checkpoint: str, lora_sha256: str | None) -> tuple[list[Path], list[Path]]:
        """(images of images_at(checkpoint) that the LoRA of `lora_sha256` drew, those another LoRA drew), by the
        LoRA each image's sidecar records: the one check of whether a checkpoint's images are of the file that
        now holds that name (a best step that moved, a retrained run)."""
        ours, others = [], []
        folder = self.images_at(checkpoint)
        for image in sorted(folder.glob("*.png")) if folder.is_dir() else []:
            made_by = lora_sha256_of_image(image.with_suffix(".json"))
            (ours if made_by is not None and made_by == lora_sha256 else others).append(image)
        return ours, others

    def current_metrics(self, checkpoint: str, lora_sha256: str | None = None) -> dict[str, Any] | None:
        """The evaluation (metrics.json) of the run's LoRA at `checkpoint`, where it measured the file that holds
        that name now (`lora_sha256`, else hashed here); None where there is none, or it measured another file."""
        path = self.results_at(checkpoint) / "metrics.json"
        if not path.is_file():
            return None
        metrics = read_json(path)
        current = lora_sha256 or self.lora_sha256(checkpoint)
        return metrics if current is not None and metrics.get("lora_sha256") == current else None

    def images_at(self, checkpoint: str) -> Path:
        """Where the images of the run's LoRA at `checkpoint` go: images/ for the final one."""
        checkpoint = checked_checkpoint(checkpoint)
        return self.images if checkpoint == "final" else self.root / f"images-{checkpoint}"

    def results_at(self, checkpoint: str) -> Path:
        """Where the evaluation of the run's LoRA at `checkpoint` goes (metrics.json, scores.csv): the run's folder
        for the final one (the results table's), else beside its images."""
        return self.root if checkpoint == "final" else self.images_at(checkpoint)

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    def read_status(self) -> dict[str, Any] | None:
        return read_json(self.status) if self.status.exists() else None

    def write_status(self, state: RunState, **details: Any) -> None:
        status = {"state": state, "updated": time.time(), **details}
        try:
            write_json(self.status, status)
        except OSError:
            # A full disk has no room for a new file, but the old status's own block holds the new one: rewrite
            # it in place rather than leave the run saying 'running' (not atomic, so only as the last resort).
            if not self.status.is_file():
                raise
            text = json_text(status).encode()
            fd = os.open(self.status, os.O_WRONLY)
            try:
                os.write(fd, text)
                os.ftruncate(fd, len(text))
                os.fsync(fd)
            finally:
                os.close(fd)

    def mark_stale(self, reason: str | None) -> None:
        """Say in a finished run's status why its results are not of what the study now asks for it (None: they
        are); results and the report show it beside the run."""
        status = self.read_status() or {}
        if status.get("stale") != reason:
            write_json(self.status, {key: value for key, value in status.items() if key != "stale"}
                       | ({"stale": reason} if reason else {}))

    def state(self) -> str:
        """The run's state as it truly is now: done | failed | interrupted | running (by a live process that holds
        it) | pending. A status that says running, of a process that is gone, is an interrupted run."""
        status = self.read_status()
        if status is None or status["state"] == "pending":
            return "pending"
        if status["state"] == "done" and self.lora.is_file():
            return "done"
        if status["state"] == "running":
            held = self.held_elsewhere()
            alive = held if held is not None else still_running(status.get("pid"), status.get("pid_started"))
            return "running" if alive else "interrupted"
        if status["state"] == "failed" and status.get("reason") != "interrupted":
            return "failed"
        return "interrupted"

    def seconds_so_far(self) -> float:
        """Training time of the run's stretches until now: what its status recorded, plus, for a stretch killed
        before it could say, the time from that stretch's start to its last logged step."""
        status = self.read_status() or {}
        if status.get("state") != "running":
            return float(status.get("seconds") or 0.0)
        steps = read_metrics(self.metrics)
        cut_short = steps[-1]["time"] - status["started"] if steps and status.get("started") else 0.0
        return float(status.get("seconds_before") or 0.0) + max(0.0, cut_short)

    def held_elsewhere(self) -> bool | None:
        """Whether a process holds this run's lock now; None for a run that never had one (an older workspace).
        Only reads: it works in a read-only workspace."""
        import fcntl

        try:
            handle = open(self.lock)
        except FileNotFoundError:
            return None
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            return False

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Hold the run for this process (training it), or raise RunBusy when another process holds it. The
        system releases the lock however its process ends, so a dead holder never blocks a resume."""
        def busy() -> RunBusy:
            status = self.read_status() or {}
            return RunBusy(f"run {self.name!r} is being trained by another process (pid {status.get('pid')}); "
                           "nothing was done")

        with exclusive(self.lock, busy):
            yield

    def remove_temporary_files(self) -> None:
        """Debris of writes a kill cut short (only while this process holds the run: no other is writing)."""
        for item in sorted(self.root.rglob(".*.tmp"), reverse=True):
            if not TEMPORARY_NAME.fullmatch(item.name):
                continue
            if item.is_dir():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)


def run_name_problem(name: str) -> str | None:
    """Why `name` cannot name a run, or None. A run's name becomes a folder under runs/: one plain path
    component, never a way out of the workspace."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
        return (f"{name!r} is not a valid run name (one folder name: not empty, no '/' or '\\', not starting "
                "with '.')")
    return None


def check_run_name(name: str, what: str = "--run") -> str:
    problem = run_name_problem(name)
    if problem:
        raise LookalikeError(f"{what}: {problem}")
    return name


@dataclass(frozen=True)
class Workspace:
    """Everything a study writes lives under `root` (docs/sweeps.md's "Workspace" lists what goes where)."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def results(self) -> Path:
        return self.root / "results.sqlite"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def generated(self) -> Path:
        """Images made without a run of this workspace: the base model, or a LoRA file given by path."""
        return self.root / "generated"

    def run(self, name: str) -> RunPaths:
        return RunPaths(self.runs / check_run_name(name))

    def lora_of(self, choice: str, checkpoint: str = "final") -> Path:
        """The LoRA named `<run>` (at `checkpoint`) or `<run>@<checkpoint>`, as the demo lists them."""
        name, _, named = choice.partition("@")
        return self.run(name).lora_at(named or checkpoint)
