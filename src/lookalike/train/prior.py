"""The class images of prior preservation ([prior]): taken from a folder, or drawn once by the base model itself
(no LoRA) with the class prompt at the run's size, one seed each, into workspace/prior/<base>-<size>/ (a
fine-tune's into prior/<base>+<checkpoint>-<size>/) with `lookalike generate`'s sidecars, so an interrupted
drawing continues and a changed setting draws again. That folder's index.html shows them, and so does
data/qa.html."""

from __future__ import annotations

import html
from pathlib import Path

from rich.console import Console

from lookalike.config import StudyConfig
from lookalike.data.dataset import TrainingImage
from lookalike.data.images import list_images
from lookalike.data.prepare import write_qa_pages
from lookalike.display import base_label
from lookalike.errors import LookalikeError
from lookalike.generate import generate, image_jobs
from lookalike.models.base import guidance_scales, training_resolution
from lookalike.workspace import Workspace, atomic_path


def class_prompt(config: StudyConfig) -> str:
    return config.fill(config.prior.class_prompt)


def drawing_config(config: StudyConfig) -> StudyConfig:
    """The settings class images are drawn with: the class prompt, seeds 0 to N - 1, the study's first guidance
    scale, the base trained on alone (what the LoRA should keep drawing for the class), at the run's training
    size."""
    g = config.generate.model_copy(update={
        "base": None, "prompts": [config.prior.class_prompt], "seeds": list(range(config.prior.num_class_images)),
        "guidance_scales": [guidance_scales(config, config.model.base)[0] or 0.0], "lora_scales": [1.0],
        "fuse_lora": False, "resolution": training_resolution(config)})
    return config.model_copy(update={"generate": g})


def class_folder(config: StudyConfig) -> Path:
    """prior/<base>-<size>/, or prior/<base>+<checkpoint>-<size>/ for a fine-tune's: each drawn by its own model."""
    fine_tune = f"+{config.model.checkpoint.stem}" if config.model.checkpoint is not None else ""
    return Workspace(config.workspace).root / "prior" / \
        f"{base_label(config.model.base)}{fine_tune}-{training_resolution(config)}"


def class_images(config: StudyConfig, console: Console) -> list[TrainingImage]:
    """The class examples of a run (none when [prior] num_class_images is 0), each captioned with the class
    prompt."""
    wanted = config.prior.num_class_images
    if not wanted:
        return []
    if config.prior.images is not None:
        files = list_images(config.prior.images, "prior.images")
        if len(files) < wanted:
            raise LookalikeError(f"prior.images: {config.prior.images} holds {len(files)} images, and "
                                 f"prior.num_class_images asks for {wanted}")
        return [TrainingImage(path, class_prompt(config)) for path in files[:wanted]]
    drawing = drawing_config(config)
    folder = generate(drawing, out=class_folder(config), console=console)
    paths = [folder / f"{job.stem}.png" for job in image_jobs(drawing, with_lora=False)]
    _write_page(folder, paths, class_prompt(config))  # shown here, and in qa.html
    write_qa_pages(config)
    return [TrainingImage(path, class_prompt(config)) for path in paths]


def _write_page(folder: Path, paths: list[Path], prompt: str) -> None:
    cards = "".join(f'<figure><img src="{html.escape(p.name)}" width="192"><figcaption>{html.escape(p.stem)}'
                    "</figcaption></figure>" for p in paths)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>lookalike: class images</title></head><body>"
            f"<h1>Class images (prior preservation)</h1><p>{len(paths)} images of “{html.escape(prompt)}”, drawn by "
            f"the base model alone.</p><div style='display:flex;flex-wrap:wrap;gap:8px'>{cards}</div></body></html>")
    with atomic_path(folder / "index.html") as tmp:
        tmp.write_text(page)
