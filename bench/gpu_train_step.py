"""GPU benchmark: rank-16 LoRA training steps of a full-size transformer (FLUX.1-dev by default, or any hub
base: `--model z-image`), over the low-memory settings.

No weights can be downloaded, so the base's published architecture (FLUX.1-dev: 19 double + 38 single blocks,
hidden 3072) is built with random bf16 weights directly on the GPU, and trained on random latents and random
cached text embeddings (512 text tokens) called through its family as the trainer calls it. The frozen base is
then quantised with the trainer's own settings (models/quantize.py) where asked.

The matrix: base `bf16`, `bf16+compile` (regional compilation of the repeated blocks), `nf4` (bitsandbytes)
and `fp8` (torchao, weight-only), each with and without gradient checkpointing, at 512^2 and 1024^2; and on
request `fp8c` and `fp8c+compile` (train.fp8_compute: bf16 weights, float8 matmuls) and `bf16+offload`
(train.offload: built in host memory, each block's weights copied in while it runs; always checkpointed). Each
base runs in its own process (a clean GPU and compile cache); a failing base is reported and the others go on.
For each combination: seconds/step (median after warm-up), peak GPU memory beside what `lookalike train
--dry-run` estimates for the same settings, and model-FLOPs utilisation: one forward at 1024^2 with 512 text
tokens is about 74.4 TFLOP; a LoRA step is about 2.2 forwards (frozen weights need no weight gradients), 3.2
with gradient checkpointing (one more forward).

    python bench/gpu_train_step.py                                  # the whole matrix (over 10 min on an H100)
    python bench/gpu_train_step.py --bases bf16 --resolutions 1024  # a part of it
    python bench/gpu_train_step.py --model qwen-image --bases nf4   # another base (MFU is FLUX.1-dev's only)
    python bench/gpu_train_step.py --adapter lokr --lokr-factor 16  # a LoKr instead of the LoRA
    python bench/gpu_train_step.py --tiny     # a tiny architecture on the CPU (fp32, int8, fp8): checks the script

Last line: s_per_step=<bf16 at 1024^2 without checkpointing, or the first combination measured>.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from bare_step import add_trainable_lora, family_batch, timed_steps  # bench/ is on sys.path when run as a script

from lookalike.models.base import quiet_libraries, resolve_base
from lookalike.models.families import FAMILIES, KNOWN_BASES
from lookalike.models.families.flux1 import FLUX_TRANSFORMER

FORWARD_TFLOP_1024 = 74.4  # at 4,096 image + 512 text tokens
TEXT_TOKENS = 512
TINY_TEXT_TOKENS = 32  # what the tiny models are made for (tiny Z-Image's position table holds no more)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, SXM parts

TINY = dict(FLUX_TRANSFORMER, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))


def build_transformer(architecture: dict, device: torch.device, dtype: torch.dtype, family: str = "flux1"):
    # Built in bf16 on the GPU itself: in fp32 on the host, 12B parameters would need 48 GB first.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            denoiser = FAMILIES[family].component_class(FAMILIES[family].denoiser)(**architecture)
    finally:
        torch.set_default_dtype(previous)
    FAMILIES[family].adjust_denoiser(denoiser)  # as lookalike loads it (SD3: its blocks named for compile)
    return denoiser


def architecture_of(model: str, tiny: bool) -> dict:
    """The hub base's published architecture, or with --tiny its family's tiny model's (FLUX.1: TINY)."""
    info = KNOWN_BASES[model]
    if not tiny:
        return dict(info.architecture)
    if info.family == "flux1":
        return TINY
    tiny_base = next(name for name, base in FAMILIES[info.family].bases.items() if base.repo is None)
    config = resolve_base(tiny_base) / FAMILIES[info.family].denoiser / "config.json"
    return {k: v for k, v in json.loads(config.read_text()).items() if not k.startswith("_")}


