"""lookalike ablate: the base model against a fine-tuned run, on the study's prompts with three names:

- the trigger word (what the LoRA was taught),
- the person's real name ([subject] real_name: what the base model may already know),
- a person no model knows ([ablate] unknown_name).

The study's reading: a LoRA that learned the face gains much likeness on the trigger word and changes little
on the real name (and on the unknown person). Images go to ablation/<model>/, each model generating all three
prompt sets in one pipeline load; the metrics and their changes to ablation/results.json and summary.md.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from lookalike.config import StudyConfig
from lookalike.data.images import list_images
from lookalike.display import cell, trained_base
from lookalike.errors import LookalikeError
from lookalike.evaluate.command import load_evaluator, reference_photos
from lookalike.evaluate.pareto import pareto_front
from lookalike.evaluate.scoring import aggregate, describe_images
from lookalike.generate import generate
from lookalike.store import refresh
from lookalike.workspace import Workspace, atomic_path, write_json

SHOWN = ("identity_similarity", "face_distance", "id_match_rate", "faceless", "clip_score")


def choose_run(config: StudyConfig) -> str:
    """[ablate] run, else the best run by the report's rule, else the first finished run."""
    workspace = Workspace(config.workspace)
    if config.ablate.run:
        return config.ablate.run
    done = [r for r in refresh(workspace.runs, workspace.results) if r["state"] == "done"]
    if not done:
        raise LookalikeError(f"ablate: no finished run in {workspace.runs}; train one first (lookalike run)")
    front, _ = pareto_front(done)
    return (front or done)[0]["name"]


def variant_names(config: StudyConfig) -> dict[str, str]:
    """The name each variant puts in the prompts."""
    if not config.subject.real_name:
        raise LookalikeError("subject.real_name is not set: ablate compares the trigger word with the person's "
                             "real name (e.g. real_name = \"Grace Hopper\")")
    return {"trigger word": config.subject.token, "real name": config.subject.real_name,
            "unknown person": config.ablate.unknown_name}


def prompt_sets(config: StudyConfig) -> list[tuple[str, str, str]]:
    """(variant, prompt to generate, prompt for CLIP) for every [generate] prompt and variant. CLIP is given the
    class word for every variant, so that CLIP Scores compare like with like."""
    return [(variant, config.fill(template.replace("{token}", name)),
             config.fill(template.replace("{token}", config.subject.class_word)))
            for variant, name in variant_names(config).items() for template in config.generate.prompts]


def ablate(config: StudyConfig, console: Console) -> dict:
    workspace = Workspace(config.workspace)
    sets = prompt_sets(config)  # a config mistake first, before anything is looked up
    run = choose_run(config)
    lora = workspace.run(run).lora
    if not lora.is_file():
        raise LookalikeError(f"ablate: run {run!r} has no trained LoRA ({lora})")
    generate_settings = config.generate.model_copy(update={"prompts": [prompt for _, prompt, _ in sets]})
    ablation = config.model_copy(update={"generate": generate_settings})
    folders = {"base": workspace.root / "ablation" / "base", run: workspace.root / "ablation" / run}
    generate(ablation, out=folders["base"], console=console)
    generate(ablation, loras=[lora], out=folders[run], console=console)

    evaluator = load_evaluator(config.evaluate, with_clip=True)
    reference = evaluator.reference(reference_photos(config))
    metrics: dict[str, dict[str, dict]] = {variant: {} for variant, _, _ in sets}
    for model, folder in folders.items():
        paths = list_images(folder, "ablation images")
        rows = describe_images(paths)
        variant_of = {}
        for row in rows:
            variant, _, clip_prompt = next(s for s in sets if s[1] == row.prompt)
            row.clip_prompt, variant_of[row.image] = clip_prompt, variant
        evaluator.score(paths, rows, reference)
        for variant in metrics:
            metrics[variant][model] = aggregate([r for r in rows if variant_of[r.image] == variant])

    base = trained_base(config.model.base, config.model.checkpoint)
    result = {"run": run, "base_model": base, "face_backend": evaluator.backend.name,
              "names": variant_names(config),
              "metrics": metrics, "reading": reading(metrics, run)}
    write_json(workspace.root / "ablation" / "results.json", result)
    with atomic_path(workspace.root / "ablation" / "summary.md") as tmp:
        tmp.write_text(summary(result))
    console.print(table(result))
    console.print(result["reading"], highlight=False, soft_wrap=True)
    return result


def _change(metrics: dict, run: str, variant: str, key: str) -> float | None:
    base, tuned = metrics[variant]["base"].get(key), metrics[variant][run].get(key)
    return None if base is None or tuned is None else tuned - base


def reading(metrics: dict, run: str) -> str:
    gains = {v: _change(metrics, run, v, "identity_similarity") for v in metrics}
    said = ", ".join(f"{v} {'n/a (no face)' if g is None else f'{g:+.3f}'}" for v, g in gains.items())
    return (f"identity similarity, fine-tuned minus base: {said}. The study's reading: a LoRA that learned the "
            "face gains much on the trigger word and changes little on the real name and the unknown person.")


def table(result: dict) -> Table:
    run, metrics = result["run"], result["metrics"]
    out = Table("prompts with", *SHOWN, title=f"ablation: base model → {run} (change)")
    for variant in metrics:
        cells = []
        for key in SHOWN:
            base, tuned = metrics[variant]["base"].get(key), metrics[variant][run].get(key)
            cells.append(f"{cell(base)} → {cell(tuned)} ({cell(_change(metrics, run, variant, key), signed=True)})")
        out.add_row(f"{variant}: {result['names'][variant]}", *cells)
    return out


def summary(result: dict) -> str:
    run, metrics = result["run"], result["metrics"]
    lines = [f"# Ablation: base model {result['base_model']} against run {run}", "",
             "| prompts with | " + " | ".join(f"{k}: base / tuned / change" for k in SHOWN) + " |",
             "|---|" + "---|" * len(SHOWN)]
    for variant in metrics:
        cells = [f"{metrics[variant]['base'].get(k)} / {metrics[variant][run].get(k)} / "
                 f"{cell(_change(metrics, run, variant, k), signed=True)}" for k in SHOWN]
        lines.append(f"| {variant} ({result['names'][variant]}) | " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", result["reading"], ""])
