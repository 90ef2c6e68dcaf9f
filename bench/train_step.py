"""Trainer overhead: `lookalike train`'s seconds per step against a bare LoRA step of the same transformer.

A tiny FLUX big enough to be compute-bound on the CPU: hidden 256, 2 double + 4 single blocks, rank 16, 512 px
photos, which the 8x VAE and FLUX's 2x2 packing turn into 1,024 image tokens (plus 32 text tokens).
The trainer's figure is wall time per step over its whole loop (batch assembly, metrics, progress bar
included), read from metrics.jsonl timestamps; the bare figure is forward + backward + AdamW on one fixed
batch. Both run in this process, one after the other, after warm-up steps.

    .venv/bin/python bench/train_step.py [--steps 40] [--photos tests/data/faces/obama]
                                         [--background-loss-weight 0.1]   # masked training's cost

Last line: overhead_ratio=<trainer / bare>.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from bare_step import add_trainable_lora, random_batch, timed_steps  # bench/ is on sys.path when run as a script

from lookalike.config import load_config
from lookalike.models.base import load_component, quiet_libraries
from lookalike.models.families.flux1 import TinySpec, ensure_tiny_model
from lookalike.train.trainer import train

REPO = Path(__file__).resolve().parents[1]
SPEC = TinySpec(num_layers=2, num_single_layers=4, attention_head_dim=32, num_attention_heads=8,
                joint_attention_dim=64, pooled_projection_dim=64)
RESOLUTION, RANK, WARMUP = 512, 16, 5


def bench_config(folder: Path, photos: Path, workdir: Path, name: str, steps: int, sample_every: int = 0,
                 score_samples: bool = False, background_loss_weight: float = 1.0) -> Path:
    """A study config of the bench's tiny model on `photos` (faces by dlib, CLIP tiny: offline)."""
    config_file = workdir / f"{name}.toml"
    config_file.write_text(f"""
name = "bench"
workspace = "{workdir / 'work'}"
[model]
base = "{folder}"
max_sequence_length = 32
[subject]
token = "sks"
images = "{photos}"
[data]
resolution = {RESOLUTION}
[evaluate]
face_backend = "dlib"
clip_model = "tiny"
[train]
rank = {RANK}
max_train_steps = {steps}
checkpoint_every = 0
sample_every = {sample_every}
score_samples = {str(score_samples).lower()}
background_loss_weight = {background_loss_weight}
""")
    return config_file


def trainer_seconds_per_step(folder: Path, photos: Path, workdir: Path, steps: int,
                             background_loss_weight: float = 1.0) -> float:
    lora = train(load_config(bench_config(folder, photos, workdir, "bench", steps,
                                          background_loss_weight=background_loss_weight)), "bench")
    records = [json.loads(line) for line in (lora.parent / "metrics.jsonl").read_text().splitlines()]
    timed = records[WARMUP:]
    return (timed[-1]["time"] - timed[0]["time"]) / (len(timed) - 1)


def bare_seconds_per_step(folder: Path, steps: int) -> float:
    transformer = load_component(folder, "transformer")
    params, optimizer = add_trainable_lora(transformer, RANK)
    inputs, target = random_batch(transformer.config, RESOLUTION, 32, torch.device("cpu"), torch.float32)
    return statistics.mean(timed_steps(lambda: transformer(**inputs)[0], params, optimizer, target, steps)[WARMUP:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--photos", type=Path, default=REPO / "tests" / "data" / "faces" / "obama")
    parser.add_argument("--background-loss-weight", type=float, default=1.0,
                        help="train.background_loss_weight of the trainer's run (below 1: masked training's cost)")
    args = parser.parse_args()
    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        folder = ensure_tiny_model(SPEC, cache_dir=workdir / "models")
        trainer = trainer_seconds_per_step(folder, args.photos.resolve(), workdir, args.steps,
                                           args.background_loss_weight)
        bare = bare_seconds_per_step(folder, args.steps)
    print(f"model: hidden {SPEC.attention_head_dim * SPEC.num_attention_heads}, {SPEC.num_layers} double + "
          f"{SPEC.num_single_layers} single blocks, {RESOLUTION} px, rank {RANK}, torch threads "
          f"{torch.get_num_threads()}")
    print(f"trainer_s_per_step={trainer:.4f}")
    print(f"bare_s_per_step={bare:.4f}")
    print(f"overhead_ratio={trainer / bare:.3f}")


if __name__ == "__main__":
    main()
