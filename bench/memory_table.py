"""The README's table of the memory each hub base needs to train in a study at 1024 px (each at its own size: SD 1.x
at 512): `train --dry-run`'s estimate (bf16, rank 16, batch 1, the attention preset) with and without gradient
checkpointing, a quantised frozen base, and the base offloaded block by block (train.offload: the blocks' weights
in CPU memory), plus the framework's own ~1 GB. Built on the meta device from each
base's published architecture: no download, no GPU, a few seconds a base.

    python bench/memory_table.py            # Markdown rows, one per hub base
"""

from __future__ import annotations

from lookalike.config import StudyConfig
from lookalike.models.base import quiet_libraries, training_resolution
from lookalike.models.families import KNOWN_BASES
from lookalike.train.memory import FRAMEWORK_GB, count_parameters, estimate, transformer_config

SETTINGS = {"bf16": {}, "+ checkpointing": {"gradient_checkpointing": True},
            "int8 + checkpointing": {"gradient_checkpointing": True, "base_quantization": "int8"},
            "nf4 + checkpointing": {"gradient_checkpointing": True, "base_quantization": "nf4"},
            "offload": {"offload": True}}


def config_for(base: str) -> StudyConfig:
    return StudyConfig.model_validate({"name": "table", "workspace": "unused",
                                       "subject": {"token": "sks", "images": "unused"},
                                       "model": {"base": base}, "data": {"resolution": 1024},
                                       "train": {"rank": 16, "batch_size": 1, "target_modules": "attention"}})


def main() -> None:
    quiet_libraries()
    print("| base | parameters | size | " + " | ".join(SETTINGS) + " |")
    print("|---|---|---|" + "---|" * len(SETTINGS))
    for base, info in KNOWN_BASES.items():
        if info.architecture is None:  # tiny models
            continue
        config = config_for(base)
        t = config.train
        counts = count_parameters(transformer_config(config), t.rank, t.lora_alpha, t.target_modules, info.family)
        cells = [estimate(config.model_copy(update={"train": t.model_copy(update=change)}), "bf16", counts).total
                 + FRAMEWORK_GB for change in SETTINGS.values()]
        print(f"| `{base}` | {counts.frozen / 1e9:.1f} B | {training_resolution(config)} px | "
              + " | ".join(f"{gb:.0f} GB" for gb in cells) + " |")


if __name__ == "__main__":
    main()
