"""Sharded training (FSDP2, `[train] shard`): every repeated transformer block, then the whole transformer, is
split across the processes, so each holds 1/N of the frozen base, of the LoRA and of AdamW's state; a block's
weights are gathered just for its forward and backward pass. Gradients are averaged across the processes as in
data-parallel training, so N sharded processes train as N unsharded ones (and as one with the global batch).

Under mixed precision the frozen base computes in bf16 while the LoRA keeps float32 master weights, and
gradients are reduced in float32. Whatever gathers or sets full tensors (the LoRA file, checkpoints, resume)
is a collective step: every process calls it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch


def repeated_blocks(transformer) -> list[torch.nn.Module]:
    """The transformer's repeated blocks, in its model's order: the units diffusers compiles and checkpoints."""
    return [module for module in transformer.modules() if type(module).__name__ in transformer._repeated_blocks]


def shard_transformer(transformer, compute_dtype: torch.dtype, device: torch.device) -> None:
    """Shard the transformer (its LoRA added) across the process group, moving each process's shards to
    `device`: the model is loaded whole on the CPU first, never on one GPU."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # FSDP2 warns when a block returns a view (FLUX's blocks split text from image tokens so) in case an in-place op
    # follows; none does in diffusers' transformers, and tests/test_distributed.py checks that sharded training
    # ends with the weights of unsharded training.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in repeated_blocks(transformer):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(transformer, mesh=mesh, mp_policy=policy)


def optimizer_state(model, optimizer) -> dict[str, Any]:
    """The optimizer's whole state, gathered from every process's shards (collective), on the CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                cpu_offload=True))


def load_optimizer_state(model, optimizer, state: dict[str, Any]) -> None:
    """Give every process its shards of a whole optimizer state (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
