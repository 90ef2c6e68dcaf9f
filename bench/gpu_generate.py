"""GPU benchmark: seconds per 28-step 1024x1024 image of FLUX.1-dev with a fused rank-16 LoRA, eager and compiled.

No weights can be downloaded, so the real architectures (the 12B transformer, the 16-channel VAE) are built
with random bf16 weights on the GPU. A random rank-16 LoRA is written as `lookalike train` writes one, and
fused the way `lookalike generate` fuses it. The text encoders are left out: the prompt's embeddings
(512 T5 tokens, CLIP's pooled vector) are given, as T5 runs once per prompt, not per step. One image warms up
(and, compiled, pays for the compile); the median of the next ones is reported.

    python bench/gpu_generate.py [--images 3] [--steps 28] [--resolution 1024]
    python bench/gpu_generate.py --tiny      # a tiny architecture on the CPU, to check the script

Last line: compiled_s_per_image=<n>.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from gpu_train_step import TINY, build_transformer  # bench/ is on sys.path when run as a script

from lookalike.generate import apply_loras, render
from lookalike.models.base import quiet_libraries
from lookalike.models.families.flux1 import FLUX_SCHEDULER, FLUX_TRANSFORMER, FLUX_VAE
from lookalike.models.lora import add_lora, lora_state_dict, save_lora

TINY_VAE = dict(FLUX_VAE, block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=4)
TEXT_TOKENS = 512


def random_lora_file(transformer, folder: Path, rank: int) -> Path:
    """A rank-`rank` LoRA of the transformer's attention with random (non-zero) weights, saved as the trainer
    saves one; the transformer is left without it."""
    add_lora(transformer, rank, rank, "attention")
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=1e-3)
    path = folder / "bench.safetensors"
    save_lora(path, lora_state_dict(transformer), transformer.peft_config["default"], {"rank": rank})
    transformer.delete_adapters("default")
    return path


def seconds_per_image(pipe, args, embeds, pooled, images: int) -> list[float]:
    times = []
    for seed in range(images):
        started = time.perf_counter()
        render(pipe, seed=seed, guidance=3.5, steps=args.steps, size=args.resolution,
               max_sequence_length=TEXT_TOKENS, embeddings={"prompt_embeds": embeds, "pooled_prompt_embeds": pooled})
        if embeds.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3, help="timed images after the warm-up one")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tiny", action="store_true", help="tiny architecture on the CPU (checks the script)")
    args = parser.parse_args()
    quiet_libraries()
    if args.tiny:
        args.resolution, args.steps = min(args.resolution, 64), min(args.steps, 4)
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16

    transformer = build_transformer(TINY if args.tiny else FLUX_TRANSFORMER, device, dtype)
    vae = AutoencoderKL(**(TINY_VAE if args.tiny else FLUX_VAE)).to(device, dtype)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    with tempfile.TemporaryDirectory() as tmp:
        apply_loras(pipe, [(random_lora_file(transformer, Path(tmp), args.rank), 1.0)], fuse=True)
    embeds = torch.randn(1, TEXT_TOKENS, transformer.config.joint_attention_dim, device=device, dtype=dtype)
    pooled = torch.randn(1, transformer.config.pooled_projection_dim, device=device, dtype=dtype)

    print(f"architecture: {'tiny' if args.tiny else 'FLUX.1-dev'}, {args.resolution}^2, {args.steps} steps, "
          f"fused rank-{args.rank} LoRA; device: {'CPU' if args.tiny else torch.cuda.get_device_name()}")
    results = {}
    for mode in ("eager", "compiled"):
        if mode == "compiled":
            pipe.transformer.compile_repeated_blocks(fullgraph=True)
        warm_up = seconds_per_image(pipe, args, embeds, pooled, 1)[0]
        results[mode] = statistics.median(seconds_per_image(pipe, args, embeds, pooled, args.images))
        peak = f", peak {torch.cuda.max_memory_allocated() / 1e9:.1f} GB" if device.type == "cuda" else ""
        print(f"{mode:8}: {results[mode]:.3f} s/image (first image {warm_up:.1f} s{peak})", flush=True)
    print(f"eager_s_per_image={results['eager']:.3f}")
    print(f"compiled_s_per_image={results['compiled']:.3f}")


if __name__ == "__main__":
    main()
