"""The command line: parses, calls one function, prints. Heavy libraries load inside the commands."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from lookalike.errors import LookalikeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Teach FLUX.1-dev one person's face with LoRA, and prove how well it learned.")
console = Console()
error_console = Console(stderr=True)

ConfigArg = Annotated[Path, typer.Argument(help="The study's config file (TOML, JSON or YAML).")]
SetOption = Annotated[Optional[list[str]], typer.Option("--set", help="Override a key: section.key=value.")]


def _load(config: Path, overrides: list[str] | None):
    from lookalike.config import load_config
    from lookalike.models.base import quiet_libraries

    study = load_config(config, overrides or [])
    quiet_libraries()
    return study


@app.command()
def train(
    config: ConfigArg,
    set_: SetOption = None,
    run: Annotated[str, typer.Option(help="Run name; a [[sweep.experiments]] name applies its overrides.")] = "default",
    resume: Annotated[bool, typer.Option(help="Continue the run from its latest checkpoint.")] = False,
) -> None:
    """Train one LoRA run."""
    from lookalike.train.trainer import train as train_run

    study = _load(config, set_)
    if any(e.name == run for e in study.sweep.experiments):
        study = study.for_experiment(run)
    train_run(study, run, resume=resume, console=console)


@app.command()
def generate(
    config: ConfigArg,
    set_: SetOption = None,
    run: Annotated[Optional[str], typer.Option(help="Use this run's LoRA.")] = None,
    lora: Annotated[Optional[Path], typer.Option(help="Use this LoRA file (.safetensors).")] = None,
) -> None:
    """Generate the config's prompts x seeds x guidance scales, with a LoRA or with the base model alone."""
    from lookalike.generate import generate as generate_images

    generate_images(_load(config, set_), run=run, lora_file=lora, console=console)


@app.command()
def evaluate(
    images: Annotated[Path, typer.Option(help="Folder of generated images (JSON sidecars give their prompts).")],
    references: Annotated[Path, typer.Option(help="Folder of the subject's reference photos.")],
    prompts: Annotated[Optional[Path], typer.Option(help="Prompts, one line for all images or one per image.")] = None,
    face_backend: Annotated[str, typer.Option(help="facenet (the study's) or dlib (offline).")] = "facenet",
    clip_model: Annotated[str, typer.Option(help="CLIP model: hub name, local folder, or tiny.")] =
        "openai/clip-vit-large-patch14",
    out: Annotated[Optional[Path], typer.Option(help="Where metrics.json and scores.csv go (default: --images).")]
        = None,
) -> None:
    """Score images for likeness to the references (face distance, identity), face failures and CLIP Score."""
    from rich.table import Table

    from lookalike.evaluate.clip_score import ClipScorer
    from lookalike.data.images import list_images
    from lookalike.evaluate.scoring import aggregate, build_reference, prompts_for, score_images, write_results
    from lookalike.faces import load_backend
    from lookalike.models.base import quiet_libraries
    from lookalike.models.clip import load_clip

    quiet_libraries()
    paths = list_images(images, "--images")
    texts = prompts_for(paths, prompts)
    backend = load_backend(face_backend)
    reference = build_reference(backend, references, backend.default_min_score)
    scorer = ClipScorer(*load_clip(clip_model)) if any(t is not None for t in texts) else None
    rows = score_images(paths, texts, backend, reference, scorer)
    metrics = {**aggregate(rows), "face_backend": backend.name, "face_backend_version": backend.version,
               "same_person_threshold": backend.same_person_threshold, "references": reference.count,
               "clip_model": clip_model if scorer else None}
    write_results(out or images, rows, metrics)
    table = Table("metric", "value", title=f"evaluate {images}")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)


def main() -> None:
    """Entry point: a user's mistake is one line on stderr and exit code 2, never a traceback."""
    try:
        app(standalone_mode=False)
    except LookalikeError as error:
        error_console.print(f"error: {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        error_console.print("interrupted")
        sys.exit(130)
    except Exception as error:  # click's own usage errors
        import click

        if isinstance(error, click.ClickException):
            error.show()
            sys.exit(error.exit_code)
        if isinstance(error, click.exceptions.Abort):
            sys.exit(1)
        raise
