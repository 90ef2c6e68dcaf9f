"""GPU benchmark: seconds per 28-step 1024x1024 image of FLUX.1-dev (or any hub base: `--model z-image`) with a
fused rank-16 LoRA, eager and compiled.

No weights can be downloaded, so the real architectures (FLUX.1-dev: the 12B transformer, the 16-channel VAE)
are built with random bf16 weights on the GPU. A random rank-16 LoRA is written as `lookalike train` writes one,
and fused the way `lookalike generate` fuses it. The text encoders are left out: the prompt's embeddings (512
tokens; FLUX.1: CLIP's pooled vector too; a true-CFG base: the negative prompt's as well) are given, as the text
encoder runs once per prompt, not per step. One image warms up (and, compiled, pays for the compile); the
median of the next ones is reported.

    python bench/gpu_generate.py [--model flux-dev] [--images 3] [--steps 28] [--resolution 1024]
    python bench/gpu_generate.py --tiny [--model z-image]   # the family's tiny model on the CPU: checks the script

Last line: compiled_s_per_image=<n>.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from gpu_train_step import TINY_TEXT_TOKENS, architecture_of, build_transformer  # bench/ is on sys.path

from lookalike.generate import apply_loras, render
from lookalike.models.base import load_component, quiet_libraries, resolve_base
from lookalike.models.families import FAMILIES, KNOWN_BASES
from lookalike.models.families.flux1 import FLUX_SCHEDULER, FLUX_VAE
from lookalike.models.families.interface import TextEncoding
from lookalike.models.families.stable_diffusion import SD_SCHEDULE
from lookalike.models.lora import add_lora, lora_state_dict, save_lora

TINY_VAE = dict(FLUX_VAE, block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=4)
TEXT_TOKENS = 512
# Each family's published VAE: FLUX.1's 16-channel autoencoder (Z-Image uses it too; SD3's has its layout with a
# scaling and shift of its own); FLUX.2's, Qwen-Image's (Krea 2's too) and Qwen-Image 2.1's are their classes'
# defaults (diffusers' conversion scripts build them so).
# SD's VAE: four blocks to 4 latent channels (SD 1.x's scaling factor; SDXL's differs only in it).
SD_VAE = dict(FLUX_VAE, latent_channels=4, scaling_factor=0.18215, shift_factor=None, use_quant_conv=True,
              use_post_quant_conv=True)
PUBLISHED_VAES = {"flux1": FLUX_VAE, "z-image": FLUX_VAE, "flux2": {}, "flux2-dev": {}, "qwen-image": {},
                  "qwen-image21": {}, "krea2": {}, "sd1": SD_VAE, "sdxl": SD_VAE,
                  "sd3": dict(FLUX_VAE, scaling_factor=1.5305, shift_factor=0.0609)}


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


def seconds_per_image(pipe, args, embeddings: dict, guidance: float | None, images: int) -> list[float]:
    times = []
    for seed in range(images):
        started = time.perf_counter()
        render(pipe, seed=seed, guidance=guidance, steps=args.steps, size=args.resolution,
               text=TextEncoding(TEXT_TOKENS), embeddings=embeddings)
        if pipe.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times


def build_pipeline(model: str, tiny: bool, device, dtype):
    """The base's pipeline without text encoders: its denoiser and VAE at full size with random weights, or
    with --tiny its family's tiny model's (FLUX.1: the TINY sizes), and its scheduler."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    family = FAMILIES[KNOWN_BASES[model].family]
    transformer = build_transformer(architecture_of(model, tiny), device, dtype, family.name)
    # The family's tiny folder stands for the base's own where the pipeline reads settings from it (Krea 2's tapped
    # layers, Qwen-Image 2.1's processor): the embeddings are given, so they do not change the work.
    tiny_folder = resolve_base(next(name for name, base in family.bases.items() if base.repo is None))
    if tiny and family.name != "flux1":
        vae = load_component(tiny_folder, "vae", dtype)
    elif tiny:
        vae = AutoencoderKL(**TINY_VAE)
    else:
        vae = family.component_class("vae")(**PUBLISHED_VAES[family.name])
    scheduler = (EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="leading") if family.denoiser == "unet"
                 else FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER))
    pipe = family.sample_pipeline(tiny_folder, transformer, vae.to(device, dtype), scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3, help="timed images after the warm-up one")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--model", default="flux-dev", choices=[name for name, info in KNOWN_BASES.items()
                                                                    if info.architecture is not None])
    parser.add_argument("--tiny", action="store_true", help="tiny architecture on the CPU (checks the script)")
    args = parser.parse_args()
    quiet_libraries()
    if args.tiny:
        args.resolution, args.steps = min(args.resolution, 64), min(args.steps, 4)
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16

    pipe = build_pipeline(args.model, args.tiny, device, dtype)
    family, info = FAMILIES[KNOWN_BASES[args.model].family], KNOWN_BASES[args.model]
    denoiser = getattr(pipe, family.denoiser)
    with tempfile.TemporaryDirectory() as tmp:
        apply_loras(pipe, [(random_lora_file(denoiser, Path(tmp), args.rank), 1.0)], fuse=True)
    tokens = TINY_TEXT_TOKENS if args.tiny else TEXT_TOKENS

    def random_text():
        return {name: torch.randn(shape) for name, shape in family.text_shapes(denoiser.config, tokens).items()}

    negative = random_text() if family.negative_prompt is not None else None
    embeddings = family.pipeline_embeddings(random_text(), negative, device, dtype)
    guidance = (3.5 if family.name == "flux1" else 4.0) if info.guidance else None

    print(f"architecture: {'tiny ' if args.tiny else ''}{args.model}, {args.resolution}^2, {args.steps} steps, "
          f"fused rank-{args.rank} LoRA; device: {'CPU' if args.tiny else torch.cuda.get_device_name()}")
    results = {}
    for mode in ("eager", "compiled"):
        if mode == "compiled":
            denoiser.compile_repeated_blocks(fullgraph=True)
        warm_up = seconds_per_image(pipe, args, embeddings, guidance, 1)[0]
        results[mode] = statistics.median(seconds_per_image(pipe, args, embeddings, guidance, args.images))
        peak = f", peak {torch.cuda.max_memory_allocated() / 1e9:.1f} GB" if device.type == "cuda" else ""
        print(f"{mode:8}: {results[mode]:.3f} s/image (first image {warm_up:.1f} s{peak})", flush=True)
    print(f"eager_s_per_image={results['eager']:.3f}")
    print(f"compiled_s_per_image={results['compiled']:.3f}")


if __name__ == "__main__":
    main()
