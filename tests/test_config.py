import json

import pytest
import yaml

from lookalike.config import load_config
from lookalike.errors import LookalikeError
from lookalike.sweep.plan import config_for_run
from tests.conftest import write_config

MINIMAL = {"": {"name": "s", "workspace": "work"}, "subject": {"token": "sks", "images": "photos"}}


def test_toml_json_and_yaml_load_the_same_study(tmp_path):
    toml = load_config(write_config(tmp_path / "s.toml", {**MINIMAL, "train": {"rank": 8, "alpha": 4.0}}))
    data = {"name": "s", "workspace": "work", "subject": {"token": "sks", "images": "photos"},
            "train": {"rank": 8, "alpha": 4.0}}
    (tmp_path / "s.json").write_text(json.dumps(data))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    assert load_config(tmp_path / "s.json") == toml
    assert load_config(tmp_path / "s.yaml") == toml
    assert toml.train.rank == 8 and toml.train.lora_alpha == 4.0


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    config = load_config(write_config(tmp_path / "s.toml", MINIMAL))
    assert config.workspace == tmp_path / "work"
    assert config.subject.images == tmp_path / "photos"


def test_alpha_defaults_to_rank(tmp_path):
    config = load_config(write_config(tmp_path / "s.toml", {**MINIMAL, "train": {"rank": 32}}))
    assert config.train.alpha is None and config.train.lora_alpha == 32.0


@pytest.mark.parametrize("section, key, value, expected", [
    ("train", "rnak", 8, "unknown key train.rnak"),
    ("tran", "rank", 8, "unknown key tran"),
    ("train", "rank", 0, "train.rank"),
    ("train", "learning_rate", -1e-4, "train.learning_rate"),
    ("train", "max_train_steps", 0, "train.max_train_steps"),
    ("train", "lr_scheduler", "exponential", "train.lr_scheduler"),
    ("data", "resolution", 100, "multiple of 16"),
])
def test_bad_keys_and_values_are_named(tmp_path, section, key, value, expected):
    path = write_config(tmp_path / "s.toml", {**MINIMAL, section: {key: value}})
    with pytest.raises(LookalikeError, match=expected.replace(".", r"\.")) as caught:
        load_config(path)
    assert str(path) in str(caught.value)


def test_missing_required_key_is_named(tmp_path):
    path = write_config(tmp_path / "s.toml", {"": {"name": "s", "workspace": "w"}})
    with pytest.raises(LookalikeError, match="missing key subject"):
        load_config(path)


def test_set_overrides_parse_values_as_toml(tmp_path):
    path = write_config(tmp_path / "s.toml", MINIMAL)
    config = load_config(path, ["train.rank=32", "train.learning_rate=1e-3", "train.lr_scheduler=constant",
                                "generate.seeds=[1, 2]", "train.gradient_checkpointing=true"])
    assert config.train.rank == 32 and config.train.learning_rate == 1e-3
    assert config.train.lr_scheduler == "constant" and config.generate.seeds == [1, 2]
    assert config.train.gradient_checkpointing is True


def test_set_with_nothing_after_the_equals_sign_unsets_a_key(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "ft.safetensors").write_bytes(b"")
    path = write_config(tmp_path / "s.toml", {**MINIMAL, "model": {"checkpoint": "ft.safetensors"},
                                              "train": {"rank": 8}})
    assert load_config(path).model.checkpoint == tmp_path / "ft.safetensors"
    config = load_config(path, ["model.checkpoint=", "train.rank= "])
    assert config.model.checkpoint is None and config.train.rank == load_config(write_config(
        tmp_path / "plain.toml", MINIMAL)).train.rank, "each key at its default"
    with pytest.raises(LookalikeError, match="missing key subject.token"):
        load_config(path, ["subject.token="])


def test_set_override_of_unknown_key_is_refused(tmp_path):
    path = write_config(tmp_path / "s.toml", MINIMAL)
    with pytest.raises(LookalikeError, match=r"unknown key train\.rnak"):
        load_config(path, ["train.rnak=3"])
    with pytest.raises(LookalikeError, match="expected section.key=value"):
        load_config(path, ["train.rank"])


def test_experiment_overrides_train_defaults(tmp_path):
    path = tmp_path / "s.toml"
    write_config(path, {**MINIMAL, "train": {"rank": 16, "learning_rate": 5e-4}})
    path.write_text(path.read_text() + '[[sweep.experiments]]\nname = "exp1"\nrank = 8\nlearning_rate = 1e-3\n')
    config = config_for_run(load_config(path), "exp1")
    assert (config.train.rank, config.train.learning_rate, config.train.max_train_steps) == (8, 1e-3, 1000)
    assert config_for_run(load_config(path), "other").train.rank == 16, "a run that is no experiment: [train]"


def test_experiment_with_unknown_key_is_named(tmp_path):
    path = tmp_path / "s.toml"
    write_config(path, MINIMAL)
    path.write_text(path.read_text() + '[[sweep.experiments]]\nname = "exp1"\nrnak = 8\n')
    with pytest.raises(LookalikeError, match=r"unknown key sweep\.experiments\.0\.rnak"):
        load_config(path)


def test_caption_template_tolerates_other_braces(tmp_path):
    config = load_config(write_config(tmp_path / "s.toml", MINIMAL))
    assert config.fill("{token} {class_word} {not a field}") == "sks person {not a field}"
