"""train.init_lora: a run starts from an existing LoRA file's weight change exactly (whatever its own rank and
alpha), keeps a copy of it, resumes exactly, is named stale when the file changes, and refuses a file that cannot
be its start, by name."""

from __future__ import annotations

import shutil

import pytest
import torch

from lookalike.config import load_config
from lookalike.errors import LookalikeError
from lookalike.models.base import load_component, resolve_base
from lookalike.models.export import export_lora
from lookalike.models.lora import add_lora, lora_state_dict, modules_of, read_lora, save_lora
from lookalike.sweep.designs import experiment_name
from lookalike.train.init_lora import read_start, start_from
from lookalike.trained_on import stale_reason
from lookalike.train.trainer import train
from lookalike.workspace import Workspace
from tests.helpers import assert_a_killed_run_resumes_exactly


def made_lora(path, base="tiny", rank=4, alpha=2.0, target="attention", seed=0, named=True):
    """A LoRA file of `base` in diffusers' layout whose B matrices are not zero (a trained one's change); `named`:
    its header names the base, as lookalike's files do (other tools' may not)."""
    denoiser = load_component(resolve_base(base), "transformer")
    torch.manual_seed(seed)
    add_lora(denoiser, rank, alpha, target)
    with torch.no_grad():
        for name, parameter in denoiser.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    save_lora(path, lora_state_dict(denoiser), denoiser.peft_config["default"], {"base_model": base} if named else {})
    return path


def weight_changes(tensors, alpha: float, rank: int) -> dict[str, torch.Tensor]:
    """Each layer's change B A alpha / r, in float64."""
    return {name: up.double() @ down.double() * (alpha / rank) for name, (down, up) in modules_of(tensors).items()}


def file_changes(path) -> dict[str, torch.Tensor]:
    """Each layer's change in a LoRA file, at the scale its header gives (lookalike folds alpha / r into B)."""
    tensors, adapter, _ = read_lora(path)
    return weight_changes(tensors, adapter["lora_alpha"], adapter["r"])


def started_denoiser(path, rank: int, alpha: float, target="attention"):
    """The tiny FLUX's transformer with a LoRA of rank and alpha, started from `path` as a run does."""
    start = read_start(path, path, rank, "tiny", trains_text_encoders=False)
    denoiser = load_component(resolve_base("tiny"), "transformer")
    torch.manual_seed(1)
    add_lora(denoiser, rank, alpha, target)
    layers = start_from(denoiser, "transformer", start, path, rank, alpha)
    return denoiser, layers


@pytest.mark.parametrize("rank, alpha", [(4, 2.0), (4, 16.0), (8, 8.0)])
def test_a_run_starts_from_the_files_weight_change_whatever_its_rank_and_alpha(tmp_path, rank, alpha):
    source = made_lora(tmp_path / "source.safetensors", rank=4, alpha=2.0)
    denoiser, layers = started_denoiser(source, rank, alpha, target="attention+mlp")
    expected, got = file_changes(source), weight_changes(lora_state_dict(denoiser), alpha, rank)
    assert layers == len(expected) and expected.keys() < got.keys(), "the run adapts more layers than the file"
    for name, change in got.items():
        if name in expected:
            torch.testing.assert_close(change, expected[name], rtol=1e-6, atol=1e-9)
        else:  # a layer the file leaves alone starts as a fresh LoRA: no change
            assert not change.any(), name


def test_a_file_that_cannot_be_the_runs_start_is_refused_by_name(tmp_path):
    source = made_lora(tmp_path / "wide.safetensors", rank=8, alpha=8.0)
    with pytest.raises(LookalikeError, match=r"train.init_lora: .*wide.safetensors has rank 8, more than this run's "
                                             r"train.rank = 4: set train.rank to 8 or more"):
        started_denoiser(source, 4, 4.0)
    mlp = made_lora(tmp_path / "mlp.safetensors", target="attention+mlp")
    with pytest.raises(LookalikeError, match=r"mlp.safetensors adapts \d+ layers this run does not .*attention\+mlp"):
        started_denoiser(mlp, 4, 4.0, target="attention")
    klein = made_lora(tmp_path / "klein.safetensors", base="tiny-flux2-klein")
    with pytest.raises(LookalikeError, match=r"train.init_lora: .*klein.safetensors is a LoRA of tiny-flux2-klein "
                                             r"\(family flux2\), and this run trains tiny \(family flux1\)"):
        started_denoiser(klein, 4, 4.0, target="attention+mlp")
    unnamed = made_lora(tmp_path / "unnamed.safetensors", base="tiny-flux2-klein", named=False)
    with pytest.raises(LookalikeError, match=r"train.init_lora: .*unnamed.safetensors (adapts|does not fit)"):
        started_denoiser(unnamed, 4, 4.0, target="attention+mlp")
    kohya = export_lora(source, tmp_path / "kohya.safetensors", "kohya")
    with pytest.raises(LookalikeError, match=r"train.init_lora: .*kohya.safetensors: not a LoRA in diffusers' layout"):
        started_denoiser(kohya, 8, 8.0)
    with pytest.raises(LookalikeError, match=r"train.init_lora: LoRA file not found: .*gone.safetensors"):
        started_denoiser(tmp_path / "gone.safetensors", 4, 4.0)


