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
def prepare(config: ConfigArg, set_: SetOption = None) -> None:
    """Crop the subject's photos around the face, check them, and write data/ with a QA page."""
    from lookalike.data.prepare import prepare as prepare_photos

    prepare_photos(_load(config, set_), console)


@app.command()
def train(
    config: ConfigArg,
    set_: SetOption = None,
    run: Annotated[str, typer.Option(help="Run name; a [[sweep.experiments]] name applies its overrides.")] = "default",
    resume: Annotated[bool, typer.Option(help="Continue the run from its latest checkpoint.")] = False,
) -> None:
    """Train one LoRA run."""
    from lookalike.train.trainer import train as train_run

    from lookalike.sweep.plan import config_for_run

    train_run(config_for_run(_load(config, set_), run), run, resume=resume, console=console)


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
    config: Annotated[Optional[Path], typer.Argument(help="The study's config: score its runs' images.")] = None,
    set_: SetOption = None,
    run: Annotated[Optional[str], typer.Option(help="Only this run (default: every run with images).")] = None,
    images: Annotated[Optional[Path], typer.Option(help="Without CONFIG: a folder of images to score.")] = None,
    references: Annotated[Optional[Path], typer.Option(help="Without CONFIG: the person's reference photos.")]
        = None,
    prompts: Annotated[Optional[Path], typer.Option(help="Prompts, one line for all images or one per image.")] = None,
    face_backend: Annotated[Optional[str], typer.Option(help="facenet (the study's) or dlib (offline).")] = None,
    clip_model: Annotated[Optional[str], typer.Option(help="CLIP model: hub name, local folder, or tiny.")] = None,
    all_pairs: Annotated[Optional[bool], typer.Option("--all-pairs/--paired",
                         help="CLIP Score over all prompts x all images (the study's) or image by image.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Where metrics.json and scores.csv go (default: --images).")]
        = None,
    force: Annotated[bool, typer.Option(help="Score runs again even when nothing changed.")] = False,
) -> None:
    """Score images for likeness (face distance, identity), face failures and CLIP Score."""
    from lookalike.config import evaluate_settings
    from lookalike.evaluate import evaluate_folder, evaluate_runs

    chosen = {key: value for key, value in
              {"face_backend": face_backend, "clip_model": clip_model, "all_pairs": all_pairs}.items()
              if value is not None}
    if config is not None:
        if images or references or prompts or out:
            raise LookalikeError("give CONFIG [--run NAME], or --images and --references, not both")
        options = [f"evaluate.{key}={str(value).lower() if isinstance(value, bool) else value}"
                   for key, value in chosen.items()]
        study = _load(config, (set_ or []) + options)
        if not evaluate_runs(study, console, run=run, force=force) and run is None:
            console.print("evaluate: nothing to score (no run has generated images yet, or all are up to date)")
        return
    if images is None or references is None:
        raise LookalikeError("give CONFIG [--run NAME], or --images DIR and --references DIR")
    evaluate_folder(images, references, evaluate_settings(chosen), console, prompts_file=prompts, out=out)


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
