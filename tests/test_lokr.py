"""LoKr adapters (train.adapter = 'lokr'): the file changes each weight as the trained adapter did when diffusers'
loader and ComfyUI's LoKr code read it (its scale folded into w1), runs draw what the stock pipelines draw with
it, exports land where ComfyUI and kohya's LyCORIS look, and the settings made for a LoRA's two matrices are
refused."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lookalike.config import load_config
from lookalike.errors import LookalikeError
from lookalike.models.base import load_component, resolve_base
from lookalike.models.export import export_lora
from lookalike.models.families import base_family
from lookalike.models.lora import add_lora, lora_state_dict, read_lora, save_lora
from lookalike.models.merge import merge_loras
from lookalike.models.resize import resize_lora
from lookalike.train.memory import changes_held, count_parameters, estimate
from tests import comfyui as comfyui_reference
from tests.helpers import (
    MEASURING,
    PEAK_OF_A_STEP,
    assert_a_killed_run_resumes_exactly,
    stock_arguments,
    stock_image,
    train_sampled_run,
)


def comfyui_lokr_change(tensors: dict, layer: str, shape) -> torch.Tensor:
    """The weight change ComfyUI's LoKr adapter (comfy/weight_adapter/lokr.py, calculate_weight) makes of a file's
    layer at strength 1, transcribed: kron(w1, w2), each factor whole or the product of its halves, times the layer's
    alpha tensor over the split factor's rank, or 1 where the file has no alpha tensor or no split factor."""
    def factor(name):
        if f"{layer}.lokr_{name}" in tensors:
            return tensors[f"{layer}.lokr_{name}"].float(), None
        a, b = tensors[f"{layer}.lokr_{name}_a"].float(), tensors[f"{layer}.lokr_{name}_b"].float()
        return a @ b, b.shape[0]

    (w1, dim1), (w2, dim2) = factor("w1"), factor("w2")
    dim = dim2 if dim2 is not None else dim1
    alpha = tensors.get(f"{layer}.alpha")
    scale = float(alpha) / dim if alpha is not None and dim is not None else 1.0
    return scale * torch.kron(w1, w2).reshape(shape)


def trained_lokr(rank: int, alpha: float, factor: int):
    """Tiny FLUX.1's transformer with a LoKr whose every factor is random (a trained one's are), and each adapted
    layer's weight change as peft computes it in training."""
    transformer = load_component(resolve_base("tiny"), "transformer")
    add_lora(transformer, rank, alpha, "attention+mlp", adapter="lokr", lokr_factor=factor)
    torch.manual_seed(0)
    for name, parameter in transformer.named_parameters():
        if ".lokr_" in name:
            parameter.data.normal_()
    changes = {name: module.get_delta_weight("default").detach() for name, module in transformer.named_modules()
               if hasattr(module, "lokr_w1")}
    return transformer, changes


@pytest.mark.parametrize("rank, factor", [(4, 4), (64, 4)])  # w2 split in two at rank 4; whole (full) at rank 64
def test_a_lokr_file_changes_each_weight_as_training_did_where_diffusers_and_comfyui_read_it(tmp_path, rank, factor):
    """alpha 2 at rank 4 scales the change by 1/2 in training: the file carries that scale in w1 and says alpha =
    rank, so that diffusers (its metadata) and ComfyUI (no alpha tensor: scale 1) both apply it."""
    transformer, changes = trained_lokr(rank, 2.0, factor)
    path = tmp_path / "lokr.safetensors"
    save_lora(path, lora_state_dict(transformer), transformer.peft_config["default"], {"base_model": "tiny"})
    tensors = load_file(path)
    assert not any(key.endswith(".alpha") for key in tensors)
    assert any(key.endswith(".lokr_w2" if rank == 64 else ".lokr_w2_a") for key in tensors)

    for name, change in changes.items():
        shape = transformer.get_submodule(name).get_base_layer().weight.shape
        torch.testing.assert_close(comfyui_lokr_change(tensors, f"transformer.{name}", shape), change)

    fresh = load_component(resolve_base("tiny"), "transformer")
    fresh.load_lora_adapter(str(tmp_path), weight_name=path.name, prefix="transformer", adapter_name="file")
    for name, change in changes.items():
        torch.testing.assert_close(fresh.get_submodule(name).get_delta_weight("file"), change)

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"], metadata["ss_network_module"]) == \
        (str(rank), str(rank), "lycoris.kohya")
    assert metadata["ss_network_args"] == f'{{"algo": "lokr", "factor": "{factor}"}}'