def test_init_lora_is_a_path_from_the_config_file_and_names_its_experiment(tiny_config, tmp_path):
    config = load_config(tiny_config(train={"init_lora": "loras/mine.safetensors"},
                                     sweep={"factors": {"init_lora": ["a.safetensors", "loras/b.safetensors"]}}))
    assert config.train.init_lora == tmp_path / "loras" / "mine.safetensors"
    assert config.sweep.factors["init_lora"] == [tmp_path / "a.safetensors", tmp_path / "loras" / "b.safetensors"]
    assert experiment_name({"init_lora": tmp_path / "loras" / "b.safetensors", "rank": 8}) == "init-b-r8"
    with pytest.raises(LookalikeError, match="init_lora starts from a plain LoRA, and adapter = 'dora'"):
        load_config(tiny_config(train={"init_lora": "x.safetensors", "adapter": "dora"}))


@pytest.mark.slow
def test_a_trained_run_started_from_a_file_keeps_a_copy_and_is_stale_when_the_file_changes(tiny_config, tmp_path):
    source = made_lora(tmp_path / "start.safetensors", rank=4, alpha=2.0)
    # A learning rate so small that the run ends where it started (within float32's rounding).
    config = load_config(tiny_config(train={"init_lora": str(source), "rank": 8, "alpha": 8.0, "max_train_steps": 2,
                                            "learning_rate": 1e-12, "weight_decay": 0.0}))
    lora = train(config, "r")
    run = Workspace(config.workspace).run("r")
    assert run.init_lora.read_bytes() == source.read_bytes()
    expected, got = file_changes(source), file_changes(lora)
    for name, change in expected.items():
        torch.testing.assert_close(got[name], change, rtol=1e-5, atol=1e-7)

    from lookalike.data.dataset import training_images

    images = training_images(config)
    assert stale_reason(run, config, images, config.workspace) is None
    shutil.copyfile(made_lora(tmp_path / "other.safetensors", seed=5), source)
    reason = stale_reason(run, config, images, config.workspace)
    assert reason and "train.init_lora" in reason and "changed since the run started from it" in reason


@pytest.mark.slow
def test_a_killed_run_started_from_a_file_resumes_exactly(tiny_config, tmp_path):
    source = made_lora(tmp_path / "start.safetensors")
    path = tiny_config(train={"init_lora": str(source), "max_train_steps": 40, "checkpoint_every": 10,
                              "learning_rate": 1e-3})
    assert_a_killed_run_resumes_exactly(path, steps=40, killed_after="step-000010")


def test_a_run_checks_the_file_it_starts_from_before_it_encodes_anything(tiny_config, tmp_path):
    wide = made_lora(tmp_path / "wide.safetensors", rank=8, alpha=8.0)
    config = load_config(tiny_config(train={"init_lora": str(wide), "rank": 4}))
    with pytest.raises(LookalikeError, match="wide.safetensors has rank 8, more than this run's train.rank = 4"):
        train(config, "r")
    cache = config.workspace / "cache"
    assert not cache.exists() or not [path for path in cache.rglob("*") if path.is_file()], \
        "no latent or caption was encoded for a run that cannot start"


def test_the_dry_run_checks_the_file_a_run_would_start_from(tiny_config, tmp_path):
    from tests.conftest import run_in_process

    good = made_lora(tmp_path / "good.safetensors")
    checked = run_in_process("train", str(tiny_config(train={"init_lora": str(good)})), "--dry-run")
    assert checked.returncode == 0, checked.stderr
    assert "starts from" in checked.stdout and "good.safetensors" in checked.stdout
    wide = made_lora(tmp_path / "wide.safetensors", rank=8, alpha=8.0)
    refused = run_in_process("train", str(tiny_config("wide.toml", train={"init_lora": str(wide)})), "--dry-run")
    assert refused.returncode != 0
    assert "error: train.init_lora:" in refused.stderr and "has rank 8" in refused.stderr
