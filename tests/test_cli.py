"""The command line as a user meets it: one-line errors naming the problem, non-zero exits, no tracebacks."""

import pickle
import subprocess
import sys

import pytest

from tests.conftest import run_cli, run_in_process


def assert_one_line_error(result, *expected):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in expected:
        assert text in lines[0], lines[0]


@pytest.mark.slow
def test_help_is_instant_and_lists_commands():
    """Instant: the CLI imports no heavy library before a command needs it (torch alone takes seconds)."""
    result = run_cli("--help")
    assert result.returncode == 0
    assert "train" in result.stdout and "generate" in result.stdout
    probe = subprocess.run([sys.executable, "-c", "import sys; from lookalike.cli import app; import typer.testing;"
                            "typer.testing.CliRunner().invoke(app, ['--help']);"
                            "print(sorted({'torch', 'diffusers', 'transformers', 'gradio'} & set(sys.modules)))"],
                           capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "[]", probe.stdout + probe.stderr


def test_missing_image_folder(tiny_config, tmp_path):
    missing = tmp_path / "no-such-photos"
    assert_one_line_error(run_in_process("train", str(tiny_config(subject={"images": str(missing)}))),
                          "subject.images", "folder not found", str(missing))


def test_empty_image_folder(tiny_config, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no photos here")
    assert_one_line_error(run_in_process("train", str(tiny_config(subject={"images": str(empty)}))),
                          "subject.images: no photos in", str(empty))


@pytest.mark.parametrize("train, expected", [
    ({"rnak": 8}, "unknown key train.rnak"),
    ({"rank": 0}, "train.rank"),
    ({"learning_rate": -0.001}, "train.learning_rate"),
    ({"max_train_steps": 0}, "train.max_train_steps"),
])
def test_bad_config(tiny_config, train, expected):
    path = tiny_config(train=train)
    assert_one_line_error(run_in_process("train", str(path)), expected, str(path))


def test_an_error_naming_a_section_in_brackets_prints_it_whole(tiny_config):
    result = run_in_process("sweep", str(tiny_config()), "--plan", "--set", 'sweep.design="grid"',
                     "--set", "sweep.factors={rnak=[1, 2]}")
    assert_one_line_error(result, "sweep.factors: 'rnak' is not a [train] key")


def test_bad_set_override(tiny_config):
    assert_one_line_error(run_in_process("train", str(tiny_config()), "--set", "train.rank=0"), "train.rank")


def test_missing_config_file(tmp_path):
    assert_one_line_error(run_in_process("train", str(tmp_path / "nope.toml")), "config file not found")


class _Exploit:
    """A pickle that, if ever loaded, would create a file: proof that no pickle is unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("name", ["lora.pt", "lora.bin", "lora.safetensors"])
def test_lora_that_is_not_safetensors_is_refused_unloaded(tiny_config, tmp_path, name):
    marker = tmp_path / "pickle-was-loaded"
    bad = tmp_path / name
    bad.write_bytes(pickle.dumps({"transformer.x.lora_A.weight": _Exploit(marker)}))
    result = run_in_process("generate", str(tiny_config()), "--lora", str(bad))
    assert_one_line_error(result, str(bad))
    assert "safetensors" in result.stderr
    assert not marker.exists()


def test_generate_from_a_run_that_was_never_trained(tiny_config):
    assert_one_line_error(run_in_process("generate", str(tiny_config()), "--run", "ghost"), "ghost", "train it first")


@pytest.mark.slow
def test_gated_base_model_offline_says_what_to_do(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = run_cli("train", str(tiny_config(model={"base": "flux-dev"})))
    assert_one_line_error(result, "black-forest-labs/FLUX.1-dev", "hf download")


def test_gated_error_names_the_licence_and_the_token(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    from lookalike.errors import LookalikeError
    from lookalike.models import base

    def gated(*args, **kwargs):
        from types import SimpleNamespace

        raise GatedRepoError("403 gated", response=SimpleNamespace(headers={}, request=None, status_code=403))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(LookalikeError, match=r"gated: accept its licence at https://huggingface.co/black-forest-labs"
                                             r"/FLUX.1-dev.*hf auth login"):
        base.resolve_base("flux-dev")


def test_unknown_base_model_is_named(tiny_config):
    assert_one_line_error(run_in_process("train", str(tiny_config(model={"base": "flux-pro"}))), "model.base",
                          "flux-pro")


@pytest.mark.slow
def test_a_usage_mistake_is_explained_without_a_traceback(tiny_config):
    result = run_cli("train", str(tiny_config()), "--nope")
    assert result.returncode == 2
    assert "No such option: --nope" in result.stderr and "Traceback" not in result.stderr