def test_merge_resize_and_init_lora_refuse_a_lokr_by_name(tmp_path, tiny_config):
    transformer, _ = trained_lokr(4, 4.0, 4)
    path = tmp_path / "lokr.safetensors"
    save_lora(path, lora_state_dict(transformer), transformer.peft_config["default"], {"base_model": "tiny"})
    refusal = "a LoKr adapter, whose weight change is a Kronecker product, not a low-rank one"
    with pytest.raises(LookalikeError, match=refusal):
        merge_loras(path, path, tmp_path / "merged.safetensors")
    with pytest.raises(LookalikeError, match=refusal):
        resize_lora(path, tmp_path / "resized.safetensors", 2)
    with pytest.raises(LookalikeError, match=refusal):
        read_lora(path)
    tensors, config, _ = read_lora(path, lokr=True)
    assert (config["r"], config["alpha"], config["peft_type"]) == (4, 4, "LOKR")


def test_a_lokr_file_with_a_factor_missing_is_refused_by_module(tmp_path):
    transformer, _ = trained_lokr(4, 4.0, 4)
    tensors = lora_state_dict(transformer)
    broken = next(key for key in tensors if key.endswith(".lokr_w2_b"))
    del tensors[broken]
    path = tmp_path / "broken.safetensors"
    save_lora(path, tensors, transformer.peft_config["default"], {"base_model": "tiny"})
    module = broken.removesuffix(".lokr_w2_b")
    with pytest.raises(LookalikeError, match=f"module {module} needs its lokr_w2 once: whole, or as lokr_w2_a and"):
        export_lora(path, tmp_path / "out.safetensors", "diffusers")


@pytest.mark.parametrize("setting, value", [("init_lora", "x.safetensors"), ("loraplus_lr_ratio", 16.0),
                                            ("lora_dropout", 0.1), ("train_text_encoder", True),
                                            ("base_quantization", "nf4"), ("compile", True)])
def test_settings_made_for_a_loras_two_matrices_are_refused_with_lokr(tiny_config, setting, value):
    with pytest.raises(LookalikeError, match=f"adapter = 'lokr' cannot be combined with {setting}"):
        load_config(tiny_config(train={"adapter": "lokr", setting: value}))


def test_a_lokr_factor_must_be_a_side_or_minus_one_and_goes_unused_by_other_adapters(tiny_config):
    with pytest.raises(LookalikeError, match="lokr_factor must be a positive side, or -1"):
        load_config(tiny_config(train={"adapter": "lokr", "lokr_factor": 0}))
    # A sweep over adapters shares one [train]: a LoRA run ignores the LoKr's factor.
    assert load_config(tiny_config(train={"adapter": "lora", "lokr_factor": 16})).train.adapter == "lora"


