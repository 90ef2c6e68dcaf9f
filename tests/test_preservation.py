"""train.output_preservation (differential output preservation, ai-toolkit's DOP): captions with the trigger word
made the class word; the added loss against the base itself (the LoRA switched off, then on again); a run with it
keeps the class's output nearer the base than a run without; it resumes exactly; misuse is refused by name."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file

from lookalike.config import load_config
from lookalike.errors import LookalikeError
from lookalike.models.base import load_component, resolve_base
from lookalike.models.families import folder_family
from lookalike.models.families.interface import TextEncoding
from lookalike.models.lora import add_lora
from lookalike.train.cache import EmbeddingCache
from lookalike.train.preservation import preservation_loss, preserved_caption
from lookalike.train.trainer import train
from tests.helpers import assert_a_killed_run_resumes_exactly, denoiser_with_a_lora

CPU = torch.device("cpu")


def test_trigger_words_become_class_words():
    alice = SimpleNamespace(token="sks", class_word="woman")
    bob = SimpleNamespace(token="ohwx", class_word="man")
    assert preserved_caption("a photo of sks", [alice]) == "a photo of woman"
    assert preserved_caption("sks woman, smiling", [alice]) == "woman, smiling", "not 'woman woman'"
    assert preserved_caption("sks and ohwx man at the beach", [alice, bob]) == "woman and man at the beach"
    assert preserved_caption("", [alice]) == ""


def inputs(folder, tmp_path, captions):
    """Noisy latents, noise levels and cached caption embeddings for a tiny FLUX.1 batch."""
    family = folder_family(folder)
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(len(captions), 16, 8, 8, generator=generator)
    x0, layout = family.model_input(latents, family.latent_normalisation(folder))
    noisy = 0.6 * x0 + 0.4 * torch.randn(x0.shape, generator=generator)
    texts = EmbeddingCache(tmp_path / "cache", folder, CPU, torch.float32).texts(captions, TextEncoding(32))
    return family, noisy, torch.tensor([0.4] * len(captions)), [texts[c] for c in captions], layout


def test_the_added_loss_compares_the_lora_with_the_base_itself_and_leaves_the_lora_on(tmp_path):
    folder = resolve_base("tiny")
    family, noisy, levels, texts, layout = inputs(folder, tmp_path, ["a photo of person", "person, smiling"])
    lora = denoiser_with_a_lora(folder, "transformer")
    with_lora = family.predict(lora, lora.config, noisy, levels, texts, 1.0, layout, CPU, torch.float32)
    ours = preservation_loss(family, lora, lora, noisy, levels, texts, with_lora, 1.0, layout, CPU, torch.float32)
    base = load_component(folder, "transformer")  # a model that never had a LoRA
    with torch.no_grad():
        expected = torch.nn.functional.mse_loss(
            with_lora, family.predict(base, base.config, noisy, levels, texts, 1.0, layout, CPU, torch.float32))
    assert ours.item() == pytest.approx(expected.item(), rel=1e-6) and ours.item() > 0
    ours.backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in lora.parameters() if p.requires_grad), \
        "the gradient reaches the LoRA through its own predictions"
    again = family.predict(lora, lora.config, noisy, levels, texts, 1.0, layout, CPU, torch.float32)
    assert torch.equal(again, with_lora), "the LoRA is on again afterwards"


def class_drift(lora_file, folder, tmp_path) -> float:
    """How far a trained LoRA moves the base's prediction for the class's caption."""
    family, noisy, levels, texts, layout = inputs(folder, tmp_path, ["a photo of person"])
    base = load_component(folder, "transformer")
    with torch.no_grad():
        before = family.predict(base, base.config, noisy, levels, texts, 1.0, layout, CPU, torch.float32)
        tensors = load_file(str(lora_file))
        add_lora(base, 4, 4.0, "attention")
        set_peft_model_state_dict(base, {k.removeprefix("transformer."): v for k, v in tensors.items()})
        after = family.predict(base, base.config, noisy, levels, texts, 1.0, layout, CPU, torch.float32)
    return (after - before).pow(2).mean().item()


@pytest.mark.slow
def test_a_run_with_it_keeps_the_class_nearer_the_base_and_resumes_exactly(tiny_config, tmp_path):
    settings = {"max_train_steps": 30, "learning_rate": 1e-2, "rank": 4, "sample_every": 0}
    plain = load_config(tiny_config(train=settings))
    preserving = plain.with_train({"output_preservation": 1.0}, "test")
    folder = resolve_base("tiny")
    without, kept = (class_drift(train(config, name), folder, tmp_path)
                     for config, name in ((plain, "without"), (preserving, "with")))
    print(f"class drift: without output_preservation {without:.3e}, with {kept:.3e}")
    assert kept < without / 2

    path = tiny_config("resume.toml", train={"max_train_steps": 40, "checkpoint_every": 10, "learning_rate": 1e-3,
                                             "batch_size": 2, "caption_dropout": 0.3, "output_preservation": 0.5})
    assert_a_killed_run_resumes_exactly(path, steps=40, killed_after="step-000010")


def test_it_doubles_the_estimated_activations(tiny_config):
    """Its preserved rows join the training forward (the base's forward keeps nothing for the backward pass)."""
    from lookalike.train.memory import estimate

    plain = load_config(tiny_config())
    preserving = estimate(plain.with_train({"output_preservation": 1.0}, "test"), "no")
    assert preserving.activations == pytest.approx(2 * estimate(plain, "no").activations)


def test_a_sweep_compares_it_on_and_off_under_short_names(tiny_config):
    from lookalike.sweep.plan import experiments

    config = load_config(tiny_config(**{"sweep": {"design": "grid"},
                                        "sweep.factors": {"output_preservation": [0, 1.0]}}))
    assert [(p.name, p.overrides) for p in experiments(config)] == [
        ("dop0", {"output_preservation": 0}), ("dop1", {"output_preservation": 1.0})]


def test_it_is_refused_with_text_encoder_training(tiny_config):
    with pytest.raises(LookalikeError, match="output_preservation compares the LoRA with the base on the class's "
                                             "captions, which train_text_encoder = true encodes"):
        load_config(tiny_config(model={"base": "tiny-sd15"}, train={"output_preservation": 1.0,
                                                                    "train_text_encoder": True}))
