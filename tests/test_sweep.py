"""lookalike sweep: separate processes, failures that stop nothing, re-runs, kills, streaming, Ray."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from lookalike.sweep.runner import stream_child
from lookalike.workspace import Workspace
from tests.conftest import run_cli

pytestmark = pytest.mark.slow  # trains, serves or starts lookalike processes: `make test` only


def sweep_config(tiny_config, experiments, **train):
    path = tiny_config(train={"max_train_steps": 12, "checkpoint_every": 6, **train})
    for experiment in experiments:
        path.write_text(path.read_text() + "[[sweep.experiments]]\n" +
                        "".join(f"{k} = {json.dumps(v)}\n" for k, v in experiment.items()))
    return path


def states(tmp_path, *names):
    workspace = Workspace(tmp_path / "work")
    return [(workspace.run(n).read_status() or {}).get("state") for n in names]


def test_a_failed_run_stops_nothing_and_a_second_sweep_runs_nothing(tiny_config, tmp_path):
    config = sweep_config(tiny_config, [{"name": "a", "learning_rate": 1e-3},
                                        {"name": "bad", "optimizer": "adamw8bit"},  # refused at run time on a CPU
                                        {"name": "c", "rank": 2}])
    first = run_cli("sweep", str(config), "--jobs", "2")
    assert first.returncode == 1, first.stderr
    assert states(tmp_path, "a", "bad", "c") == ["done", "failed", "done"]
    summary = first.stdout[first.stdout.index("sweep"):]
    assert "bad" in summary and "needs bitsandbytes and a CUDA GPU" in first.stdout
    assert "[a] train: run 'a' done" in first.stdout, "child output is streamed with the run's name"
    log = (tmp_path / "work" / "runs" / "c" / "train.log").read_text()
    assert "train: run 'c' done" in log
    bad = Workspace(tmp_path / "work").run("bad").read_status()
    assert bad["exit_code"] == 2 and "adamw8bit" in bad["reason"]

    lora = (tmp_path / "work" / "runs" / "a" / "lora.safetensors").stat().st_mtime_ns
    second = run_cli("sweep", str(config))
    assert "to run" not in second.stdout and second.stdout.count("done earlier") == 2
    assert (tmp_path / "work" / "runs" / "a" / "lora.safetensors").stat().st_mtime_ns == lora

    table = run_cli("results", str(config), "--sort", "final_loss")
    assert table.returncode == 0 and "bad: failed:" in table.stdout


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGKILL])
def test_a_stopped_sweep_resumes_the_interrupted_run_from_its_checkpoint(tiny_config, tmp_path, stop):
    config = sweep_config(tiny_config, [{"name": "a"}, {"name": "b"}], max_train_steps=40, checkpoint_every=10)
    # As from an interactive shell: Ctrl-C's SIGINT handled, whatever this test process inherited (a process
    # started with SIGINT ignored, as a background job is, keeps ignoring it).
    sweep = subprocess.Popen([sys.executable, "-m", "lookalike", "sweep", str(config)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    checkpoints = tmp_path / "work" / "runs" / "a" / "checkpoints"
    deadline = time.time() + 120
    while not list(checkpoints.glob("step-*")) and time.time() < deadline:
        time.sleep(0.05)
    assert list(checkpoints.glob("step-*")), "run a wrote no checkpoint"
    sweep.send_signal(stop)
    sweep.wait(timeout=60)
    # SIGKILL: the orphaned run is stopped by its parent-death signal. It then says so in its status, or, where
    # it dies before it can, its status names a process that is gone: an interrupted run either way.
    run = Workspace(tmp_path / "work").run("a")
    deadline = time.time() + 60
    while run.state() == "running" and time.time() < deadline:
        time.sleep(0.1)
    assert run.state() == "interrupted", run.read_status()

    again = run_cli("sweep", str(config))
    assert again.returncode == 0, again.stdout + again.stderr
    assert states(tmp_path, "a", "b") == ["done", "done"]
    assert "[a] train: resuming 'a' from step" in again.stdout


def test_a_line_reaches_the_parent_before_the_child_exits(tmp_path):
    release = tmp_path / "release"
    child = ("import pathlib, time\n"
             "print('first line', flush=True)\n"
             f"while not pathlib.Path({str(release)!r}).exists(): time.sleep(0.01)\n"
             "print('last line')\n")
    children, seen = {}, []

    def emit(line):
        seen.append((line, children["c"].poll()))  # poll() is None while the child still runs
        release.touch()

    code = stream_child([sys.executable, "-c", child], "c", tmp_path / "c.log", emit, {}, children)
    assert code == 0
    assert seen[0] == ("[c] first line", None)
    assert (tmp_path / "c.log").read_text().endswith("first line\nlast line\n")


@pytest.fixture
def local_ray():
    """A Ray head node started for the test, as a user would start one (`ray start --head`)."""
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    temp = tempfile.mkdtemp(prefix="ray")  # short: Ray's socket paths must fit in 107 bytes
    port = "6391"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    started = subprocess.run([ray, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                              f"--temp-dir={temp}"], capture_output=True, text=True, env=env, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    yield f"127.0.0.1:{port}"
    subprocess.run([ray, "stop", "--force"], capture_output=True, env=env, timeout=120)
    shutil.rmtree(temp, ignore_errors=True)


def test_ray_backend_runs_each_experiment_as_a_task_with_the_same_logs_and_statuses(tiny_config, tmp_path,
                                                                                    local_ray):
    config = sweep_config(tiny_config, [{"name": "a"}, {"name": "b", "rank": 2}])
    result = run_cli("sweep", str(config), "--backend", "ray", "--address", local_ray)
    assert result.returncode == 0, result.stdout + result.stderr
    assert states(tmp_path, "a", "b") == ["done", "done"]
    for name in ("a", "b"):
        assert f"train: run '{name}' done" in (tmp_path / "work" / "runs" / name / "train.log").read_text()
        assert f"[{name}] train: run '{name}' done" in result.stdout + result.stderr, "streamed through Ray"
