"""GPU benchmark: a rank-16 LoRA training step of the full FLUX.1-dev transformer at 1024x1024.

No weights can be downloaded, so the real architecture (19 double + 38 single blocks, hidden 3072) is built
with random bf16 weights directly on the GPU, and trained on random latents and random cached text
embeddings (4,096 image tokens + 512 text tokens), exactly the tensors the trainer feeds it.

Prints seconds/step, peak GPU memory and model-FLOPs utilisation: one forward at 1024^2 with 512 text tokens is
about 74.4 TFLOP; a LoRA step is about 2.2 forwards (frozen weights need no weight gradients), 3.2 with
gradient checkpointing (one more forward).

    python bench/gpu_train_step.py [--resolution 1024] [--checkpointing] [--compile] [--steps 20]
    python bench/gpu_train_step.py --tiny      # the same code on a tiny config on the CPU, to check the script

Last line: s_per_step=<n>.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from lookalike.models.base import FLUX_TRANSFORMER

from bare_step import add_trainable_lora, random_batch, timed_steps  # bench/ is on sys.path when run as a script

FORWARD_TFLOP_1024 = 74.4  # at 4,096 image + 512 text tokens
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, SXM parts

FLUX_DEV = FLUX_TRANSFORMER
TINY = dict(FLUX_DEV, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))


def build_transformer(architecture: dict, device: torch.device, dtype: torch.dtype):
    from diffusers import FluxTransformer2DModel

    # Built in bf16 on the GPU itself: in fp32 on the host, 12B parameters would need 48 GB first.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return FluxTransformer2DModel(**architecture)
    finally:
        torch.set_default_dtype(previous)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing of every block")
    parser.add_argument("--compile", action="store_true", help="torch.compile of each repeated block")
    parser.add_argument("--tiny", action="store_true", help="tiny architecture on the CPU (checks the script)")
    args = parser.parse_args()

    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    architecture = TINY if args.tiny else FLUX_DEV
    transformer = build_transformer(architecture, device, dtype)
    params, optimizer = add_trainable_lora(transformer, args.rank)
    if args.checkpointing:
        transformer.enable_gradient_checkpointing()
    if args.compile:
        for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
            block.compile()
    text_tokens = 512
    inputs, target = random_batch(transformer.config, args.resolution, text_tokens, device, dtype)
    times = timed_steps(transformer, params, optimizer, inputs, target, args.warmup + args.steps,
                        autocast_dtype=None if args.tiny else dtype)
    seconds = statistics.median(times[args.warmup:])

    side = args.resolution // 16
    image_tokens = side * side
    # Attention grows faster than linearly, so this scaling from 1024^2 is approximate at other sizes.
    forward_tflop = FORWARD_TFLOP_1024 * (image_tokens + text_tokens) / (4096 + text_tokens)
    step_tflop = forward_tflop * (3.2 if args.checkpointing else 2.2)
    print(f"architecture: {'tiny' if args.tiny else 'FLUX.1-dev'}, {args.resolution}^2, rank {args.rank}, "
          f"checkpointing {args.checkpointing}, compile {args.compile}")
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        print(f"device: {name}")
        print(f"peak_memory_gb={torch.cuda.max_memory_allocated() / 1e9:.2f}")
        if peak:
            print(f"mfu={step_tflop / seconds / peak:.3f}  ({step_tflop:.0f} TFLOP per step, peak {peak:.0f} TFLOP/s)")
    print(f"s_per_step={seconds:.4f}")


if __name__ == "__main__":
    main()