def quantize_base(transformer, kind: str, dtype: torch.dtype) -> None:
    """Quantise the built transformer's linear layers as the trainer's settings load them (models/quantize.py)."""
    from lookalike.models.quantize import check_quantization, quantization_config

    check_quantization(kind)
    config = quantization_config(kind, dtype)
    if kind != "nf4":
        from torchao import quantize_

        quantize_(transformer, config.quant_type)
        return
    import bitsandbytes

    # diffusers quantises nf4 as it loads weights from files; with weights built in memory, the same layers
    # (bitsandbytes' Linear4bit, the config's quant type and compute dtype) are swapped in one by one.
    for parent in list(transformer.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            layer = bitsandbytes.nn.Linear4bit(child.in_features, child.out_features, child.bias is not None,
                                               compute_dtype=config.bnb_4bit_compute_dtype,
                                               quant_type=config.bnb_4bit_quant_type, device="meta")
            layer.weight = bitsandbytes.nn.Params4bit(child.weight.data, requires_grad=False,
                                                      quant_type=config.bnb_4bit_quant_type).to(child.weight.device)
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, layer)


@functools.cache
def _parameter_counts(model: str, rank: int, adapter: str, lokr_factor: int):
    from lookalike.train.memory import count_parameters

    return count_parameters(dict(KNOWN_BASES[model].architecture), rank, rank, "attention", KNOWN_BASES[model].family,
                            adapter, lokr_factor)


def estimated_gb(model: str, resolution: int, checkpointing: bool, kind: str, rank: int, offload: bool = False,
                 adapter: str = "lora", lokr_factor: int = -1) -> float:
    """What `lookalike train --dry-run` estimates for this combination (bf16), in GB."""
    from lookalike.config import validate
    from lookalike.train.memory import estimate

    config = validate({"name": "bench", "workspace": "work", "model": {"base": model},
                       "subject": {"token": "sks", "images": "photos"},
                       "data": {"resolution": resolution},
                       "train": {"rank": rank, "gradient_checkpointing": checkpointing, "offload": offload,
                                 "base_quantization": "none" if kind in ("bf16", "fp8c") else kind,
                                 "adapter": adapter,
                                 "lokr_factor": lokr_factor}}, "bench", Path.cwd())
    return estimate(config, "bf16", _parameter_counts(model, rank, adapter, lokr_factor)).total * 2**30 / 1e9


