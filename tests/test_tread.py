"""TREAD token routing (train.tread_ratio, train/tread.py) on the tiny FLUX.1, and the LoRA's dropout, which acts
only in training mode: both train, resume exactly and leave images drawn with every token."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lookalike.config import load_config
from lookalike.errors import LookalikeError
from lookalike.models.base import load_component, resolve_base
from lookalike.models.families import FAMILIES, KNOWN_BASES
from lookalike.train.trainer import train
from lookalike.train.tread import TokenRoute
from tests.helpers import assert_a_killed_run_resumes_exactly

# The tiny FLUX.1 has two blocks (one double, one single): the route skips the single one.
TREAD = {"tread_ratio": 0.5, "tread_blocks": [1, 1]}


def tiny_flux():
    return load_component(resolve_base("tiny"), "transformer", torch.float32)


def forward(transformer, tokens: int = 16, text: int = 8, seed: int = 0):
    """The tiny transformer's prediction for one random 4x4 latent (16 image tokens) and 8 text tokens."""
    from diffusers import FluxPipeline

    g = torch.Generator().manual_seed(seed)
    config = transformer.config
    return transformer(hidden_states=torch.randn(1, tokens, config.in_channels, generator=g),
                       encoder_hidden_states=torch.randn(1, text, config.joint_attention_dim, generator=g),
                       pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g),
                       timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                       img_ids=FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32),
                       txt_ids=torch.zeros(text, 3), return_dict=False)[0]


