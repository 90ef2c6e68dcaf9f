"""Warm sweep workers (sweep/warm.py, train/held_base.py): the same LoRAs as a process per run, the base loaded
once per worker, and a killed worker replaced with its run resumed."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from lookalike.workspace import Workspace
from tests.conftest import run_cli, tiny_study
from tests.test_sweep import sweep_config

pytestmark = pytest.mark.slow  # starts lookalike processes: `make test` only

EXPERIMENTS = [{"name": "a", "gradient_checkpointing": True},  # the worker takes its checkpointing off again
               {"name": "b", "rank": 2, "learning_rate": 1e-3},  # trained on the base a gave back
               {"name": "c", "mixed_precision": "bf16"}]  # another precision: a worker of its own


def study(folder, faces, experiments):
    folder.mkdir()
    path = tiny_study(folder, faces, train={"max_train_steps": 6, "checkpoint_every": 3})
    path.write_text(path.read_text() + "".join(
        "[[sweep.experiments]]\n" + "".join(f"{k} = {str(v).lower() if isinstance(v, bool) else repr(v)}\n"
                                             for k, v in e.items()) for e in experiments))
    return path


def test_warm_workers_train_the_same_loras_as_a_process_per_run(tmp_path, faces):
    # c's run only shows that another precision gets a worker of its own: a process per run is compared on a and b.
    warm, separate = study(tmp_path / "warm", faces, EXPERIMENTS), study(tmp_path / "separate", faces, EXPERIMENTS[:2])
    for config, workers in ((warm, "warm"), (separate, "separate")):
        result = run_cli("sweep", str(config), "--workers", workers)
        assert result.returncode == 0, result.stdout + result.stderr
    runs = {kind: {name: Workspace(tmp_path / kind / "work").run(name) for name in names}
            for kind, names in (("warm", "abc"), ("separate", "ab"))}
    for name in "ab":
        mine, theirs = load_file(runs["warm"][name].lora), load_file(runs["separate"][name].lora)
        assert mine.keys() == theirs.keys() and mine
        for key in mine:
            assert mine[key].dtype == theirs[key].dtype and mine[key].equal(theirs[key]), (name, key)
    pids = {name: workers_of(run) for name, run in runs["warm"].items()}
    assert pids["a"] == pids["b"] != pids["c"], pids
    assert "is the one this worker loaded for its last run" in runs["warm"]["b"].log.read_text()
    assert "is the one this worker loaded" not in runs["warm"]["c"].log.read_text()
    assert all(not workers_of(run) for run in runs["separate"].values())


def workers_of(run) -> list[int]:
    """The pids of the workers that trained the run, from its log's headers (=== <time> worker <pid>: ...)."""
    return [int(line.split(" worker ")[1].split(":")[0]) for line in run.log.read_text().splitlines()
            if line.startswith("=== ") and " worker " in line]


def test_a_killed_worker_is_replaced_and_its_run_resumes(tiny_config, tmp_path):
    config = sweep_config(tiny_config, [{"name": "a"}, {"name": "b"}], max_train_steps=40, checkpoint_every=10)
    sweep = subprocess.Popen([sys.executable, "-m", "lookalike", "sweep", str(config)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    run = Workspace(tmp_path / "work").run("a")
    deadline = time.time() + 120
    while not list(run.checkpoints.glob("step-*")) and time.time() < deadline:
        time.sleep(0.05)
    assert list(run.checkpoints.glob("step-*")), "run a wrote no checkpoint"
    killed = run.read_status()["pid"]
    subprocess.run(["kill", "-KILL", str(killed)], check=True)
    output, _ = sweep.communicate(timeout=180)
    assert sweep.returncode == 0, output
    assert "[a] sweep: its worker ended (killed by SIGKILL" in output
    assert "[a] train: resuming 'a' from step" in output
    runs = [Workspace(tmp_path / "work").run(name) for name in "ab"]
    assert [run.state() for run in runs] == ["done", "done"]
    replaced = workers_of(runs[0])
    assert len(replaced) == 2 and replaced[0] == killed != replaced[1], replaced
    assert workers_of(runs[1]) == [replaced[1]], "the new worker trains a, then b"
