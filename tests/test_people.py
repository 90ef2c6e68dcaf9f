"""Two people in one study: config, prepared photos, joint and separate training, and evaluation of a run."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from PIL import Image

from lookalike.config import load_config
from lookalike.errors import LookalikeError
from lookalike.workspace import Workspace, write_json
from tests.conftest import drawn_by_its_lora, run_cli

pytestmark = pytest.mark.slow  # trains, serves or starts lookalike processes: `make test` only


def two_people(tiny_config, faces, **sections):
    path = tiny_config(**sections)
    path.write_text(path.read_text() + f'[[more_subjects]]\ntoken = "pal"\nclass_word = "man"\n'
                    f'images = "{faces / "train" / "biden"}"\n')
    return path


def test_more_subjects_fill_group_prompts_and_need_their_own_tokens(tiny_config, faces):
    config = load_config(two_people(tiny_config, faces))
    assert [p.token for p in config.people] == ["sks", "pal"]
    assert config.fill("{token_1} and {token_2} standing together") == "sks and pal standing together"
    assert config.fill("a photo of {token}", config.people[1]) == "a photo of pal"
    alone = config.for_subject("pal")
    assert alone.subject.token == "pal" and alone.more_subjects == []
    with pytest.raises(LookalikeError, match="no subject with token 'bob'"):
        config.for_subject("bob")
    same = tiny_config()
    same.write_text(same.read_text() + f'[[more_subjects]]\ntoken = "sks"\nimages = "{faces}"\n')
    with pytest.raises(LookalikeError, match="every subject needs its own token"):
        load_config(same)


def test_joint_training_uses_both_peoples_photos_and_one_person_can_train_alone(tiny_config, faces, tmp_path):
    from rich.console import Console

    from lookalike.data.dataset import training_images

    config_file = two_people(tiny_config, faces, train={"max_train_steps": 4})
    images = training_images(load_config(config_file), Console(quiet=True))
    assert sorted({image.caption for image in images}) == ["a photo of pal", "a photo of sks"]
    assert len(images) == 8
    assert (tmp_path / "work" / "data" / "manifest.json").is_file()
    assert (tmp_path / "work" / "data" / "pal" / "manifest.json").is_file(), "each person prepared apart"

    assert run_cli("train", str(config_file), "--run", "joint").returncode == 0
    solo = run_cli("train", str(config_file), "--run", "paul", "--subject", "pal")
    assert solo.returncode == 0, solo.stderr
    workspace = Workspace(tmp_path / "work")
    from lookalike.models.lora import check_lora_file

    assert check_lora_file(workspace.run("joint").lora)["lookalike.trigger_word"] == "sks pal"
    assert check_lora_file(workspace.run("paul").lora)["lookalike.trigger_word"] == "pal"
    solo_config = json.loads(workspace.run("paul").config.read_text())
    assert solo_config["subject"]["token"] == "pal" and solo_config["more_subjects"] == []


def test_a_run_of_two_people_is_scored_against_the_person_each_prompt_names(tiny_config, faces, tmp_path):
    people = {"obm": "obama", "bdn": "biden"}
    for token, name in people.items():
        (tmp_path / name).mkdir()
        shutil.copy(faces / "group" / f"{name}.jpg", tmp_path / name / f"{name}.jpg")
    config = tiny_config(subject={"token": "obm", "images": str(tmp_path / "obama")},
                         evaluate={"clip_model": "tiny"})
    config.write_text(config.read_text() + f'[[more_subjects]]\ntoken = "bdn"\nclass_word = "man"\n'
                      f'images = "{tmp_path / "biden"}"\n')
    run = Workspace(tmp_path / "work").run("r")
    run.images.mkdir(parents=True)
    for stem, (photo, prompt) in {"p00_s0_g5": ("obama", "a photo of obm"), "p01_s0_g5": ("biden", "a photo of bdn"),
                                  "p02_s0_g5": ("obama_and_biden", "obm and bdn standing together")}.items():
        Image.open(faces / "group" / f"{photo}.jpg").convert("RGB").save(run.images / f"{stem}.png")
        write_json(run.images / f"{stem}.json", drawn_by_its_lora(run, {"prompt": prompt, "seed": 0,
                                                                       "guidance_scale": 5.0}))
    write_json(run.config, {"train": {"rank": 4}})
    run.write_status("done")

    result = run_cli("evaluate", str(config), "--run", "r")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader((run.root / "scores.csv").open()))
    assert [r["id_match"] for r in rows[:2]] == ["True", "True"], "each portrait against its own person"
    assert rows[2]["clip_prompt"] == "man and man standing together"
    group = json.loads((run.root / "group_metrics.json").read_text())
    assert group["all_found_rate"] == pytest.approx(1 / 3), "both people only in the group photo"
    assert group["per_person"]["bdn"]["leakage_to"] is not None
    assert group["per_person"]["obm"]["found_rate"] == pytest.approx(2 / 3)
