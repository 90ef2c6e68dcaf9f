"""Training a base bigger than the accelerator's memory (train.offload): the frozen weights of the denoiser's
blocks stay in (pinned) CPU memory and are copied to the accelerator when their block runs, evicting the block that
ran least recently, so that at most RESIDENT blocks' weights are there at once. The LoRA, and the weights outside
the blocks (embeddings, norms, projections in and out), stay on the accelerator.

Why this is safe in training: every offloaded block is gradient-checkpointed here (whatever the model's own
checkpointing would choose), so its forward keeps no reference to its weights for the backward pass, and the
backward pass recomputes its forward, which brings its weights back first. Autograd runs the nodes in the reverse
order of their creation, so the blocks' backward passes come one after another, each right after its
recomputation, and evicting the least recently run block never takes weights a pending node needs. Were that ever
not so, the evicted weight is an empty tensor and the step fails loudly; it never computes with wrong weights.
(diffusers' group offloading is made for inference: it neither brings weights back for the backward pass nor keeps
a trained weight's updates.)
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.utils.checkpoint

RESIDENT = 1  # blocks whose weights are on the accelerator at once: the one running


class BlockOffload:
    def __init__(self, model: torch.nn.Module, block_types: set[str], device: torch.device):
        self.device = device
        self.stored: dict[int, list[tuple[torch.nn.Parameter, torch.Tensor]]] = {}
        self.resident: OrderedDict[int, None] = OrderedDict()
        # What the tests and benchmarks check: the most blocks ever resident at once, blocks run, weights copied.
        self.most_resident = self.runs = self.onloads = 0
        for block in [m for m in model.modules() if type(m).__name__ in block_types]:
            frozen = [p for p in block.parameters() if not p.requires_grad]
            # Pinned host memory: the copies to the accelerator then run asynchronously, at full bus speed.
            self.stored[id(block)] = [(p, _host_copy(p.data, device)) for p in frozen]
            for parameter, _ in self.stored[id(block)]:
                parameter.data = _placeholder(parameter, device)
            block.forward = self._offloaded(block, block.forward)

    @property
    def offloaded_parameters(self) -> int:
        return sum(copy.numel() for stored in self.stored.values() for _, copy in stored)

    def _offloaded(self, block: torch.nn.Module, forward):
        def run(*args, **kwargs):  # the block's forward with its weights brought first, also when recomputed
            self._bring(block)
            return forward(*args, **kwargs)

        def offloaded_forward(*args, **kwargs):
            if torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)
            return run(*args, **kwargs)  # samples: nothing to keep for a backward pass

        return offloaded_forward

    def _bring(self, block: torch.nn.Module) -> None:
        key = id(block)
        self.runs += 1
        if key in self.resident:
            self.resident.move_to_end(key)
            return
        while len(self.resident) >= RESIDENT:
            evicted, _ = self.resident.popitem(last=False)
            for parameter, _ in self.stored[evicted]:
                parameter.data = _placeholder(parameter, self.device)
        for parameter, copy in self.stored[key]:
            parameter.data = copy.to(self.device, non_blocking=True)
        self.resident[key] = None
        self.onloads += 1
        self.most_resident = max(self.most_resident, len(self.resident))


def _host_copy(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    copy = tensor.detach().to("cpu")
    return copy.pin_memory() if device.type == "cuda" else copy


def _placeholder(parameter: torch.nn.Parameter, device: torch.device) -> torch.Tensor:
    """An empty tensor of the weight's dtype: no memory, and any computation with it fails at once."""
    return torch.empty(0, dtype=parameter.dtype, device=device)
