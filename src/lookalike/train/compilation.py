"""Whether a run compiles its denoiser's repeated blocks (train.compile; regional compilation: the blocks of a kind
share one compiled graph).

`auto`, the default, compiles where the compile pays for itself over the run: on a CUDA GPU, for runs of
COMPILE_PAYS_FROM_STEPS steps or more, with settings torch.compile can train (plain or float8-compute weights, one
process, a LoRA or DoRA, no token routing). The threshold is an estimate until a lent GPU measures it
(bench/gpu_train_step.py's bf16+compile rows): a compile of about a minute at the first step (train.compile's own
docs), against regional compilation's published 10-25 % off a FLUX.1-dev step of 0.55 s (H200,
bench/gpu_figures.json), pays back after roughly 450 to 1,100 steps. On the CPU the compile takes longer than any
tiny run, so `auto` leaves it off.
"""

from __future__ import annotations

COMPILE_PAYS_FROM_STEPS = 1000


def compiles(train, device_type: str) -> bool:
    """train.compile resolved for this run: true and false as set; `auto` as the module says."""
    if train.compile != "auto":
        return train.compile
    trainable = (train.base_quantization == "none" and not train.offload and not train.shard
                 and train.adapter != "lokr" and train.tread_ratio is None)
    return device_type == "cuda" and train.max_train_steps >= COMPILE_PAYS_FROM_STEPS and trainable
