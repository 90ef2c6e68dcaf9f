"""GPU benchmark: a warm sweep of three runs against three processes (bench/sweep.py's comparison) on a base of
FLUX.1-dev's size, where loading the base is what a process per run pays again.

No weights can be downloaded, so the base folder is made here: FLUX.1-dev's transformer (19 double and 38 single
blocks, hidden 3072: 24 GB in bf16) with random weights, built on the GPU and saved; beside it slim text encoders
and a VAE of the widths FLUX.1's transformer reads (T5 of width 4096 and CLIP of width 768, one layer each), so
that a run loads the full transformer as it would from the hub and little else. Each run trains a few steps at
512 px; start-up and overhead are as bench/sweep.py counts them.

    python bench/gpu_sweep.py [--steps 10] [--rounds 1] [--folder /tmp/flux-dev-sized]
    python bench/gpu_sweep.py --tiny   # the same on the CPU, a small transformer: checks the script

Last line: warm_startup_ratio=<warm start-up over separate start-up, median>.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from gpu_train_step import TINY, build_transformer  # bench/ is on sys.path when run as a script
from sweep import compare

from lookalike.models.families.flux1 import FLUX_TRANSFORMER, TinySpec, build_tiny_pipeline


def make_base(folder: Path, tiny: bool) -> Path:
    """A FluxPipeline folder: the slim encoders and VAE of a tiny pipeline at FLUX.1's widths, and a transformer
    of FLUX.1-dev's architecture (TINY's on the CPU) with random weights."""
    if (folder / "model_index.json").is_file():
        return folder
    architecture = TINY if tiny else FLUX_TRANSFORMER
    spec = TinySpec(attention_head_dim=architecture["attention_head_dim"],
                    num_attention_heads=architecture["num_attention_heads"],
                    joint_attention_dim=architecture["joint_attention_dim"],
                    pooled_projection_dim=architecture["pooled_projection_dim"])
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    build_tiny_pipeline(spec).save_pretrained(partial)
    shutil.rmtree(partial / "transformer")
    device = torch.device("cpu" if tiny else "cuda")
    transformer = build_transformer(architecture, device, torch.float32 if tiny else torch.bfloat16)
    transformer.save_pretrained(partial / "transformer", max_shard_size="5GB")
    del transformer
    partial.rename(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/flux-dev-sized"))
    parser.add_argument("--tiny", action="store_true", help="a small transformer on the CPU (checks the script)")
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("no CUDA GPU: run with --tiny to check the script on the CPU")
    base = make_base(args.folder, args.tiny)
    print(f"base: {base} ({'tiny' if args.tiny else 'FLUX.1-dev-sized'} transformer, "
          f"{sum(f.stat().st_size for f in (base / 'transformer').glob('*.safetensors')) / 1e9:.1f} GB)", flush=True)
    compare(args.steps, args.rounds, str(base), 64 if args.tiny else 512)


if __name__ == "__main__":
    main()
