"""The file system as it really fails: a full disk, a read-only workspace, a power cut between write and rename.
Real small file systems (tmpfs) where this machine lets root mount them; the writes' own flushes and modes
everywhere."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from lookalike.workspace import Workspace, atomic_dir, atomic_path, write_json
from tests.conftest import run_cli


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs at tmp_path/disk; skipped where mounting is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small file system here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """Fill `disk` but `leave` bytes; the filler file is returned (remove it to free the space)."""
    filler = disk / "filler"
    stats = os.statvfs(disk)
    with open(filler, "wb") as handle:
        handle.write(b"\0" * max(0, stats.f_bavail * stats.f_frsize - leave))
    return filler


@pytest.mark.slow
def test_a_full_disk_is_one_error_line_the_run_says_failed_and_it_resumes_once_freed(tiny_config, small_disk):
    config = tiny_config(train={"max_train_steps": 6, "checkpoint_every": 2}, data={"crop": "center"},
                         **{"": {"name": "test", "workspace": str(small_disk / "work")}})
    assert run_cli("prepare", str(config)).returncode == 0
    filler = fill(small_disk, 4096)
    result = run_cli("train", str(config), "--run", "r")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: no space left on the device") and result.stderr.count("\n") == 1
    assert str(small_disk) in result.stderr
    run = Workspace(small_disk / "work").run("r")
    if run.status.is_file():  # it got as far as saying it runs: then it says it failed, never 'running'
        status = json.loads(run.status.read_text())
        assert status["state"] == "failed" and "no space left" in status["reason"]
    filler.unlink()
    resumed = run_cli("train", str(config), "--run", "r", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert run.read_status()["state"] == "done" and run.lora.is_file()


@pytest.mark.slow
def test_a_read_only_workspace_prints_results_and_refuses_the_rest_in_one_line(tiny_config, small_disk):
    config = tiny_config(train={"max_train_steps": 2}, data={"crop": "center"},
                         **{"": {"name": "test", "workspace": str(small_disk / "work")}})
    assert run_cli("train", str(config), "--run", "r").returncode == 0
    before = {p: p.stat().st_mtime_ns for p in (small_disk / "work").rglob("*")}
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    results = run_cli("results", str(config))
    assert results.returncode == 0, results.stderr
    assert "r" in results.stdout and "done" in results.stdout
    for command in (["train", str(config), "--run", "other"], ["prepare", str(config)],
                    ["generate", str(config), "--run", "r"], ["report", str(config)]):
        result = run_cli(*command)
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, (command, result.stderr)
        assert "read-only" in result.stderr
    subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    assert {p: p.stat().st_mtime_ns for p in (small_disk / "work").rglob("*")} == before


def test_writes_are_flushed_to_disk_before_and_after_the_rename(tmp_path, monkeypatch):
    flushed = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: flushed.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    write_json(tmp_path / "status.json", {"state": "done"})
    temporary, folder = flushed
    assert Path(temporary).parent == tmp_path and Path(temporary).name.startswith(".status.json.")
    assert Path(folder) == tmp_path  # the rename itself reached the disk
    flushed.clear()
    with atomic_dir(tmp_path / "checkpoint") as tmp:
        (tmp / "lora.safetensors").write_bytes(b"weights")
    assert any(path.endswith("lora.safetensors") for path in flushed) and str(tmp_path) in flushed


def test_files_and_folders_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "status.json", {})
        with atomic_path(tmp_path / "lora.safetensors") as tmp:
            tmp.write_bytes(b"x")
        with atomic_dir(tmp_path / "report") as folder:
            (folder / "index.html").write_text("<p>")
    finally:
        os.umask(old)
    assert (tmp_path / "status.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "lora.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "report").stat().st_mode & 0o777 == 0o755


def test_json_files_never_hold_a_bare_nan(tmp_path):
    write_json(tmp_path / "status.json", {"final_loss": float("nan"), "spread": [float("inf"), 1.0]})
    assert json.loads((tmp_path / "status.json").read_text()) == {"final_loss": None, "spread": [None, 1.0]}
