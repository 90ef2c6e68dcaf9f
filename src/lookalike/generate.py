"""Images for prompts x seeds x guidance scales (x LoRA strengths), from a run's LoRA, a given LoRA file, or the
base model.

Each image is saved with a JSON sidecar (prompt, seed, guidance, steps, size, LoRA, base) whose `settings` are
everything that made the image, the LoRA files' contents and a fine-tuned base's file included. An image whose
sidecar holds the settings asked for now is skipped, so an interrupted generation continues where it stopped; any
other is made again, so no image is ever shown under settings that did not make it. The same settings and seed
give the same image: the starting noise comes from a CPU generator seeded per image.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from lookalike import display
from lookalike.config import StudyConfig
from lookalike.errors import LookalikeError
from lookalike.models.base import (
    base_info,
    check_drawing_base,
    drawing_base,
    guidance_scales,
    inference_dtype,
    inference_steps,
    load_pipeline,
    pick_device,
    text_encoding,
    training_resolution,
)
from lookalike.models.checkpoint import drawn_checkpoint, resolve_drawing_base
from lookalike.models.families import FAMILIES, base_family, pipeline_family
from lookalike.models.families.interface import TextEncoding
from lookalike.models.lora import check_lora_base, load_lora_into
from lookalike.progress import progress_bar
from lookalike.trained_on import trained_base_problem
from lookalike.workspace import Workspace, atomic_path, checked_checkpoint, file_sha256, write_json


@dataclass(frozen=True)
class ImageJob:
    prompt_index: int
    prompt: str
    seed: int
    guidance: float | None  # None: a base that takes no guidance
    lora_scale: float | None = None  # the LoRAs' strength, a factor of [generate] lora_scales; None: as given

    @property
    def stem(self) -> str:
        guidance = "" if self.guidance is None else f"_g{self.guidance:g}"
        strength = "" if self.lora_scale is None else f"_l{self.lora_scale:g}"
        return f"p{self.prompt_index:02d}_s{self.seed}{guidance}{strength}"


def offload_pipeline(pipe, device) -> None:
    """[generate] offload: every component's weights in CPU memory, each block brought to `device` as it runs
    (diffusers' group offloading, one block per group; on CUDA the copies run on a stream of their own, each block's
    while the one before it works)."""
    pipe.enable_group_offload(onload_device=device, offload_type="block_level", num_blocks_per_group=1,
                              use_stream=device.type == "cuda")


def render(pipe, *, seed: int, guidance: float | None, steps: int, size: int, text: TextEncoding,
           prompt: str | None = None, embeddings: dict | None = None, output_type: str = "pil", callback=None,
           negative_prompt: str | None = None):
    """One image from a base's pipeline: by prompt (and a negative prompt, where the family takes one), or by
    precomputed embeddings (training samples: the keyword arguments of the family's pipeline_embeddings).
    callback: diffusers' callback_on_step_end, called after every denoising step (progress bars)."""
    import torch

    family = pipeline_family(pipe)
    if embeddings is None:  # the pipeline encodes the prompt
        family.check_text(pipe, text)
    guided = family.guidance_arguments(guidance, by_embeddings=embeddings is not None)
    if negative_prompt is not None and guidance is not None:
        guided["negative_prompt"] = negative_prompt
    result = pipe(
        prompt=prompt,
        **(embeddings or {}),
        height=size,
        width=size,
        num_inference_steps=steps,
        **guided,
        **family.text_arguments(text),
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type=output_type,
        callback_on_step_end=callback,
    )
    # Images are RGB everywhere after this (scoring, grids, the demo): a pipeline that draws RGBA (Qwen-Image 2.1)
    # has its alpha channel dropped.
    image = result.images[0]
    return image.convert("RGB") if output_type == "pil" and image.mode != "RGB" else image


def output_folder(config: StudyConfig, run: str | None, loras: list[tuple[Path, float]],
                  checkpoint: str = "final") -> Path:
    workspace = Workspace(config.workspace)
    if run is not None:
        return workspace.run(run).images_at(checkpoint)
    if loras:
        named = "|".join(f"{Path(path).resolve()}x{weight:g}" for path, weight in loras)
        digest = hashlib.sha256(named.encode()).hexdigest()[:8]
        return workspace.generated / f"{'+'.join(Path(path).stem for path, _ in loras)}-{digest}"
    return workspace.generated / "base"


def lora_fingerprints(adapters: list[tuple[Path, float]]) -> list[dict[str, Any]]:
    """Each LoRA file by its content (not its name: a retrained run keeps its file name) and its weight."""
    fingerprints = []
    for path, weight in adapters:
        fingerprints.append({"sha256": file_sha256(path), "weight": weight})
    return fingerprints


def job_settings(config: StudyConfig, job: ImageJob, loras: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything that makes a job's image what it is; an image is current only while its sidecar holds these
    (a LoRA's weight there is the one the image was made at: its own times the job's strength)."""
    g = config.generate
    loras = [{**lora, "weight": lora["weight"] * strength(job)} for lora in loras]
    settings = {"prompt": job.prompt, "seed": job.seed, "guidance_scale": job.guidance,
                "steps": inference_steps(config), "size": image_size(config), "base_model": drawing_base(config),
                "revision": config.model.revision, **text_encoding(config.model).settings(),
                "vae_tiling": g.vae_tiling, "fuse_lora": g.fuse_lora and bool(loras), "loras": loras}
    # Only when given: images made before the setting existed stay current.
    checkpoint = drawn_checkpoint(config)
    return settings | ({"negative_prompt": g.negative_prompt} if g.negative_prompt is not None else {}) | (
        {"checkpoint": checkpoint} if checkpoint is not None else {})


def image_size(config: StudyConfig) -> int:
    """The side of generated images: [generate] resolution, else the run's training resolution."""
    return config.generate.resolution or training_resolution(config)


def current_image(folder: Path, job: ImageJob, settings: dict[str, Any]) -> Path | None:
    """The job's image in `folder` if its sidecar says these settings made it; None if missing or made otherwise."""
    image, sidecar = folder / f"{job.stem}.png", folder / f"{job.stem}.json"
    if not (image.is_file() and sidecar.is_file()):
        return None
    try:
        made_with = json.loads(sidecar.read_text()).get("settings")
    except (ValueError, AttributeError):
        return None
    return image if made_with == json.loads(json.dumps(settings)) else None


def image_jobs(config: StudyConfig, with_lora: bool = True) -> list[ImageJob]:
    """Prompts x seeds x guidance scales, and x [generate] lora_scales where a LoRA is applied and more than its
    trained strength is asked for."""
    g = config.generate
    strengths = g.lora_scales if with_lora and g.lora_scales != [1.0] else [None]
    return [
        ImageJob(i, config.fill(prompt), seed, guidance, scale)
        for (i, prompt), seed, guidance, scale in itertools.product(enumerate(g.prompts), g.seeds,
                                                                    guidance_scales(config), strengths)
    ]


def strength(job: ImageJob) -> float:
    return 1.0 if job.lora_scale is None else job.lora_scale


def adapter_names(count: int) -> list[str]:
    return [f"lora{i}" for i in range(count)]


def apply_loras(pipe, adapters: list[tuple[Path, float]], fuse: bool) -> list[dict[str, Any]]:
    """Load LoRA files at their weights into the pipeline's transformer as diffusers' weighted adapters, exactly
    as `load_lora_weights` does for a user; with `fuse`, then merge them into the weights (no cost per step, but
    in bf16 the smallest changes round away). Returns what each file says of itself, for the sidecars."""
    if not adapters:
        return []
    names = adapter_names(len(adapters))
    info = [{"file": str(path), "weight": weight, **load_lora_into(pipe, path, adapter_name=name)}
            for name, (path, weight) in zip(names, adapters)]
    pipe.set_adapters(names, [weight for _, weight in adapters])
    if fuse:
        pipe.fuse_lora(adapter_names=names)
        pipe.unload_lora_weights()
    return info


def _check_negative_prompt(config: StudyConfig) -> None:
    if config.generate.negative_prompt is None:
        return
    base = drawing_base(config)
    if not (base_family(base).takes_negative_prompt and base_info(base).guidance):
        guiding = ", ".join(sorted(family.name for family in FAMILIES.values() if family.takes_negative_prompt))
        raise LookalikeError(f"generate.negative_prompt: {base} does not guide against a negative prompt "
                             f"(the bases of {guiding} do); leave it unset for this base")


def generate(config: StudyConfig, run: str | None = None, loras: list[Path] = (),
             weights: list[float] | None = None, console: Console | None = None, out: Path | None = None,
             checkpoint: str = "final") -> Path:
    """Generate every missing image of the config's prompts x seeds x guidance scales; return the folder
    (`out`, or the run's images/ (images-<checkpoint>/ for another than the final) or a folder under
    generated/). The LoRA is the run's at `checkpoint` (final, best, or a kept step), or the given files at
    their weights (diffusers' weighted adapters), or none: the base model."""
    console = console or display.console()
    checkpoint = checked_checkpoint(checkpoint)
    if run is not None and loras:
        raise LookalikeError("give --run or --lora, not both")
    if checkpoint != "final" and run is None:
        raise LookalikeError("--checkpoint picks one of a run's LoRAs: give --run NAME")
    if run is not None:
        paths = Workspace(config.workspace).run(run)
        loras = [paths.lora_at(checkpoint)]
        if not loras[0].is_file():
            raise LookalikeError(f"run {run!r} has no trained LoRA yet ({loras[0]}); train it first")
        problem = trained_base_problem(paths, config)
        if problem:
            raise LookalikeError(problem)
    weights = list(weights) if weights is not None else [1.0] * len(loras)
    if len(weights) != len(loras):
        raise LookalikeError(f"--weights: {len(weights)} weights for {len(loras)} LoRA files")
    adapters = list(zip(loras, weights))
    check_drawing_base(config)
    for path, _ in adapters:  # refuse a bad file before loading a multi-GB model
        check_lora_base(path, drawing_base(config))
    _check_negative_prompt(config)
    folder = out or output_folder(config, run, adapters, checkpoint)
    if "guidance_scales" in config.generate.model_fields_set and guidance_scales(config) == [None]:
        console.print(f"note: {drawing_base(config)} takes no guidance: generate.guidance_scales is not used, and each "
                      "prompt and seed makes one image")
    fingerprints = lora_fingerprints(adapters)
    planned = [(job, job_settings(config, job, fingerprints)) for job in image_jobs(config, with_lora=bool(adapters))]
    jobs = [(job, settings) for job, settings in planned if current_image(folder, job, settings) is None]
    if not jobs:
        console.print(f"generate: all images already in {folder}")
        return folder

    # 1. The pipeline with the LoRAs (as diffusers' adapters, or fused into the weights when asked), then
    # compiled if asked.
    device = pick_device()
    pipe = load_pipeline(resolve_drawing_base(config), dtype=inference_dtype(device))
    pipe = pipe if config.generate.offload else pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if config.generate.vae_tiling:
        pipe.vae.enable_tiling()
    # The adapters start at the first job's strength (the only one when fused: lora_scales then has one).
    applied = strength(jobs[0][0])
    lora_info = apply_loras(pipe, [(path, weight * applied) for path, weight in adapters],
                            fuse=config.generate.fuse_lora)
    if config.generate.offload:  # after the LoRAs, fused ones too: the copies kept in CPU memory hold them
        offload_pipeline(pipe, device)
    if config.generate.compile:
        getattr(pipe, pipeline_family(pipe).denoiser).compile_repeated_blocks(fullgraph=True)

    # 2. One image per job, each with its sidecar, written atomically; the resolved config beside them.
    write_json(folder / "config.json", config.to_json_dict())
    with progress_bar(console, "generate", total=len(jobs)) as bar:
        for job, settings in jobs:
            if adapters and not config.generate.fuse_lora and strength(job) != applied:
                applied = strength(job)
                pipe.set_adapters(adapter_names(len(adapters)), [weight * applied for _, weight in adapters])
            image = render(pipe, prompt=job.prompt, seed=job.seed, guidance=job.guidance, steps=settings["steps"],
                           size=settings["size"], text=TextEncoding.of_image(settings),
                           negative_prompt=config.generate.negative_prompt)
            # An old image of this name loses its sidecar first and gets the new one last: the sidecar marks the
            # job done, and at no moment does an image sit beside settings that did not make it.
            (folder / f"{job.stem}.json").unlink(missing_ok=True)
            with atomic_path(folder / f"{job.stem}.png") as tmp:
                image.save(tmp, format="PNG")
            write_json(folder / f"{job.stem}.json", {
                "prompt": job.prompt, "prompt_index": job.prompt_index, "seed": job.seed,
                "guidance_scale": job.guidance, "lora_scale": job.lora_scale, "steps": settings["steps"],
                "size": settings["size"],
                "base_model": drawing_base(config), "run": run, "checkpoint": checkpoint if run else None,
                "loras": [{**info, "weight": weight * strength(job)} for info, (_, weight) in zip(lora_info, adapters)],
                "settings": settings,
            })
            bar.update()
    console.print(f"generate: {len(jobs)} images in {folder}")
    return folder
