"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a folder checkpoints/step-NNNNNN/ holding the LoRA tensors (safetensors) and the training
state (optimizer, LR scheduler, random generator, data order) in a file loaded with torch.load's
weights_only mode, which reads tensors and plain containers but never runs pickled code. Folders are
written under a temporary name and renamed, so a kill mid-save leaves the previous checkpoint as latest.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from lookalike.workspace import atomic_dir

LORA_FILE = "lora.safetensors"
STATE_FILE = "training_state.pt"


def checkpoint_dir(checkpoints: Path, step: int) -> Path:
    return checkpoints / f"step-{step:06d}"


def list_checkpoints(checkpoints: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of an interrupted save are ignored)."""
    if not checkpoints.is_dir():
        return []
    found = [p for p in checkpoints.glob("step-*") if (p / STATE_FILE).is_file() and (p / LORA_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def save_checkpoint(checkpoints: Path, step: int, lora: dict[str, torch.Tensor], state: dict[str, Any],
                    keep: int) -> Path:
    """Write one checkpoint atomically, then delete all but the newest `keep`."""
    from safetensors.torch import save_file

    target = checkpoint_dir(checkpoints, step)
    with atomic_dir(target) as tmp:
        save_file(lora, str(tmp / LORA_FILE))
        torch.save(state, tmp / STATE_FILE)
    for old in list_checkpoints(checkpoints)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors.torch import load_file

    lora = load_file(str(folder / LORA_FILE))
    state = torch.load(folder / STATE_FILE, weights_only=True, map_location="cpu")
    return lora, state
