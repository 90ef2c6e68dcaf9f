"""What a run was trained on: a run resumes only on the photos it started with, and a finished run trained on other
photos or settings than the study now asks for is named as such in the sweep, the results and the report, never
passed off as the study's (its files are kept as they are)."""

from __future__ import annotations

import json
import shutil
from contextlib import closing

import pytest

from lookalike import display
from lookalike.config import load_config
from lookalike.errors import LookalikeError
from lookalike.store import connect
from lookalike.sweep.plan import Planned
from lookalike.sweep.runner import Sweep
from lookalike.train import trainer
from lookalike.train.trainer import train
from lookalike.workspace import Workspace


@pytest.fixture
def own_photos(tmp_path, faces):
    """A copy of one person's photos that a test may change (the shared ones are never touched)."""
    folder = tmp_path / "photos"
    shutil.copytree(faces / "train" / "obama", folder)
    return folder


@pytest.mark.slow
def test_a_run_resumes_only_on_the_photos_it_started_with(tiny_config, own_photos, monkeypatch, faces):
    path = tiny_config(subject={"images": str(own_photos)},
                       train={"max_train_steps": 4, "checkpoint_every": 2, "checkpoints_keep": 2})
    config = load_config(path)
    real_check = trainer._stop_if_not_finite

    def fail_at_step_3(step, *args):  # a run that stops after its checkpoint at step 2, as a killed one would
        if step == 3:
            raise LookalikeError("stopped for the test")
        return real_check(step, *args)

    monkeypatch.setattr(trainer, "_stop_if_not_finite", fail_at_step_3)
    with pytest.raises(LookalikeError, match="stopped for the test"):
        train(config, "run")
    run = Workspace(config.workspace).run("run")
    recorded = json.loads(run.photos.read_text())
    assert len(recorded) == 4 and set(recorded.values()) == {"a photo of sks"}
    monkeypatch.undo()

    shutil.copy(faces / "test" / "obama.jpg", own_photos / "5.jpg")
    (own_photos / "1.txt").write_text("{token} at a desk\n")
    with pytest.raises(LookalikeError) as refused:
        train(config, "run", resume=True)
    message = str(refused.value)
    assert message.startswith("cannot resume run 'run': its photos changed since it started: 1 added (data/images/5_")
    assert "1 caption changed (data/images/1_" in message
    assert json.loads(run.photos.read_text()) == recorded, "the record stays the run's"
    status = json.loads(run.status.read_text())
    assert status["state"] == "failed" and status["resumable"] and status["reason"] == message, "said where it shows"

    (own_photos / "5.jpg").unlink()
    (own_photos / "1.txt").unlink()
    # Sample steps are scored against the references: a run in progress keeps its own, so that they compare alike.
    measured_elsewhere = config.model_copy(update={"subject": config.subject.model_copy(
        update={"references": own_photos.parent / "held_out"})})
    with pytest.raises(LookalikeError, match="its config differs in subject.references"):
        train(measured_elsewhere, "run", resume=True)
    assert train(config, "run", resume=True).is_file(), "back on its own photos, it resumes"


@pytest.mark.slow
def test_a_finished_run_of_other_photos_or_settings_is_named_so_and_kept(tiny_config, own_photos, faces):
    path = tiny_config(subject={"images": str(own_photos)}, train={"max_train_steps": 2})
    config = load_config(path)
    lora = train(config, "r4")
    trained = lora.read_bytes()
    sweep = Sweep(config, path, [], display.console(quiet=True))
    workspace = Workspace(config.workspace)

    def outcome(overrides: dict) -> tuple[str, str | None]:
        _, left = sweep.todo([Planned("r4", overrides)], retry_failed=False)
        with closing(connect(workspace.results)) as db:
            stored = db.execute("SELECT reason FROM runs WHERE name = 'r4'").fetchone()[0]
        return left[0].reason, stored

    assert outcome({}) == ("done earlier", None)
    shutil.copy(faces / "test" / "obama.jpg", own_photos / "5.jpg")
    reason, stored = outcome({})
    assert reason.startswith("done earlier, trained on other photos (1 added (data/images/5_")
    assert stored == reason.removeprefix("done earlier, ") and "rename the experiment" in stored

    said = display.console(record=True, width=400)
    assert train(config, "r4", console=said) == lora
    text = said.export_text()
    assert "train: run 'r4' is already done: " in text and "trained on other photos (1 added" in text

    (own_photos / "5.jpg").unlink()
    reason, stored = outcome({"learning_rate": 1e-2})
    assert "trained on other settings (train.learning_rate) than the study now asks for" in reason

    assert outcome({}) == ("done earlier", None), "as asked again: nothing to say"
    # Held-out references only measure: a finished run's images are scored again against new ones.
    sweep.config = config.model_copy(update={"subject": config.subject.model_copy(
        update={"references": own_photos.parent / "held_out"})})
    assert outcome({}) == ("done earlier", None)
    assert "stale" not in json.loads(workspace.run("r4").status.read_text())
    assert lora.read_bytes() == trained, "the run's LoRA is never touched"


@pytest.mark.slow
def test_class_images_taken_from_a_folder_are_recorded_like_the_photos(tiny_config, faces, tmp_path):
    """[prior] images replaced under a finished run: it is named stale, and a started run will not resume on them."""
    from lookalike.data.dataset import training_images
    from lookalike.trained_on import stale_reason
    from lookalike.workspace import Workspace

    classes = tmp_path / "classes"
    shutil.copytree(faces / "train" / "biden", classes)
    config = load_config(tiny_config(train={"max_train_steps": 2, "checkpoint_every": 1},
                                     prior={"num_class_images": 2, "images": str(classes)}, data={"crop": "center"}))
    train(config, "r")
    run = Workspace(config.workspace).run("r")
    assert stale_reason(run, config, training_images(config), config.workspace) is None
    shutil.copy(faces / "test" / "obama.jpg", classes / "2.jpg")  # the subject among the class images
    stale = stale_reason(run, config, training_images(config), config.workspace)
    assert "class images of prior.images (1 changed (2.jpg))" in stale
    run.write_status("failed", reason="interrupted")  # as if killed after its checkpoint of step 1
    with pytest.raises(LookalikeError, match=r"cannot resume run 'r': its class images \(prior.images\) changed"):
        train(config, "r", resume=True)


def test_compiling_or_not_is_the_same_run(tiny_config):
    """train.compile changes only speed: a run saved with compile = false (this version's default is auto) is not
    stale, and resumes; a setting that shapes the weights is still named."""
    from lookalike.trained_on import changed_settings

    run = Workspace(load_config(tiny_config()).workspace).run("older")
    run.root.mkdir(parents=True)
    run.config.write_text(json.dumps(load_config(tiny_config(train={"compile": False})).to_json_dict()))
    assert changed_settings(run, load_config(tiny_config())) == []
    assert changed_settings(run, load_config(tiny_config(train={"rank": 8}))) == ["train.rank"]