def test_routed_tokens_skip_the_span_and_the_others_go_through_it():
    """With the route around the single block: a routed token's output is what it is when that block is gone for
    it, a kept one's what the kept tokens alone make through it; in eval mode nothing is routed."""
    transformer = tiny_flux()
    layout = FAMILIES["flux1"].route_layout(transformer)
    with torch.no_grad():
        whole = forward(transformer.eval())
    route = TokenRoute(layout, 0.5, 1, 1)
    route.next_forward(torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(forward(transformer.eval()), whole), "an image is drawn with every token"
        routed = forward(transformer.train())
    kept = route.kept
    assert len(kept) == 8 and kept.unique().numel() == 8
    skipped = torch.tensor(sorted(set(range(16)) - set(kept.tolist())))
    # The same forward with the single block made an identity for the routed tokens: they come out as they went in.
    single = transformer.single_transformer_blocks[0]
    route.remove()
    seen = {}

    def keep_routed_as_they_came(block, args, kwargs, output):
        text, image = output
        image = image.clone()
        image[:, skipped] = seen["in"][:, skipped]
        return text, image

    def remember_input(block, args, kwargs):
        seen["in"] = kwargs["hidden_states"]

    handles = [single.register_forward_pre_hook(remember_input, with_kwargs=True),
               single.register_forward_hook(keep_routed_as_they_came, with_kwargs=True)]
    with torch.no_grad():
        expected_skipped = forward(transformer)
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(routed[:, skipped], expected_skipped[:, skipped])
    assert not torch.allclose(routed[:, kept], whole[:, kept]), "the kept tokens attend among themselves only"


def family_forward(base: str, seed: int = 0):
    """The family's tiny denoiser (float32) and a function giving its prediction for one fixed random example
    at 64 px with 8 text tokens, called through the family as the trainer calls it."""
    family = FAMILIES[KNOWN_BASES[base].family]
    transformer = load_component(resolve_base(base), family.denoiser, torch.float32)
    config = transformer.config
    g = torch.Generator().manual_seed(seed)
    side = 64 // family.vae_factor
    latents = torch.randn(1, family.latent_channels(config), side, side, generator=g)
    noisy, layout = family.model_input(latents, (0.0, 1.0))
    text = {name: torch.randn(shape, generator=g) for name, shape in family.text_shapes(config, 8).items()}

    def forward():
        with torch.no_grad():
            return family.predict(transformer, config, noisy, torch.tensor([0.5]), [text], 4.0, layout,
                                  torch.device("cpu"), torch.float32)
    return family, transformer, forward


@pytest.mark.parametrize("base", ["tiny", "tiny-sd3", "tiny-qwen-image"])
def test_each_routing_family_passes_routed_tokens_by_and_keeps_all_when_none_are_routed(base):
    """For every family with a route layout: in eval mode nothing is routed; the routed tokens leave the span as
    they entered it; and a route that keeps every token computes the unrouted forward exactly (the text, image and
    rotary rows are where the layout says)."""
    family, transformer, forward = family_forward(base)
    layout = family.route_layout(transformer)
    plain = forward()
    transformer.train()
    plain_training = forward()
    last = layout.blocks[0]
    seen = {}
    everything = TokenRoute(layout, 0.01, 0, 0)  # 16 image tokens: round(0.16) = 0 routed
    everything.next_forward(torch.Generator().manual_seed(0))
    torch.testing.assert_close(forward(), plain_training, rtol=0, atol=0)
    everything.remove()

    route = TokenRoute(layout, 0.5, 0, 0)
    handles = [last.register_forward_pre_hook(lambda b, a, k: seen.update(entered=route.skipped), with_kwargs=True),
               last.register_forward_hook(lambda b, a, k, out: seen.update(left=out[1]), with_kwargs=True)]
    route.next_forward(torch.Generator().manual_seed(0))
    routed = forward()
    skipped = sorted(set(range(seen["left"].shape[1])) - set(route.kept.tolist()))
    assert len(skipped) == seen["left"].shape[1] // 2
    assert torch.equal(seen["left"][:, skipped], seen["entered"][:, skipped]), "routed tokens skip the block"
    assert not torch.allclose(routed, plain_training)
    transformer.eval()
    assert torch.equal(forward(), plain), "an image is drawn with every token"
    for handle in handles:
        handle.remove()
    route.remove()


def test_a_route_outside_the_blocks_is_refused_by_name():
    layout = FAMILIES["flux1"].route_layout(tiny_flux())
    with pytest.raises(LookalikeError, match=r"train.tread_blocks = \[2, -2\]: this base's denoiser has 2 blocks"):
        TokenRoute(layout, 0.5, 2, -2)


@pytest.mark.parametrize("setting, named", [({"compile": True}, "compile = true"), ({"offload": True},
                                                                                    "offload = true")])
def test_tread_is_refused_beside_settings_that_hook_the_blocks(tiny_config, setting, named):
    with pytest.raises(LookalikeError, match=rf"train: tread_ratio cannot be combined with {named}"):
        load_config(tiny_config(train={"tread_ratio": 0.5, **setting}))


@pytest.mark.slow
def test_a_routed_run_trains_checkpointed_or_not_and_resumes_exactly(tiny_config):
    settings = {"max_train_steps": 4, "learning_rate": 1e-3, "checkpoint_every": 0}
    plain = load_file(train(load_config(tiny_config(train=settings)), "plain"))
    routed = load_file(train(load_config(tiny_config("routed.toml", train={**settings, **TREAD})), "routed"))
    checkpointed = load_file(train(load_config(tiny_config("checkpointed.toml", train={
        **settings, **TREAD, "gradient_checkpointing": True})), "checkpointed"))
    assert plain.keys() == routed.keys()
    assert any(not torch.equal(plain[k], routed[k]) for k in plain), "routing changed nothing"
    for key in routed:  # recomputed blocks route the same tokens as the forward did
        torch.testing.assert_close(checkpointed[key], routed[key], rtol=1e-5, atol=1e-6)
    path = tiny_config("resume.toml", train={"max_train_steps": 30, "checkpoint_every": 10, "learning_rate": 1e-3,
                                             **TREAD})
    assert_a_killed_run_resumes_exactly(path, steps=30, killed_after="step-000010")


@pytest.mark.slow
def test_lora_dropout_acts_while_training_and_resumes_exactly(tiny_config):
    """Dropout works in training mode only (a loaded model is in eval mode until the trainer says otherwise), and
    draws from torch's generator, which the trainer seeds from the run's at each step."""
    settings = {"max_train_steps": 3, "learning_rate": 1e-3, "checkpoint_every": 0}
    without = load_file(train(load_config(tiny_config(train=settings)), "without"))
    dropped = load_file(train(load_config(tiny_config("dropout.toml", train={**settings, "lora_dropout": 0.5})),
                              "dropout"))
    assert any(not torch.equal(without[k], dropped[k]) for k in without), "dropout changed nothing"
    path = tiny_config("resume.toml", train={"max_train_steps": 30, "checkpoint_every": 10, "learning_rate": 1e-3,
                                             "lora_dropout": 0.3})
    assert_a_killed_run_resumes_exactly(path, steps=30, killed_after="step-000010")
