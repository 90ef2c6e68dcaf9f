import pytest

"""lookalike ablate: base model against a fine-tuned run, on the trigger word, the real name and a stranger."""

import json

from lookalike.config import load_config
from lookalike.report.ablate import prompt_sets
from tests.conftest import run_cli

pytestmark = pytest.mark.slow  # trains, serves or starts lookalike processes: `make test` only


def test_prompt_sets_name_each_person_and_give_clip_the_class_word(tiny_config):
    config = load_config(tiny_config(subject={"real_name": "Guido van Rossum"},
                                     generate={"prompts": ["a photo of {token}", "{token} smiling"]}))
    sets = prompt_sets(config)
    assert [(variant, prompt) for variant, prompt, _ in sets] == [
        ("trigger word", "a photo of sks"), ("trigger word", "sks smiling"),
        ("real name", "a photo of Guido van Rossum"), ("real name", "Guido van Rossum smiling"),
        ("unknown person", "a photo of Tobin Wrexley"), ("unknown person", "Tobin Wrexley smiling")]
    assert {clip for _, _, clip in sets} == {"a photo of man", "man smiling"}


def test_ablate_compares_base_and_tuned_on_three_prompt_sets(tiny_config, tmp_path):
    config = tiny_config(subject={"real_name": "Guido van Rossum"}, evaluate={"clip_model": "tiny"},
                         generate={"prompts": ["a photo of {token}"], "num_inference_steps": 2})
    assert run_cli("train", str(config), "--run", "r").returncode == 0
    result = run_cli("ablate", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    ablation = tmp_path / "work" / "ablation"
    assert len(list((ablation / "base").glob("*.png"))) == 3 and len(list((ablation / "r").glob("*.png"))) == 3
    results = json.loads((ablation / "results.json").read_text())
    assert results["run"] == "r" and list(results["metrics"]) == ["trigger word", "real name", "unknown person"]
    for variant in results["metrics"].values():
        assert variant["base"]["images"] == 1 and variant["r"]["images"] == 1
        assert variant["base"]["clip_score"] != variant["r"]["clip_score"], "the LoRA changes the image"
    assert "The study's reading" in result.stdout and (ablation / "summary.md").is_file()


def test_ablate_says_what_is_missing(tiny_config):
    result = run_cli("ablate", str(tiny_config()))
    assert result.returncode == 2 and "error: subject.real_name is not set" in result.stderr
    result = run_cli("ablate", str(tiny_config(subject={"real_name": "Guido van Rossum"})))
    assert result.returncode == 2 and "error: ablate: no finished run" in result.stderr