def test_the_estimate_counts_the_weight_changes_a_lokr_builds(tiny_config):
    """Each adapted layer's change is as large as its weight and is held for the backward pass: every block's
    without checkpointing, one block's at a time with it. Checked on FLUX.1-dev, built on the meta device."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from lookalike.models.families.flux1 import FLUX_TRANSFORMER

    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(FLUX_TRANSFORMER)
        add_lora(model, 4, 4.0, "attention")  # the same layers, adapted by a LoRA: their weights, counted apart
    adapted = {name.removesuffix(".lora_A"): model.get_submodule(name.removesuffix(".lora_A")).base_layer.weight
               for name, _ in model.named_modules() if name.endswith(".lora_A")}
    total = sum(weight.numel() for weight in adapted.values())
    double = sum(w.numel() for name, w in adapted.items() if name.startswith("transformer_blocks.0."))

    largest = max(weight.numel() for weight in adapted.values())  # its gradient is made on top of the rest

    config = load_config(tiny_config(model={"base": "flux-dev"}, train={"adapter": "lokr", "lokr_factor": 16}))
    plain = estimate(config, "bf16")
    assert plain.changes == pytest.approx((total + largest) * 2 / 2**30) and plain.changes > 4, "4.7 GB on FLUX.1-dev"
    checkpointed = estimate(config.with_train({"gradient_checkpointing": True}, "test"), "bf16")
    assert checkpointed.changes == pytest.approx((double + largest) * 2 / 2**30), "a double block is the largest"
    assert any(line.startswith("LoKr weight changes") for line in plain.lines())
    assert any(line.startswith("LoKr  ") and "M parameters" in line for line in plain.lines())
    lora = estimate(load_config(tiny_config(model={"base": "flux-dev"})), "bf16")
    assert lora.changes == 0 and not any(line.startswith("LoKr") for line in lora.lines())
    assert any(line.startswith("LoRA  ") for line in lora.lines())


# Each base's stock pipeline, with the LoKr loaded as a user of diffusers would: load_lora_weights where the
# pipeline's loader takes a LoKr (Z-Image's, FLUX.2's), its denoiser's load_lora_adapter elsewhere.
PIPELINE_TAKES_LOKR = {"tiny": False, "tiny-z-image": True, "tiny-flux2-klein": True, "tiny-sd15": False,
                       "tiny-sdxl": False, "tiny-qwen-image": False, "tiny-sd3": False, "tiny-krea2": False}


@pytest.mark.slow
@pytest.mark.parametrize("base", PIPELINE_TAKES_LOKR)
def test_a_lokr_run_draws_what_the_stock_pipeline_draws_with_its_file(tiny_config, tmp_path, base):
    lora, ours = train_sampled_run(tiny_config, base, adapter="lokr", rank=4, alpha=2.0, lokr_factor=4,
                                   learning_rate=5e-2)
    tensors = load_file(lora)
    assert tensors and all(".lokr_" in key for key in tensors)
    family = base_family(base)
    stock = stock_arguments(family)
    with_file = stock_image(base, lora, through_denoiser=not PIPELINE_TAKES_LOKR[base], **stock)
    assert np.abs(ours - with_file).max() <= 1, "within 1/255 of the stock pipeline with the LoKr"
    assert np.abs(ours - stock_image(base, **stock)).max() > 1, "the LoKr changed the image"

    family = base_family(base)
    diffusers = load_file(export_lora(lora, tmp_path / "diffusers.safetensors", "diffusers"))
    assert diffusers.keys() == tensors.keys()
    comfyui = load_file(export_lora(lora, tmp_path / "comfyui.safetensors", "comfyui"))
    if family.denoiser == "transformer":  # ComfyUI reads diffusers' names; kohya's layout fuses FLUX.1's layers
        assert comfyui.keys() == tensors.keys()
        taken = comfyui_reference.lora_names(family.name, load_component(resolve_base(base), "transformer"))
        layers = {key.rsplit(".lokr_", 1)[0] for key in comfyui}
        assert layers <= taken, layers - taken
        with pytest.raises(LookalikeError, match="--format kohya: .* is a LoKr, and kohya's layout exists for LoKrs "
                                                 "of SDXL and SD 1.x only"):
            export_lora(lora, tmp_path / "kohya.safetensors", "kohya")
        return
    # The UNets: kohya's names (the ones their LoRA exports use, which tests/test_stable_diffusion.py reads back
    # through diffusers' converter), each changing its weight as the file in diffusers' layout does; for SD 1.x those
    # are ComfyUI's lora_unet_ and diffusers' name with underscores.
    kohya = load_file(export_lora(lora, tmp_path / "kohya.safetensors", "kohya"))
    assert kohya.keys() == comfyui.keys()
    unet = load_component(resolve_base(base), "unet")
    modules = {key.rsplit(".lokr_", 1)[0].removeprefix("unet.") for key in tensors}
    renamed = {f"lora_unet_{kohya_name.replace('.', '_')}": name
               for name, kohya_name in family.kohya_layer_names(modules).items()}
    assert {key.rsplit(".lokr_", 1)[0] for key in kohya} == renamed.keys()
    if family.name == "sd1":
        assert renamed == {f"lora_unet_{name.replace('.', '_')}": name for name in modules}
    for layer, name in renamed.items():
        shape = unet.get_submodule(name).weight.shape
        torch.testing.assert_close(comfyui_lokr_change(kohya, layer, shape),
                                   comfyui_lokr_change(tensors, f"unet.{name}", shape))


@pytest.mark.slow
def test_a_killed_lokr_run_resumes_to_the_weights_of_an_uninterrupted_one(tiny_config):
    path = tiny_config(train={"max_train_steps": 40, "checkpoint_every": 10, "checkpoints_keep": 2,
                              "learning_rate": 1e-3, "batch_size": 2, "adapter": "lokr", "lokr_factor": 4})
    assert_a_killed_run_resumes_exactly(path, steps=40, killed_after="step-000010")


# A FLUX.1 transformer whose layers outweigh its activations (hidden 1024, 4 + 4 blocks, 16 image tokens), so that
# the weight changes a LoKr holds are most of a step's peak.
WIDE_FLUX = dict(patch_size=1, in_channels=16, num_layers=4, num_single_layers=4, attention_head_dim=128,
                 num_attention_heads=8, joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=[16, 56, 56])
MEASURE_ADAPTERS = PEAK_OF_A_STEP + """
import json, sys, torch
from diffusers import FluxTransformer2DModel
from lookalike.models.lora import add_lora
adapter, checkpointing = sys.argv[1], sys.argv[2] == "1"
torch.manual_seed(0)
transformer = FluxTransformer2DModel(**json.loads(sys.argv[3]))
add_lora(transformer, 4, 4.0, "attention", adapter=adapter, lokr_factor=16)
if checkpointing:
    transformer.enable_gradient_checkpointing()
