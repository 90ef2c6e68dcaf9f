"""Never lose or mislabel a user's work: source photos, stale images, concurrent runs, non-finite values, partial
files, run names, status truth. Each test reproduces a fault that once lost or falsified work."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lookalike.config import load_config
from lookalike.workspace import RunPaths, Workspace
from tests.conftest import run_cli
from tests.helpers import digests


def strict_json(path: Path):
    """JSON as other tools read it: a bare NaN or Infinity is an error."""
    def refuse(constant):
        raise ValueError(f"{path}: {constant} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def strict_json_line(line: str):
    return json.loads(line, parse_constant=lambda constant: pytest.fail(f"{constant} in metrics.jsonl"))


# --- prepare: source photos --------------------------------------------------------------------------------------

@pytest.mark.parametrize("inside", ["data/qa", "data/images", "data", "."])
@pytest.mark.slow
def test_a_photo_folder_overlapping_the_prepared_data_is_refused(tiny_config, faces, tmp_path, inside):
    work = tmp_path / "work"
    photos = (work / inside).resolve()
    photos.mkdir(parents=True, exist_ok=True)
    for source in sorted((faces / "train" / "obama").iterdir())[:4]:
        (photos / source.name).write_bytes(source.read_bytes())
    before = digests(work)
    result = run_cli("prepare", str(tiny_config(subject={"images": str(photos)}, data={"crop": "center"})))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "subject.images" in result.stderr and "prepared-data folder" in result.stderr
    assert digests(work) == before


@pytest.mark.slow
def test_prepare_removes_only_the_files_it_wrote(tiny_config, faces, tmp_path):
    config = tiny_config(data={"crop": "center", "resolution": 64})
    assert run_cli("prepare", str(config)).returncode == 0
    data = tmp_path / "work" / "data"
    old_crops = sorted((data / "images").glob("*.png"))
    mine = {data / "images" / "my_notes.txt": b"keep me", data / "images" / "mine.png": b"\x89PNG not ours",
            data / "qa" / "holiday.jpg": b"a user's file"}
    for path, content in mine.items():
        path.write_bytes(content)
    # New settings: every crop and caption is written anew and the old ones go, but only those prepare wrote.
    result = run_cli("prepare", str(config), "--set", "data.resolution=32")
    assert result.returncode == 0, result.stderr
    assert old_crops and not any(p.exists() for p in old_crops)
    assert len(list((data / "images").glob("*.png"))) == len(old_crops) + 1  # the new crops and mine.png
    assert all(path.read_bytes() == content for path, content in mine.items())


@pytest.mark.slow
def test_an_edited_manifest_cannot_make_prepare_delete_outside_its_folders(tiny_config, faces, tmp_path):
    config = tiny_config(data={"crop": "center"})
    assert run_cli("prepare", str(config)).returncode == 0
    data = tmp_path / "work" / "data"
    precious = tmp_path / "precious.jpg"
    precious.write_bytes(b"a user's photo")
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["photos"][0]["thumbnail"] = "../../precious.jpg"  # as if it had written that file
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert run_cli("prepare", str(config)).returncode == 0
    assert precious.read_bytes() == b"a user's photo"


def test_prepare_never_reads_a_large_non_image_whole(tiny_config, faces, tmp_path, monkeypatch):
    from lookalike.data.prepare import prepare_study
    from lookalike.display import console

    photos = tmp_path / "photos"
    photos.mkdir()
    for source in sorted((faces / "train" / "obama").iterdir())[:4]:
        (photos / source.name).write_bytes(source.read_bytes())
    video = photos / "holiday.mp4"
    with open(video, "wb") as handle:  # 3 GB that take no disk: a sparse file
        handle.write(b"\x00\x00\x00\x18ftypmp42")
        handle.truncate(3 * 2**30)
    read_whole = []
    original = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: read_whole.append(self) or original(self))
    config = load_config(tiny_config(subject={"images": str(photos)}, data={"crop": "center"}))
    photos_found = prepare_study(config, console())["sks"]
    assert video not in read_whole
    record = next(p for p in photos_found if p.source == str(video))
    assert record.status == "excluded" and "not an image" in record.reasons[0]


# --- generate: images keyed by everything that made them ---------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory, faces):
    """A config with one trained run `r` (in this process: generate is called here too, as the pipeline does)."""
    from lookalike.train.trainer import train
    from tests.conftest import tiny_study

    folder = tmp_path_factory.mktemp("trained")
    config = tiny_study(folder, faces, train={"max_train_steps": 4}, generate={"num_inference_steps": 2},
                        data={"crop": "center"})
    train(load_config(config), "r")
    return config


def generate_run(config_file: Path, *overrides: str) -> Path:
    from lookalike.generate import generate

    return generate(load_config(config_file, list(overrides)), run="r")


def sidecar(folder: Path, stem: str = "p00_s0_g5") -> dict:
    return json.loads((folder / f"{stem}.json").read_text())


@pytest.mark.slow
def test_changed_settings_make_new_images_and_unchanged_ones_are_kept(trained):
    images = generate_run(trained)
    first = images / "p00_s0_g5.png"
    stamp = first.stat().st_mtime_ns
    generate_run(trained)
    assert first.stat().st_mtime_ns == stamp, "nothing changed: the image is kept"
    for override, key, value in [("generate.prompts=['{token} at the beach']", "prompt", "sks at the beach"),
                                 ("generate.num_inference_steps=3", "steps", 3)]:
        generate_run(trained, override)
        assert sidecar(images)["settings"][key] == value and sidecar(images)[key] == value
        assert first.stat().st_mtime_ns != stamp, f"{key} changed: the image is made again"
        stamp = first.stat().st_mtime_ns


@pytest.mark.slow
def test_a_retrained_lora_of_the_same_name_makes_new_images(trained):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    lora = trained.parent / "work" / "runs" / "r" / "lora.safetensors"
    before = sidecar(generate_run(trained))["settings"]["loras"][0]["sha256"]
    with safe_open(str(lora), "pt") as handle:
        metadata = handle.metadata()
    save_file({k: v * 2 for k, v in load_file(lora).items()}, str(lora), metadata=metadata)
    after = sidecar(generate_run(trained))["settings"]["loras"][0]["sha256"]
    assert after != before and after == hashlib.sha256(lora.read_bytes()).hexdigest()


@pytest.mark.slow
def test_the_report_grid_never_labels_an_image_with_settings_that_did_not_make_it(trained):
    from lookalike.generate import current_image, image_jobs, job_settings, lora_fingerprints

    red_hat = "generate.prompts=['{token} in a red hat']"
    config = load_config(trained, [red_hat])
    run = Workspace(config.workspace).run("r")
    job = image_jobs(config)[0]
    settings = job_settings(config, job, lora_fingerprints([(run.lora, 1.0)]))
    generate_run(trained)  # the config file's own prompt, under the same file name
    assert (run.images / f"{job.stem}.png").is_file()
    assert current_image(run.images, job, settings) is None, "another prompt's image is not this job's"
    generate_run(trained, red_hat)
    assert current_image(run.images, job, settings) == run.images / f"{job.stem}.png"


# --- one process per run --------------------------------------------------------------------------------------

def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lookalike", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ.copy())


def wait_for_state(run: RunPaths, state: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = run.read_status() if run.status.is_file() else None
        if status and status["state"] == state and run.metrics.is_file() and run.metrics.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"run never reached {state}")


@pytest.mark.slow
def test_a_second_process_never_trains_a_run_that_another_is_training(tiny_config, tmp_path):
    config = tiny_config(train={"max_train_steps": 100_000}, data={"crop": "center"})  # stopped by the test
    config.write_text(config.read_text() + '[[sweep.experiments]]\nname = "r"\n')
    first = start("train", str(config), "--run", "r")
    run = Workspace(tmp_path / "work").run("r")
    try:
        wait_for_state(run, "running")
        second = run_cli("train", str(config), "--run", "r", "--resume")
        assert second.returncode == 75, second.stderr
        assert "being trained by another process" in second.stderr
        sweep = run_cli("sweep", str(config))
        assert sweep.returncode == 0, sweep.stdout + sweep.stderr
        assert "running elsewhere" in sweep.stdout
        assert first.poll() is None, "the first process trains on, untouched"
    finally:
        first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 130, first.stderr
    steps = [json.loads(line)["step"] for line in run.metrics.read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)), "one process wrote them, once each"
    assert run.read_status()["state"] == "failed" and run.read_status()["reason"] == "interrupted"


@pytest.mark.slow
def test_a_run_whose_pid_now_belongs_to_another_process_is_taken_over(tiny_config, tmp_path):
    from lookalike.train.trainer import train

    config = tiny_config(train={"max_train_steps": 4, "checkpoint_every": 2}, data={"crop": "center"})
    train(load_config(config), "r")
    run = Workspace(tmp_path / "work").run("r")
    run.lora.unlink()
    # The status names a live pid (this test's) with another start time: an unrelated process got the pid.
    run.write_status("running", pid=os.getpid(), pid_started=1, started=time.time())
    run.lock.unlink()  # a workspace from before run locks: only the status can tell
    assert run.state() == "interrupted"
    results = run_cli("results", str(config))
    assert "interrupted" in results.stdout and "is gone" in results.stdout
    resumed = run_cli("train", str(config), "--run", "r", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert run.read_status()["state"] == "done"


# --- non-finite values --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override,key", [("train.learning_rate=inf", "train.learning_rate"),
                                          ("train.logit_mean=nan", "train.logit_mean"),
                                          ("generate.guidance_scales=[5.0, nan]", "generate.guidance_scales")])
def test_non_finite_config_values_are_refused_by_name(tiny_config, override, key):
    from lookalike.errors import LookalikeError

    with pytest.raises(LookalikeError, match=re.escape(key)):
        load_config(tiny_config(), [override])


@pytest.mark.slow
def test_a_run_whose_loss_turns_nan_stops_failed_at_that_step(tiny_config, tmp_path):
    config = tiny_config(train={"max_train_steps": 30, "learning_rate": 1e30, "checkpoint_every": 1,
                                "lr_scheduler": "constant", "max_grad_norm": 1e30}, data={"crop": "center"})
    result = run_cli("train", str(config), "--run", "r")
    assert result.returncode == 2, result.stdout + result.stderr
    run = Workspace(tmp_path / "work").run("r")
    status = strict_json(run.status)
    assert status["state"] == "failed" and "at step" in status["reason"], status
    assert "last good checkpoint" in status["reason"] and result.stderr.count("\n") == 1
    assert not run.lora.exists()
    records = [strict_json_line(line) for line in run.metrics.read_text().splitlines()]
    stopped = int(re.search(r"at step (\d+)", status["reason"]).group(1))
    assert records[-1]["step"] == stopped and records[-1]["loss"] is None  # NaN, written as JSON's null
    from lookalike.train.checkpoint import list_checkpoints, load_checkpoint

    for checkpoint in list_checkpoints(run.checkpoints):  # every checkpoint kept is a good one
        lora, _ = load_checkpoint(checkpoint)
        assert all(t.isfinite().all() for t in lora.values())
        assert int(checkpoint.name.removeprefix("step-")) < stopped


@pytest.mark.slow
def test_merge_weights_must_be_finite(tmp_path):
    result = run_cli("merge", "a.safetensors", "b.safetensors", "--out", str(tmp_path / "m.safetensors"),
                     "--weights", "nan,inf")
    assert result.returncode == 2 and "--weights" in result.stderr


# --- upper bounds ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_resolution_that_cannot_work_is_refused_with_its_limit(tiny_config):
    result = run_cli("prepare", str(tiny_config()), "--set", "data.resolution=8192")
    assert result.returncode == 2 and "data.resolution" in result.stderr and "4096" in result.stderr


@pytest.mark.slow
def test_a_rank_above_the_layer_width_is_refused_with_its_limit(tiny_config):
    result = run_cli("train", str(tiny_config(data={"crop": "center"})), "--set", "train.rank=100000")
    assert result.returncode == 2, result.stderr
    assert "train.rank = 100000" in result.stderr and "at most" in result.stderr


# --- resume after a cut-off metrics line; temporary files; time of every stretch ---------------------------------

@pytest.mark.slow
def test_resume_drops_a_cut_off_metrics_line_and_cleans_temporary_files(tiny_config, tmp_path):
    from lookalike.train.trainer import train

    config = tiny_config(train={"max_train_steps": 10, "checkpoint_every": 5}, data={"crop": "center"})
    train(load_config(config), "r")
    run = Workspace(tmp_path / "work").run("r")
    lines = run.metrics.read_text().splitlines()
    run.metrics.write_text("\n".join(lines[:7]) + '\n{"step": 8, "lo')  # killed mid-write
    run.lora.unlink()
    run.write_status("failed", reason="interrupted", resumable=True, seconds=100.0)
    debris = [run.root / ".lora.safetensors.1a2b3c4d.tmp", run.checkpoints / ".step-000010.5e6f7a8b.tmp"]
    debris[0].write_bytes(b"half")
    debris[1].mkdir()
    mine = run.root / ".my-notes.tmp"  # a name no write of lookalike makes
    mine.write_text("keep")
    result = run_cli("train", str(config), "--run", "r", "--resume")
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["step"] for line in run.metrics.read_text().splitlines()] == list(range(1, 11))
    assert not any(path.exists() for path in debris) and mine.read_text() == "keep"
    assert run.read_status()["seconds"] > 100.0  # the earlier stretch counts too


def test_a_killed_child_is_named_by_its_signal_with_what_to_do(tmp_path):
    from lookalike.sweep.runner import child_outcome

    run = RunPaths(tmp_path / "runs" / "r")
    run.root.mkdir(parents=True)
    run.write_status("running", pid=999999999, started=time.time())
    outcome = child_outcome(run, -signal.SIGKILL, 3.0, tmp_path / "results.sqlite")
    assert outcome.state == "failed"
    assert "SIGKILL" in outcome.reason and "out of memory" in outcome.reason
    assert "--retry-failed" in outcome.reason

    run.write_status("running", pid=os.getpid())  # another process holds the run: its status stays as it is
    busy = child_outcome(run, 75, 1.0, tmp_path / "results.sqlite")
    assert busy.state == "running elsewhere" and run.read_status()["pid"] == os.getpid()


# --- run names --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../../x", "", "a/b", ".hidden", ".."])
@pytest.mark.slow
def test_run_names_are_one_folder_name(tiny_config, tmp_path, name):
    result = run_cli("train", str(tiny_config()), "--run", name)
    assert result.returncode == 2 and "not a valid run name" in result.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "work" / "runs").exists()


@pytest.mark.slow
def test_experiment_names_are_checked_in_the_config(tiny_config):
    config = tiny_config()
    config.write_text(config.read_text() + '[[sweep.experiments]]\nname = "../escape"\n')
    result = run_cli("sweep", str(config), "--plan")
    assert result.returncode == 2 and "sweep.experiments" in result.stderr and "not a valid run name" in result.stderr


# --- user text printed as it is --------------------------------------------------------------------------------

@pytest.mark.slow
def test_names_with_square_brackets_print_whole(tiny_config, tmp_path):
    config = tiny_config(train={"max_train_steps": 2}, data={"crop": "center"}, subject={"token": "[/b]"},
                         **{"": {"name": "test", "workspace": str(tmp_path / "ws ün [old]")}})
    result = run_cli("train", str(config), "--run", "[new]")
    assert result.returncode == 0, result.stderr
    assert "ws ün [old]" in result.stdout and "run '[new]' done" in result.stdout
    assert "prepare [/b]" in result.stdout


@pytest.mark.slow
def test_a_mistake_found_before_the_first_step_does_not_use_up_the_run_name(tiny_config, tmp_path):
    """A bad model.checkpoint (or a layer_filter that matches nothing) fails after the run's folder is made; the
    corrected config trains the same run afresh, by name or through `sweep --retry-failed`."""
    from lookalike.errors import LookalikeError
    from lookalike.train.trainer import train

    run = Workspace(tmp_path / "work").run("default")
    missing = tiny_config(model={"checkpoint": str(tmp_path / "gone.safetensors")}, train={"max_train_steps": 2})
    with pytest.raises(LookalikeError, match="model.checkpoint: file not found"):
        train(load_config(missing), "default")
    no_layers = tiny_config("filter.toml", train={"max_train_steps": 2, "layer_filter": "no-such-layer"})
    result = run_cli("sweep", str(no_layers), "--retry-failed")
    assert result.returncode == 1 and run.state() == "failed" and "matches none of the layers" in \
        run.read_status()["reason"], result.stdout + result.stderr
    corrected = tiny_config("fixed.toml", train={"max_train_steps": 2})
    result = run_cli("sweep", str(corrected), "--retry-failed")
    assert result.returncode == 0, result.stdout + result.stderr
    assert run.state() == "done" and len(read_metrics_steps(run)) == 2
    assert not run.checkpoint_record.exists(), "nothing of the first try's config is left"
    assert json.loads(run.config.read_text())["train"]["layer_filter"] is None


def read_metrics_steps(run: RunPaths) -> list[int]:
    from lookalike.workspace import read_metrics

    return [record["step"] for record in read_metrics(run.metrics)]
