"""The tiny FLUX built offline, and LoRA target modules."""

import pytest
import torch

from lookalike.models.families.flux1 import TinySpec, build_tiny_pipeline, ensure_tiny_model
from lookalike.models.lora import add_lora


def test_tiny_model_is_deterministic_and_seed_dependent():
    a = build_tiny_pipeline(TinySpec(seed=0)).transformer.state_dict()
    b = build_tiny_pipeline(TinySpec(seed=0)).transformer.state_dict()
    c = build_tiny_pipeline(TinySpec(seed=1)).transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_tiny_model_is_saved_once_and_loads_with_flux_classes(tmp_path):
    from diffusers import FluxPipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    folder = ensure_tiny_model(cache_dir=tmp_path)
    stamp = (folder / "model_index.json").stat().st_mtime_ns
    assert ensure_tiny_model(cache_dir=tmp_path) == folder
    assert (folder / "model_index.json").stat().st_mtime_ns == stamp, "a cached model must be reused, not rebuilt"
    assert [p.name for p in tmp_path.iterdir()] == [folder.name], "no temporary folders are left behind"

    pipe = FluxPipeline.from_pretrained(folder)
    assert isinstance(pipe.tokenizer, CLIPTokenizer) and isinstance(pipe.tokenizer_2, T5TokenizerFast)
    built = build_tiny_pipeline()
    for name in ("tokenizer", "tokenizer_2"):
        text = "a photo of sks, smiling!"
        assert getattr(pipe, name)(text).input_ids == getattr(built, name)(text).input_ids
    assert pipe.transformer.config.guidance_embeds, "guidance-distilled, like FLUX.1-dev"


def test_target_modules_attention_only_or_with_mlp():
    def adapted(target):
        transformer = build_tiny_pipeline().transformer
        add_lora(transformer, rank=2, alpha=2, target=target)
        return {name.removesuffix(".lora_A") for name, _ in transformer.named_modules() if name.endswith(".lora_A")}

    attention, with_mlp = adapted("attention"), adapted("attention+mlp")
    assert "transformer_blocks.0.attn.to_q" in attention and "single_transformer_blocks.0.attn.to_k" in attention
    assert not any("ff" in name or "proj_mlp" in name for name in attention)
    assert {"transformer_blocks.0.ff.net.2", "single_transformer_blocks.0.proj_mlp",
            "single_transformer_blocks.0.proj_out"} <= with_mlp
    assert "proj_out" not in with_mlp, "the transformer's final projection is not adapted"
    assert attention < with_mlp


def local_copy_of_the_tiny_model(folder):
    import shutil

    local = folder / "my-flux"
    shutil.copytree(ensure_tiny_model(), local)
    return local


@pytest.mark.slow
def test_a_local_base_whose_clip_tokenizer_has_no_length_trains_with_77_tokens(tiny_config, tmp_path):
    """transformers reports an unset model_max_length as a huge integer, which overflowed while tokenizing."""
    import json

    from lookalike.config import load_config
    from lookalike.models.base import load_pipeline
    from lookalike.models.families.flux1 import CLIP_TOKENS
    from lookalike.train.trainer import train

    local = local_copy_of_the_tiny_model(tmp_path)
    settings = local / "tokenizer" / "tokenizer_config.json"
    tokenizer = json.loads(settings.read_text())
    del tokenizer["model_max_length"]
    settings.write_text(json.dumps(tokenizer))
    assert load_pipeline(local).tokenizer_max_length == CLIP_TOKENS
    config = load_config(tiny_config(model={"base": str(local)}, train={"max_train_steps": 2},
                                     data={"crop": "center"}))
    assert train(config, "r").is_file()


@pytest.mark.parametrize("component,damage", [("transformer", "config.json"),
                                              ("vae", "diffusion_pytorch_model.safetensors")])
def test_a_broken_local_base_is_one_error_naming_the_folder_and_the_component(tmp_path, component, damage):
    from lookalike.errors import LookalikeError
    from lookalike.models.base import load_component

    local = local_copy_of_the_tiny_model(tmp_path)
    (local / component / damage).write_text("{ not what it should be")
    with pytest.raises(LookalikeError, match=f"cannot load the {component} of the base model in {local}"):
        load_component(local, component)
