"""Under mixed-precision autocast, LoRA layers take their input as it comes (models/lora.share_lora_inputs): the
same loss and gradients as with peft's cast to float32, and fewer activations kept for the backward pass."""

from __future__ import annotations

import torch

from lookalike.models.base import load_component, resolve_base
from lookalike.models.lora import add_lora, share_lora_inputs


def kept_bytes_loss_and_gradients(transformer, inputs: dict) -> tuple[int, torch.Tensor, list[torch.Tensor]]:
    """One forward and backward pass under CPU bf16 autocast: the bytes of the distinct storages autograd keeps for
    the backward pass, the loss, and the LoRA's gradients."""
    storages: dict[int, int] = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = transformer(**inputs, return_dict=False)[0].float().pow(2).mean()
    parameters = [p for p in transformer.parameters() if p.requires_grad]
    return sum(storages.values()), loss.detach(), list(torch.autograd.grad(loss, parameters))


def test_shared_lora_inputs_give_the_same_loss_and_gradients_and_keep_fewer_activations():
    """On the tiny FLUX.1 transformer, its frozen weights in bf16 and a float32 LoRA of every attention layer, as
    the trainer holds them under bf16 mixed precision."""
    transformer = load_component(resolve_base("tiny"), "transformer", dtype=torch.bfloat16)
    torch.manual_seed(0)
    add_lora(transformer, 4, 4.0, "attention")
    for name, parameter in transformer.named_parameters():
        if parameter.requires_grad:
            parameter.data = torch.randn(parameter.shape) * 0.05  # float32, B not zero
    config, generator = transformer.config, torch.Generator().manual_seed(1)
    tokens, text = 64, 16
    inputs = {"hidden_states": torch.randn(2, tokens, config.in_channels, generator=generator),
              "encoder_hidden_states": torch.randn(2, text, config.joint_attention_dim, generator=generator),
              "pooled_projections": torch.randn(2, config.pooled_projection_dim, generator=generator),
              "timestep": torch.tensor([0.3, 0.8]), "guidance": torch.tensor([1.0, 1.0]),
              "img_ids": torch.zeros(tokens, 3), "txt_ids": torch.zeros(text, 3)}

    cast_bytes, cast_loss, cast_gradients = kept_bytes_loss_and_gradients(transformer, inputs)
    assert share_lora_inputs(transformer) > 0
    shared_bytes, shared_loss, shared_gradients = kept_bytes_loss_and_gradients(transformer, inputs)

    torch.testing.assert_close(shared_loss, cast_loss, rtol=0, atol=0)
    for shared, cast in zip(shared_gradients, cast_gradients):
        torch.testing.assert_close(shared, cast, rtol=0, atol=0)
    print(f"kept for the backward pass: {cast_bytes / 2**20:.2f} MB with peft's cast, {shared_bytes / 2**20:.2f} MB "
          f"shared ({shared_bytes / cast_bytes - 1:+.1%})")
    assert shared_bytes < cast_bytes
