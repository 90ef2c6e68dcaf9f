"""A model card for an exported run's LoRA (`lookalike export --card`): README.md beside the file, as the Hugging
Face Hub reads one (YAML front matter: base model, tags, trigger word, a widget of its images), saying how to load
it, what lookalike measured of it (likeness and prompt adherence, and the models that measured them) and the
settings it was trained with. A few of its images are copied beside it, each with the code that draws it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lookalike.config import StudyConfig
from lookalike.display import base_label, cell, trained_base
from lookalike.errors import LookalikeError
from lookalike.models.base import base_info, resolve_base, training_resolution
from lookalike.models.families import base_family
from lookalike.models.families.interface import TextEncoding
from lookalike.workspace import RunPaths, atomic_path, read_json

# The card's first line after its front matter: a README.md without it is someone else's and is never written over.
MARK = "<!-- written by `lookalike export --card`, which writes it again: edit a copy -->"
SHOWN_IMAGES = 4
MEASURES = (("identity_similarity", "identity similarity (cosine, higher is more alike)"),
            ("face_distance", "face distance (lower is more alike)"),
            ("id_match_rate", "share of images whose face passes for the person"),
            ("faceless", "images without a face"),
            ("several_faces", "images with several faces"),
            ("clip_score", "CLIP Score (prompt adherence)"))


Shown = list[tuple[Path, str, dict]]  # (a run's image, its name in the card's images/, its sidecar)


def card_plan(run: RunPaths, checkpoint: str, lora_file: Path) -> Shown:
    """The images the card of `lora_file` will show: the first SHOWN_IMAGES of the run's LoRA at `checkpoint` at
    full strength, of those that file drew (an image of a best step since moved on is another LoRA's). Refused,
    before anything is written, where the card would write over a file lookalike did not write: a README.md that is
    not its card, or an image of another content in a folder without its card."""
    card = lora_file.parent / "README.md"
    ours = card.is_file() and MARK in card.read_text(errors="replace")
    if card.is_file() and not ours:
        raise LookalikeError(f"{card}: a README.md that lookalike did not write is there; export with --out into "
                             "another folder")
    shown = []
    for image in run.images_made_by(checkpoint, run.lora_sha256(checkpoint))[0]:
        facts = read_json(image.with_suffix(".json"))
        if facts.get("lora_scale") in (None, 1.0):  # None: one strength, the LoRA's own
            shown.append((image, f"{run.name}-{checkpoint}-{image.name}", facts))
    shown = shown[:SHOWN_IMAGES]
    for image, name, _ in shown if not ours else []:
        there = lora_file.parent / "images" / name
        if there.is_file() and there.read_bytes() != image.read_bytes():
            raise LookalikeError(f"{there}: a file lookalike did not write is there; export with --out into another "
                                 "folder")
    return shown


def write_card(config: StudyConfig, run: RunPaths, checkpoint: str, lora_file: Path, layout: str,
               shown: Shown) -> Path:
    """README.md beside `lora_file` (the run's LoRA at `checkpoint`, exported in `layout`), and images/ with the
    images card_plan chose."""
    for image, name, _ in shown:
        (lora_file.parent / "images").mkdir(parents=True, exist_ok=True)
        with atomic_path(lora_file.parent / "images" / name) as tmp:
            shutil.copyfile(image, tmp)
    card = lora_file.parent / "README.md"
    with atomic_path(card) as tmp:
        tmp.write_text(_card(config, run, checkpoint, lora_file, layout, [(name, facts) for _, name, facts in shown]))
    return card


def _card(config: StudyConfig, run: RunPaths, checkpoint: str, lora_file: Path, layout: str,
          shown: list[tuple[str, dict]]) -> str:
    trained = StudyConfig.model_validate(read_json(run.config))
    status = run.read_status() or {}
    base = trained.model.base
    repo = base_info(base).repo
    family = base_family(base)
    trigger = " ".join(person.token for person in trained.people)
    step = {"final": status.get("final_step"), "best": status.get("best_step")}.get(checkpoint, checkpoint)
    lokr = trained.train.adapter == "lokr"
    adapter = "LoKr" if lokr else "LoRA"
    front = ["---", *([f"base_model: {repo}"] if repo else []),
             *(["library_name: diffusers"] if layout == "diffusers" else []),  # what loads it as it is
             f"tags: [text-to-image, lora, {'lokr, lycoris, ' if lokr else ''}diffusers, lookalike]",
             f"instance_prompt: {json.dumps(trigger)}"]
    if shown:
        front.append("widget:")
        for name, facts in shown:
            front += [f"  - text: {json.dumps(facts['prompt'])}", "    output:", f"      url: images/{name}"]
    front.append("---")
    people_words = ", ".join(f"`{person.token}` ({person.class_word})" for person in trained.people)
    on = trained_base(base_label(base), trained.model.checkpoint)
    lines = [*front, MARK, "", f"# {run.name}: a {adapter} of {people_words} on {on}", "",
             f"Trained by lookalike in the study `{config.name}`, checkpoint {checkpoint} "
             f"(step {cell(step)}). Trigger word: `{trigger}`. File: `{lora_file.name}` ({layout} layout).", "",
             "## Use it", ""]
    fine_tune = trained.model.checkpoint.name if trained.model.checkpoint else None
    lines += _usage(family, base, repo, lora_file, layout, shown[0][1] if shown else None, trigger, lokr, fine_tune)
    lines += ["", "## How well it learned", ""] + _measured(run, checkpoint)
    t = trained.train
    settings = {"rank": t.rank, "alpha": t.lora_alpha, "learning_rate": t.learning_rate,
                "lr_scheduler": t.lr_scheduler, "batch_size": t.batch_size, "optimizer": t.optimizer,
                "adapter": t.adapter, "target_modules": t.target_modules, "layer_filter": t.layer_filter,
                "resolution": training_resolution(trained), "photos": len(read_json(run.photos))
                if run.photos.is_file() else None, "seed": t.seed,
                **({"checkpoint": trained.model.checkpoint.name} if trained.model.checkpoint else {})}
    lines += ["", "## Training", "", "| setting | value |", "| --- | --- |",
              f"| base | {base_label(base)} |", f"| steps | {cell(step)} of {t.max_train_steps} |"]
    lines += [f"| {key} | {cell(value)} |" for key, value in settings.items()]
    if shown:
        lines += ["", "## Images", ""] + [f"![{facts['prompt']}](images/{name})" for name, facts in shown]
    return "\n".join(lines) + "\n"


def _usage(family, base: str, repo: str | None, lora_file: Path, layout: str, example: dict | None,
           trigger: str, lokr: bool, fine_tune: str | None) -> list[str]:
    """How to draw with the file: diffusers' stock pipeline and load_lora_weights (a LoKr: its denoiser's
    load_lora_adapter, which every family's takes), drawing the card's first image as lookalike drew it (a plain
    prompt where there is none), on the single-file fine-tune it was trained on where there is one; ComfyUI's
    loader for the other layouts."""
    if layout != "diffusers":
        return [f"Put `{lora_file.name}` in ComfyUI's `models/loras` folder and load it with a LoraLoader node "
                "(strength 1.0)" + (", or with kohya's sd-scripts" if layout == "kohya" else "") + "."]
    source = repo or str(resolve_base(base))
    if example is None or "settings" not in example:  # no image, or one drawn before sidecars held its settings
        call, seed = {"prompt": f"a photo of {trigger}"}, 0
    else:  # as generate drew it (generate.render)
        settings, guidance = example["settings"], example["guidance_scale"]
        call = {"prompt": example["prompt"], "height": settings["size"], "width": settings["size"],
                "num_inference_steps": settings["steps"], **family.guidance_arguments(guidance, False),
                **({"negative_prompt": settings["negative_prompt"]}
                   if "negative_prompt" in settings and guidance is not None else {}),
                **family.text_arguments(TextEncoding.of_image(settings))}
        seed = settings["seed"]
    arguments = "".join(f"    {key}={value!r},\n" for key, value in call.items())
    file = f"\".\", weight_name={lora_file.name!r}"
    load = (f"pipe.{family.denoiser}.load_lora_adapter({file}, prefix={family.denoiser!r})" if lokr else
            f"pipe.load_lora_weights({file})")
    pipeline, denoiser = family.pipeline_class_name, family.components[family.denoiser][1]
    if fine_tune is None:
        imported, made = pipeline, [f"pipe = {pipeline}.from_pretrained({source!r}, torch_dtype=dtype).to(device)"]
    elif family.single_file_parts is not None:  # the whole model is the file's
        overrides = "".join(f", {key}={value!r}" for key, value in family.pipeline_overrides().items())
        imported, made = pipeline, [
            f"# the fine-tune it was trained on, {fine_tune}, beside this card (or its path):",
            f"pipe = {pipeline}.from_single_file({fine_tune!r}, config={source!r}{overrides}, "
            "torch_dtype=dtype).to(device)"]
    else:  # the fine-tune's transformer in the base's pipeline
        imported, made = f"{denoiser}, {pipeline}", [
            f"# the fine-tune it was trained on, {fine_tune}, beside this card (or its path):",
            f"{family.denoiser} = {denoiser}.from_single_file({fine_tune!r}, config={source!r}, "
            f"subfolder={family.denoiser!r}, torch_dtype=dtype)",
            f"pipe = {pipeline}.from_pretrained({source!r}, {family.denoiser}={family.denoiser}, "
            "torch_dtype=dtype).to(device)"]
    return ["```python", "import torch", f"from diffusers import {imported}", "",
            'device = "cuda" if torch.cuda.is_available() else "cpu"',
            'dtype = torch.bfloat16 if device == "cuda" else torch.float32',
            *made,
            "# the folder of this card (or its Hub repository):",
            load,
            f"image = pipe(\n{arguments}    generator=torch.Generator(\"cpu\").manual_seed({seed}),\n).images[0]",
            "```"]


def _measured(run: RunPaths, checkpoint: str) -> list[str]:
    metrics = run.current_metrics(checkpoint)  # of this very file: a best step's figures go when the best moves
    if metrics is None:
        return [f"Not evaluated yet: `lookalike generate CONFIG --run {run.name} --checkpoint {checkpoint}`, then "
                f"`lookalike evaluate CONFIG --run {run.name} --checkpoint {checkpoint}` measure it."]
    # Drawn at several strengths ([generate] lora_scales), the file as it loads is the one at full strength.
    at_full = metrics.get("per_lora_scale", {}).get(str(1.0), metrics)
    references = "held-out photos, never trained on" if metrics.get("references_held_out") else "training photos"
    return ([f"Measured by lookalike on its {at_full['images']} images at full strength against "
             f"{metrics['references']} {references} (faces: {metrics['face_backend']}; CLIP: "
             f"{metrics['clip_model']}, {metrics['clip_pairs']}).", "", "| measure | value |", "| --- | --- |"]
            + [f"| {label} | {cell(at_full.get(key))} |" for key, label in MEASURES])
