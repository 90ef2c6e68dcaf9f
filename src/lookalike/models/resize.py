"""Lower a LoRA's rank, as kohya's resize_lora does: each layer's weight change ΔW = (alpha / r) · B @ A becomes
its best approximation of the new rank (Eckart-Young: its largest singular values), from QR factors of A and B,
never the whole ΔW. What each layer keeps is the share of ΔW's squared Frobenius norm its kept singular values
hold. The file says alpha = rank, so its scale is 1 in every reader, as all of lookalike's files. A merge lowered
so is kohya's SVD merge (merge_at_rank).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from lookalike.errors import LookalikeError
from lookalike.models.lora import TEXT_ENCODERS, denoiser_of, modules_of, read_lora, save_lora, text_encoder_configs
from lookalike.models.merge import merge_loras


def lower_rank(tensors: dict[str, Any], scale: float, rank: int) -> tuple[dict[str, Any], dict[str, tuple]]:
    """The tensors (diffusers' layout) of a LoRA at `rank` whose every layer changes its weight by the best rank-
    `rank` approximation of `scale` · B @ A; and each layer's (kept, whole) squared Frobenius norm."""
    import torch

    lowered, norms = {}, {}
    for component in (denoiser_of(tensors), *TEXT_ENCODERS):
        for name, (down, up) in modules_of(tensors, component).items():
            # ΔW = scale · Qu Ru (Qd Rd)^T: its singular values are the small core's, Ru Rd^T.
            q_up, r_up = torch.linalg.qr(up.double())
            q_down, r_down = torch.linalg.qr(down.double().T)
            u, s, vh = torch.linalg.svd(scale * r_up @ r_down.T)
            kept = min(rank, s.numel())
            root = s[:kept].sqrt()  # the singular values split evenly between the two factors
            lowered[f"{component}.{name}.lora_A.weight"] = (root[:, None] * (vh[:kept] @ q_down.T)).float().contiguous()
            lowered[f"{component}.{name}.lora_B.weight"] = ((q_up @ u[:, :kept]) * root).float().contiguous()
            norms[f"{component}.{name}"] = (s[:kept].square().sum().item(), s.square().sum().item())
    return lowered, norms


def resize_lora(source: Path, out: Path, rank: int, source_name: str | None = None) -> tuple[Path, dict[str, tuple]]:
    """Write `source` at `rank` to `out`; return it and each layer's (kept, whole) squared Frobenius norm.
    `source_name`: what the header's resized_from calls the source (default: its file name)."""
    from peft import LoraConfig

    out = Path(out)
    if rank < 1:
        raise LookalikeError(f"--rank: a LoRA's rank is 1 or more (got {rank})")
    tensors, config, info = read_lora(source)
    if rank >= config["r"]:
        raise LookalikeError(f"--rank: {source} has rank {config['r']}; resize lowers it (give a rank below "
                             f"{config['r']})")
    lowered, norms = lower_rank(tensors, config["lora_alpha"] / config["r"], rank)
    denoiser = denoiser_of(lowered)
    peft_config = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(modules_of(lowered, denoiser)))
    resized_from = f"{source_name or Path(source).name} (rank {config['r']})"
    save_lora(out, lowered, peft_config, {**info, "resized_from": resized_from},
              text_encoder_configs=text_encoder_configs(lowered, rank, rank))
    return out, norms


def merge_at_rank(first: Path, second: Path, out: Path, weights: tuple[float, float], rank: int
                  ) -> tuple[Path, dict[str, tuple]]:
    """kohya's SVD merge: the exact merge of two LoRAs (merge_loras, in a temporary file beside `out`) lowered to
    `rank` (the command checks `out` before anything is written)."""
    out = Path(out)
    exact_rank = sum(read_lora(source)[1]["r"] for source in (first, second))
    if rank >= exact_rank:
        raise LookalikeError(f"--rank: the merge of {first} and {second} has rank {exact_rank}; give a lower rank, or "
                             "leave --rank out for the exact merge")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as folder:
        exact = merge_loras(first, second, Path(folder) / f"{out.stem}-exact.safetensors", weights)
        return resize_lora(exact, out, rank, source_name="the exact merge")


def kept_share(norms: dict[str, tuple]) -> tuple[float, float, str]:
    """(the share of the whole LoRA's weight change kept, the smallest share a layer kept, that layer)."""
    whole = sum(total for _, total in norms.values())
    share = sum(kept for kept, _ in norms.values()) / whole if whole else 1.0
    worst = min(norms, key=lambda name: norms[name][0] / norms[name][1] if norms[name][1] else 1.0)
    kept, total = norms[worst]
    return share, kept / total if total else 1.0, worst