def measure_base(model: str, base: str, resolutions: list[int], checkpointing: list[bool], tiny: bool, rank: int,
                 steps: int, warmup: int, adapter: str = "lora", lokr_factor: int = -1) -> None:
    """In this process: build one base, then print a JSON line per (resolution, checkpointing)."""
    device = torch.device("cpu" if tiny else "cuda")
    dtype = torch.float32 if tiny else torch.bfloat16
    kind, _, variant = base.partition("+")
    family = FAMILIES[KNOWN_BASES[model].family]
    offloaded = variant == "offload"  # built in host memory, its blocks' weights kept there (train.offload)
    transformer = build_transformer(architecture_of(model, tiny), torch.device("cpu") if offloaded else device, dtype,
                                    family.name)
    if kind == "fp8c":  # float8 compute, as the trainer converts before adding the LoRA
        from lookalike.train.fp8 import convert_to_fp8_compute

        convert_to_fp8_compute(transformer)
    elif kind not in ("bf16", "fp32"):
        quantize_base(transformer, kind, dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    params, optimizer = add_trainable_lora(transformer, rank, adapter, lokr_factor)
    if offloaded:
        from lookalike.train.offload import BlockOffload

        BlockOffload(transformer, family.checkpointed_block_types(transformer), device)
        transformer.to(device)  # the LoRA (the optimizer keeps the same parameters) and what is outside the blocks
        checkpointing = [True]  # every offloaded block is recomputed
    if variant == "compile":
        transformer.compile_repeated_blocks(fullgraph=True)
    for resolution in resolutions:
        for checkpoint in checkpointing:
            if checkpoint and not offloaded:  # an offloaded base's blocks are checkpointed by the offload
                transformer.enable_gradient_checkpointing()
            elif not offloaded:
                transformer.disable_gradient_checkpointing()
            forward, target = family_batch(family, transformer, resolution, TINY_TEXT_TOKENS if tiny else TEXT_TOKENS,
                                           device, dtype)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times = timed_steps(forward, params, optimizer, target, warmup + steps,
                                autocast_dtype=None if tiny else dtype)
            peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None
            print(json.dumps({"base": base, "resolution": resolution, "checkpointing": checkpoint,
                              "s_per_step": statistics.median(times[warmup:]), "peak_memory_gb": peak}), flush=True)


def step_tflop(resolution: int, checkpointing: bool) -> float:
    # Attention grows faster than linearly, so this scaling from 1024^2 is approximate at other sizes.
    tokens = (resolution // 16) ** 2 + TEXT_TOKENS
    return FORWARD_TFLOP_1024 * tokens / (4096 + TEXT_TOKENS) * (3.2 if checkpointing else 2.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bases", help="comma-separated: bf16, bf16+compile, nf4, fp8, int8, fp8c, fp8c+compile "
                                        "(default: bf16,bf16+compile,nf4,fp8; --tiny: fp32,int8,fp8)")
    parser.add_argument("--resolutions", default="512,1024")
    parser.add_argument("--checkpointing", choices=["both", "on", "off"], default="both")
    parser.add_argument("--model", default="flux-dev", choices=[name for name, info in KNOWN_BASES.items()
                                                                    if info.architecture is not None])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--adapter", choices=["lora", "dora", "lokr"], default="lora")
    parser.add_argument("--lokr-factor", type=int, default=-1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="tiny architecture on the CPU (checks the script)")
    parser.add_argument("--one-base", help=argparse.SUPPRESS)  # the child process measuring one base
    args = parser.parse_args()
    quiet_libraries()
    resolutions = [int(r) for r in args.resolutions.split(",")]
    checkpointing = {"both": [False, True], "on": [True], "off": [False]}[args.checkpointing]
    if args.one_base:
        measure_base(args.model, args.one_base, resolutions, checkpointing, args.tiny, args.rank, args.steps,
                     args.warmup, args.adapter, args.lokr_factor)
        return

    bases = (args.bases or ("fp32,int8,fp8" if args.tiny else "bf16,bf16+compile,nf4,fp8")).split(",")
    device_name = "CPU" if args.tiny else torch.cuda.get_device_name()
    # Model-FLOPs utilisation is counted for FLUX.1-dev's transformer only (its FLOPs per forward are known).
    peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None) \
        if args.model == "flux-dev" else None
    print(f"architecture: {'tiny ' if args.tiny else ''}{args.model}, {args.adapter} of rank {args.rank}, "
          f"{TINY_TEXT_TOKENS if args.tiny else TEXT_TOKENS} text tokens; "
          f"device: {device_name}")
    print(f"{'base':14} {'res':>5} {'ckpt':>5} {'s/step':>8} {'peak GB':>8} {'est. GB':>8} {'MFU':>6}")
    rows = []
    for base in bases:
        child = subprocess.run([sys.executable, __file__, "--one-base", base, "--model", args.model,
                                "--resolutions", args.resolutions,
                                "--checkpointing", args.checkpointing, "--rank", str(args.rank), "--steps",
                                str(args.steps), "--warmup", str(args.warmup), "--adapter", args.adapter,
                                "--lokr-factor", str(args.lokr_factor)] + (["--tiny"] if args.tiny else []),
                               capture_output=True, text=True)
        measured = [json.loads(line) for line in child.stdout.splitlines() if line.startswith("{")]
        for row in measured:
            peak = "-" if row["peak_memory_gb"] is None else f"{row['peak_memory_gb']:.2f}"
            kind, _, variant = base.partition("+")
            estimate = None if args.tiny else estimated_gb(args.model, row["resolution"], row["checkpointing"], kind,
                                                           args.rank, variant == "offload", args.adapter,
                                                           args.lokr_factor)
            estimated = "-" if estimate is None else f"{estimate:.2f}"
            mfu = step_tflop(row["resolution"], row["checkpointing"]) / row["s_per_step"] / peak_tflops \
                if peak_tflops else None
            print(f"{base:14} {row['resolution']:>5} {'yes' if row['checkpointing'] else 'no':>5} "
                  f"{row['s_per_step']:8.4f} {peak:>8} {estimated:>8} {'-' if mfu is None else f'{mfu:.3f}':>6}",
                  flush=True)
        rows += measured
        if child.returncode != 0:
            reason = (child.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"{base:14} failed (exit {child.returncode}): {reason}", flush=True)
    if not rows:
        sys.exit("no combination was measured")
    headline = next((r for r in rows if r["base"] == "bf16" and r["resolution"] == 1024 and not r["checkpointing"]),
                    rows[0])
    print(f"s_per_step={headline['s_per_step']:.4f}")


if __name__ == "__main__":
    main()
