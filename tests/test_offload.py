"""Offloading the frozen base block by block (train.offload): the same LoRA as training with the whole base on the
device, with one block's weights there at a time, through the forward pass, the backward pass's recomputation and
the samples drawn while training."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lookalike.config import load_config
from lookalike.errors import LookalikeError
from lookalike.models.families.interface import TextEncoding
from lookalike.train import offload as offload_module
from lookalike.train.memory import GB, estimate
from lookalike.train.trainer import train


@pytest.fixture
def offloads(monkeypatch):
    """Every BlockOffload a run makes."""
    made = []

    class Recorded(offload_module.BlockOffload):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr("lookalike.train.trainer.BlockOffload", Recorded)
    return made


@pytest.mark.slow
@pytest.mark.parametrize("base, adapter", [("tiny", "lora"), ("tiny-sd15", "lora"), ("tiny-sd3", "lora"),
                                           ("tiny-krea2", "lora"), ("tiny-qwen-image21", "lora"), ("tiny", "dora")])
def test_an_offloaded_base_trains_the_same_lora_with_one_block_on_the_device(tiny_config, offloads, base, adapter):
    """DoRA too: it reads its base weight's norm in the block's forward, where the weight has been brought."""
    steps = 3
    settings = {"max_train_steps": steps, "gradient_checkpointing": True, "learning_rate": 1e-3, "sample_every": 3,
                "sample_steps": 2, "score_samples": False, "adapter": adapter}
    whole = load_config(tiny_config(model={"base": base}, train=settings))
    offloaded = whole.with_train({"offload": True}, "test")
    expected, got = load_file(train(whole, "whole")), load_file(train(offloaded, "offloaded"))
    assert expected.keys() == got.keys() and expected
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    samples = sorted(p.name for p in (whole.workspace / "runs" / "offloaded" / "samples").glob("*.png"))
    assert samples == ["step-000003_p0.png"], "samples are drawn from offloaded blocks too"

    [offload] = offloads
    blocks = len(offload.stored)
    assert blocks >= 2 and offload.most_resident == 1
    # Each step: every block's forward, and its recomputation in the backward pass; then the sample's steps.
    assert offload.runs >= 2 * blocks * steps and offload.onloads >= steps * blocks
    empty = [sum(p.numel() == 0 for p, _ in stored) == len(stored) for stored in offload.stored.values()]
    assert empty.count(False) == 1, "all weights but the last block's are back in CPU memory"

    # What the estimate keeps in CPU memory is what the offload took there; on the device, one block's.
    plain, estimated = estimate(whole, "no"), estimate(offloaded, "no")
    assert estimated.counts.in_blocks == offload.offloaded_parameters
    largest = max(sum(copy.numel() for _, copy in stored) for stored in offload.stored.values())
    assert estimated.counts.largest_block == largest
    assert estimated.offloaded * GB == pytest.approx(4 * offload.offloaded_parameters)
    assert (plain.weights - estimated.weights) * GB == pytest.approx(4 * (offload.offloaded_parameters - largest))


def test_the_dry_run_offers_offloading_where_the_base_does_not_fit(tiny_config):
    from lookalike.train.memory import settings_that_fit

    config = load_config(tiny_config(model={"base": "flux-dev"}))
    base = estimate(config, "bf16")
    fitting = dict(settings_that_fit(config, "bf16", base, gpu_memory=12))
    assert "train.offload=true" in fitting and fitting["train.offload=true"] < 11
    assert not any("offload" in label and "quantization" in label for label in fitting), "never both"


def test_the_dry_run_of_an_offloaded_run_says_to_offload_drawing_too(tiny_config):
    from tests.conftest import run_in_process

    result = run_in_process("train", str(tiny_config(train={"offload": True})), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "in CPU memory, one block at a time here" in result.stdout
    assert "set [generate] offload = true as well" in result.stdout
    quiet = run_in_process("train", str(tiny_config("both.toml", train={"offload": True},
                                                    generate={"offload": True})), "--dry-run")
    assert quiet.returncode == 0 and "[generate] offload" not in quiet.stdout


def test_offloading_takes_plain_weights(tiny_config):
    config = load_config(tiny_config())
    with pytest.raises(LookalikeError, match="offload = true cannot be combined with base_quantization = 'int8'"):
        config.with_train({"offload": True, "base_quantization": "int8"}, "test")
    with pytest.raises(LookalikeError, match="offload = true cannot be combined with compile = true"):
        config.with_train({"offload": True, "compile": True}, "test")


def test_captions_are_encoded_the_same_by_offloaded_text_encoders(tmp_path, monkeypatch):
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    import lookalike.train.cache as cache_module
    from lookalike.models.base import resolve_base
    from lookalike.train.cache import EmbeddingCache

    offloaded_encoders = []
    offload = cache_module.offload_pipeline
    monkeypatch.setattr(cache_module, "offload_pipeline",
                        lambda pipe, device: (offload(pipe, device), offloaded_encoders.append(pipe)))

    folder = resolve_base("tiny")
    captions = ["a photo of sks", "sks man, smiling"]
    whole, offloaded = (EmbeddingCache(tmp_path / name, folder, torch.device("cpu"), torch.float32, offload=offload)
                        .texts(captions, TextEncoding(32)) for name, offload in (("whole", False), ("offloaded", True)))
    for caption in captions:
        assert whole[caption].keys() == offloaded[caption].keys()
        for name in whole[caption]:
            assert torch.equal(offloaded[caption][name], whole[caption][name]), (caption, name)
    [encoder] = offloaded_encoders
    assert _is_group_offload_enabled(encoder.text_encoder_2), "T5 ran block by block"



def test_text_encoders_bigger_than_the_gpus_free_memory_run_block_by_block(tmp_path, monkeypatch):
    """FLUX.2 [dev]'s text encoder (48 GB in bf16) on a GPU that trains its quantised base: counted from its file's
    headers, it is found not to fit, and the captions are encoded block by block, to the same embeddings."""
    import lookalike.train.cache as cache_module
    from lookalike.models.base import load_component, resolve_base, weight_bytes
    from lookalike.train.cache import EmbeddingCache

    folder = resolve_base("tiny-flux2-dev")
    parameters = sum(p.numel() for p in load_component(folder, "text_encoder").parameters())
    assert weight_bytes(folder, "text_encoder", torch.float32) == 4 * parameters
    needed = weight_bytes(folder, "text_encoder", torch.bfloat16)
    assert needed == 2 * parameters

    free_memory = {}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_memory["bytes"], 80 * 2**30))
    on_gpu = EmbeddingCache(tmp_path / "gpu", folder, torch.device("cuda"), torch.bfloat16)
    for free, fits in ((needed, False), (int(needed / 0.9) + 1, True), (2**40, True)):
        free_memory["bytes"] = free
        assert on_gpu.text_encoders_fit() == fits, free
    assert EmbeddingCache(tmp_path / "cpu", folder, torch.device("cpu"), torch.bfloat16).text_encoders_fit()

    offloaded_encoders = []
    offload = cache_module.offload_pipeline
    monkeypatch.setattr(cache_module, "offload_pipeline",
                        lambda pipe, device: (offload(pipe, device), offloaded_encoders.append(pipe)))
    captions = ["a photo of sks", "sks man, smiling"]
    text = TextEncoding(32)
    whole = EmbeddingCache(tmp_path / "whole", folder, torch.device("cpu"), torch.float32).texts(captions, text)
    assert not offloaded_encoders
    monkeypatch.setattr(EmbeddingCache, "text_encoders_fit", lambda self: False)
    by_blocks = EmbeddingCache(tmp_path / "by-blocks", folder, torch.device("cpu"), torch.float32).texts(captions, text)
    assert len(offloaded_encoders) == 1
    for caption in captions:
        assert torch.equal(by_blocks[caption]["prompt_embeds"], whole[caption]["prompt_embeds"]), caption
