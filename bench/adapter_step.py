"""Adapter cost: seconds per training step of a LoKr and a DoRA against a LoRA of the same rank on the same
transformer, each with its AdamW, on one fixed batch.

A FLUX.1 transformer whose layers are wide enough for the adapters' own work to show on the CPU: hidden 1024
(8 heads of 128), 2 double + 4 single blocks, attention layers adapted at rank 16, 256 px (256 image tokens, 32
text tokens), fp32. A LoKr builds each adapted layer's whole weight change, kron(w1, w2), in every forward; a DoRA
reads each weight's norm. Each adapter runs in this process on a fresh copy of the same weights, after warm-up
steps; run it on a quiet machine (torch is pinned to one thread, which a busy 2-core machine slows least).

    .venv/bin/python bench/adapter_step.py [--steps 8] [--lokr-factor 16]

Last line: lokr_ratio=<LoKr s/step / LoRA s/step>.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from bare_step import add_trainable_lora, family_batch, timed_steps  # bench/ is on sys.path when run as a script

from lookalike.models.base import quiet_libraries
from lookalike.models.families import FAMILIES
from lookalike.models.families.flux1 import FLUX_TRANSFORMER

WIDE = dict(FLUX_TRANSFORMER, num_layers=2, num_single_layers=4, attention_head_dim=128, num_attention_heads=8,
            joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(16, 56, 56))
RESOLUTION, TEXT_TOKENS = 256, 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lokr-factor", type=int, default=16)
    args = parser.parse_args()
    quiet_libraries()
    torch.set_num_threads(1)
    family = FAMILIES["flux1"]
    torch.manual_seed(0)
    base = family.component_class("transformer")(**WIDE)
    seconds = {}
    for adapter in ("lora", "lokr", "dora"):
        transformer = copy.deepcopy(base)
        params, optimizer = add_trainable_lora(transformer, args.rank, adapter, args.lokr_factor)
        forward, target = family_batch(family, transformer, RESOLUTION, TEXT_TOKENS, torch.device("cpu"),
                                       torch.float32)
        times = timed_steps(forward, params, optimizer, target, args.warmup + args.steps)
        seconds[adapter] = statistics.median(times[args.warmup:])
        trained = sum(p.numel() for p in params)
        print(f"{adapter:5} {seconds[adapter]:8.4f} s/step  ({seconds[adapter] / seconds['lora']:.2f}x LoRA)  "
              f"{trained / 1e6:6.3f} M trained parameters", flush=True)
    print(f"lokr_ratio={seconds['lokr'] / seconds['lora']:.2f}")


if __name__ == "__main__":
    main()
