"""train.layer_filter: of the layers target_modules adapts, only those whose names the pattern matches, counted on
FLUX.1-dev built on the meta device, trained into a file that holds those layers alone, and refused by name when it
matches none or is no pattern."""

from __future__ import annotations

import re

import pytest
from safetensors.torch import load_file

from lookalike.config import load_config
from lookalike.errors import LookalikeError
from lookalike.models.base import load_component, resolve_base
from lookalike.models.lora import add_lora
from lookalike.train.memory import estimate
from lookalike.train.trainer import train

TWO_SINGLE_BLOCKS = r"single_transformer_blocks\.(7|20)\."


def adapted_layers(model) -> set[str]:
    return {name.removesuffix(".lora_A") for name, _ in model.named_modules() if name.endswith(".lora_A")}


def test_a_filter_keeps_the_presets_layers_whose_names_it_matches_on_flux_dev(tiny_config):
    """Two single blocks' attention on FLUX.1-dev is their q, k and v: 6 of the preset's 266 layers."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from lookalike.models.families.flux1 import FLUX_TRANSFORMER

    with init_empty_weights():
        whole, filtered = (FluxTransformer2DModel.from_config(FLUX_TRANSFORMER) for _ in range(2))
        add_lora(whole, 4, 4.0, "attention")
        add_lora(filtered, 4, 4.0, "attention", layer_filter=TWO_SINGLE_BLOCKS)
    expected = {name for name in adapted_layers(whole) if re.search(TWO_SINGLE_BLOCKS, name)}
    assert len(expected) == 6 and adapted_layers(filtered) == expected

    config = load_config(tiny_config(model={"base": "flux-dev"}, train={"layer_filter": TWO_SINGLE_BLOCKS}))
    assert estimate(config, "bf16").counts.lora == 6 * 2 * 4 * 3072, "rank 4 of 3072 -> 3072, six times"


def test_a_filter_that_matches_no_adapted_layer_or_is_no_pattern_is_refused_by_name(tiny_config):
    transformer = load_component(resolve_base("tiny"), "transformer")
    with pytest.raises(LookalikeError, match=r"train.layer_filter = 'ff\\\\.net' matches none of the layers train."
                                             "target_modules = 'attention' adapts on this base"):
        add_lora(transformer, 4, 4.0, "attention", layer_filter=r"ff\.net")
    with pytest.raises(LookalikeError, match=r"train.layer_filter.*not a regular expression"):
        load_config(tiny_config(train={"layer_filter": "blocks.(7"}))


@pytest.mark.slow
def test_a_filtered_run_trains_and_writes_those_layers_alone(tiny_config):
    config = load_config(tiny_config(train={"max_train_steps": 2, "learning_rate": 1e-2, "sample_every": 0,
                                            "layer_filter": r"^transformer_blocks\.0\."}))
    tensors = load_file(train(config, "r"))
    layers = {key.rsplit(".lora_", 1)[0] for key in tensors}
    assert layers and all(layer.startswith("transformer.transformer_blocks.0.attn.") for layer in layers)
    assert any(tensor.abs().sum() > 0 for key, tensor in tensors.items() if ".lora_B." in key), "it trained"


def test_a_sweep_over_layer_filters_names_its_runs_by_the_patterns_words(tiny_config):
    from lookalike.sweep.plan import experiments
    from lookalike.workspace import run_name_problem

    levels = [r"^transformer_blocks\.", TWO_SINGLE_BLOCKS]
    config = load_config(tiny_config(sweep={"factors": {"layer_filter": levels}}))
    names = [e.name for e in experiments(config)]
    assert names == ["layers-transformer_blocks", "layers-single_transformer_blocks_7_20"]
    assert not any(run_name_problem(name) for name in names)