optimizer = torch.optim.AdamW([p for p in transformer.parameters() if p.requires_grad], lr=1e-4)
def step():
    prediction = transformer(hidden_states=torch.randn(1, 16, 16), encoder_hidden_states=torch.randn(1, 4, 64),
                             pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]),
                             img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(4, 3)).sample
    prediction.square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
print(peak_of(step))
"""


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_lokr_changes_the_estimate_counts_are_within_20_percent_of_what_a_step_holds(checkpointing):
    """Measured as what a LoKr step's peak holds beyond a LoRA step's on the same transformer (float32)."""
    def peak(adapter: str) -> int:
        result = subprocess.run([sys.executable, "-c", MEASURE_ADAPTERS, adapter, str(int(checkpointing)),
                                 json.dumps(WIDE_FLUX)], capture_output=True, text=True, env=MEASURING, timeout=300)
        assert result.returncode == 0, result.stderr
        return int(result.stdout.split()[-1])

    measured = peak("lokr") - peak("lora")
    counts = count_parameters(WIDE_FLUX, 4, 4.0, "attention", "flux1", "lokr", 16)
    predicted = changes_held(counts, checkpointing, 1) * 4
    print(f"checkpointing {checkpointing}: LoKr changes estimated {predicted / 2**20:.1f} MB, measured "
          f"{measured / 2**20:.1f} MB")
    assert abs(predicted - measured) <= 0.2 * measured


def test_a_sweep_over_adapters_names_its_runs_by_adapter(tiny_config):
    from lookalike.sweep.designs import experiment_name
    from lookalike.sweep.plan import config_for_run, experiments

    assert experiment_name({"adapter": "lokr", "lokr_factor": 16}) == "lokr-factor16"
    config = load_config(tiny_config(train={"lokr_factor": 8}, sweep={"factors": {"adapter": ["lora", "lokr"]}}))
    assert [e.name for e in experiments(config)] == ["lora", "lokr"]
    assert [config_for_run(config, name).train.adapter for name in ("lora", "lokr")] == ["lora", "lokr"]
