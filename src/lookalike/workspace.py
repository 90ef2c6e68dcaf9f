"""Paths of a study's workspace and its runs, run status, and atomic writes.

Every file a later stage reads is written to a temporary name in the same folder and then renamed, so a
crash never leaves a half-written file that looks whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

RunState = Literal["pending", "running", "done", "failed"]


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file` (made if missing) while the block runs: processes sharing a workspace,
    such as a sweep's parallel runs, take turns. The system releases it when its process ends, however it ends."""
    import fcntl

    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_once(folder: Path, marker: str, save) -> Path:
    """`folder`, made by `save(tmp_folder)` on first use, then reused.

    It is saved into a temporary folder and renamed into place, so a crash or a second process building the
    same folder at the same time never leaves a half-written folder behind. `marker` is a file that only a
    complete folder has.
    """
    if (folder / marker).exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        save(tmp)
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / marker).exists():  # not a concurrent builder that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def write_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


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
    def images(self) -> Path:
        return self.root / "images"

    def read_status(self) -> dict[str, Any] | None:
        return read_json(self.status) if self.status.exists() else None

    def write_status(self, state: RunState, **details: Any) -> None:
        write_json(self.status, {"state": state, "updated": time.time(), **details})


@dataclass(frozen=True)
class Workspace:
    """Everything a study writes lives under `root` (DESIGN.md, 'Workspace layout')."""

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
        return RunPaths(self.runs / name)
