"""The command line: parses, calls one function, prints. Heavy libraries load inside the commands."""

from __future__ import annotations

import math
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.exceptions import TyperException

from lookalike import display
from lookalike.config import evaluate_settings, load_config
from lookalike.demo import launch
from lookalike.demo_guard import credentials
from lookalike.display import result_columns, shown
from lookalike.errors import LookalikeError, filesystem_problem
from lookalike.evaluate.command import evaluate_folder, evaluate_group_folder, evaluate_runs
from lookalike.generate import generate as generate_images
from lookalike.models.base import quiet_libraries
from lookalike.models.families import KNOWN_BASES, family_titles
from lookalike.models.card import card_plan, write_card
from lookalike.models.export import export_lora
from lookalike.models.merge import merge_loras
from lookalike.models.resize import kept_share, merge_at_rank, resize_lora
from lookalike.outputs import check_lora_out
from lookalike.study import run_study
from lookalike.report.ablate import ablate as run_ablation
from lookalike.store import refresh, sort_runs
from lookalike.sweep.plan import config_for_run, experiments
from lookalike.sweep.runner import sweep as run_sweep
from lookalike.train.memory import dry_run_lines, parse_gpu_memory
from lookalike.workspace import UNFINISHED, Workspace, check_run_name, checked_checkpoint

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help=f"Teach a diffusion model ({escape(family_titles())}) one person's face with LoRA, and prove "
                       "how well it learned.")
# Captured output (a sweep's log, a pipe) is read in wide editors, not an 80-column terminal.
console = display.console() if Console().is_terminal or "COLUMNS" in os.environ else display.console(width=140)
error_console = display.console(stderr=True)

ConfigArg = Annotated[Path, typer.Argument(help="The study's config file (TOML, JSON or YAML).")]
ForceOption = Annotated[bool, typer.Option(help="Replace --out if it exists (never a source photo, a file lookalike "
                                              "manages or a LoRA being read).")]
SetOption = Annotated[Optional[list[str]], typer.Option("--set", help="Override a key: section.key=value; section.key= "
                                                                   "(nothing after =) unsets it.")]


def _load(config: Path, overrides: list[str] | None):
    return load_config(config, overrides or [])


def _quiet() -> None:
    """Before loading models: diffusers and transformers notices off (importing them takes seconds, so only
    commands that load models do)."""
    quiet_libraries()


@app.command()
def init(
    config: Annotated[Path, typer.Argument(help="The study file to write (a new .toml file).")],
    base: Annotated[str, typer.Option(help=f"The base to train: {', '.join(KNOWN_BASES)}.")] = "flux-dev",
    photos: Annotated[str, typer.Option(help="The folder of the person's photos, relative to the study file.")]
    = "photos",
    token: Annotated[str, typer.Option(help="The trigger word the LoRA learns the person by.")] = "sks",
) -> None:
    """Write a commented starter study for a base: edit it, then `lookalike run` it."""
    from lookalike.starter import write_starter

    written = write_starter(config, base, photos, token)
    console.print(f"init: wrote {written}; check it with `lookalike train {written} --dry-run`, then "
                  f"`lookalike run {written}`")


@app.command()
def prepare(config: ConfigArg, set_: SetOption = None) -> None:
    """Crop each subject's photos around the face, check them, and write data/ with a QA page."""
    from lookalike.data.prepare import prepare_study

    prepare_study(_load(config, set_), console)


@app.command()
def caption(
    config: ConfigArg,
    set_: SetOption = None,
    model: Annotated[Optional[str], typer.Option(help="The image-to-text model (hub id or folder); default: "
                                                 "[data] captioner.")] = None,
) -> None:
    """Caption each subject's kept photos with a vision-language model into data/captions/ (edit them there), then
    prepare with those captions."""
    from lookalike.data.prepare import caption_study

    study = _load(config, set_)  # a bad config is said before the seconds of importing the models' libraries
    _quiet()
    caption_study(study, model, console)


@app.command()
def train(
    config: ConfigArg,
    set_: SetOption = None,
    run: Annotated[str, typer.Option(help="Run name; a [[sweep.experiments]] name applies its overrides.")] = "default",
    resume: Annotated[bool, typer.Option(help="Continue the run from its latest checkpoint.")] = False,
    subject: Annotated[Optional[str], typer.Option(help="Train only the person with this token (one LoRA "
                                                   "each); default: every subject of the config together.")] = None,
    processes: Annotated[int, typer.Option(min=1, help="Data-parallel processes (one per GPU; gloo on the "
                                           "CPU); each takes train.batch_size of every step's batch.")] = 1,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the run's estimated memory and stop, "
                                          "before anything is loaded.")] = False,
    gpu_memory: Annotated[Optional[str], typer.Option(help="With --dry-run: the GPU's memory (24GB, 80GB); says "
                                                      "which settings fit it.")] = None,
) -> None:
    """Train one LoRA run."""
    check_run_name(run)  # before the seconds of importing torch
    from lookalike.train.trainer import train as train_run

    if processes > 1 and "WORLD_SIZE" not in os.environ and not dry_run:
        raise typer.Exit(_launch_processes(processes))
    _quiet()
    study = _load(config, set_)
    study = config_for_run(study.for_subject(subject) if subject else study, run)
    if dry_run:
        _print_estimate(study, parse_gpu_memory(gpu_memory) if gpu_memory else None, processes)
        return
    main_rank = os.environ.get("RANK", "0") == "0"  # only the main rank of a distributed launch speaks
    distributed = "WORLD_SIZE" in os.environ
    from accelerate import PartialState  # (torch is loaded by now: the trainer's import)

    try:
        train_run(study, run, resume=resume, console=console if main_rank else display.console(quiet=True))
        if distributed:  # no rank leaves the process group while another still writes through it
            PartialState().wait_for_everyone()
    finally:
        if distributed:  # a rank of a distributed launch: leave the process group cleanly
            PartialState().destroy_process_group()


WorkersOption = Annotated[str, typer.Option(help="warm: one long-lived process per GPU trains its runs one after "
                                            "another on the base it holds; separate: a new process per run.")]


def _check_backend(backend: str, workers: str) -> None:
    if backend not in ("local", "ray"):
        raise LookalikeError(f"--backend: unknown backend {backend!r} (use local or ray)")
    if workers not in ("warm", "separate"):
        raise LookalikeError(f"--workers: unknown kind {workers!r} (use warm or separate)")


@app.command(hidden=True)
def worker() -> None:
    """A sweep's warm worker: trains the runs it is sent on stdin, one JSON line each (sweep/warm.py)."""
    from lookalike.sweep.warm import serve

    _quiet()
    code = serve(sys.stdin, console, error_console)
    if code:
        raise typer.Exit(code)


@app.command()
def sweep(
    config: ConfigArg,
    set_: SetOption = None,
    plan: Annotated[bool, typer.Option("--plan", help="Print the experiments, one per line, and stop.")] = False,
    jobs: Annotated[int, typer.Option(min=1, help="Runs at once (local backend; one GPU each).")] = 1,
    backend: Annotated[str, typer.Option(help="local (processes here) or ray (a Ray cluster).")] = "local",
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address (default: start a local one).")]
        = None,
    retry_failed: Annotated[bool, typer.Option(help="Run failed runs again (interrupted ones always resume).")]
        = False,
    workers: WorkersOption = "warm",
) -> None:
    """Train every experiment of the config; finished runs are skipped."""
    _check_backend(backend, workers)
    study = _load(config, set_)
    planned = experiments(study)
    if plan:
        for experiment in planned:
            console.print(experiment.describe(), highlight=False)
        return
    outcomes = run_sweep(study, config.resolve(), planned, console, set_ or [], jobs=jobs, backend=backend,
                         address=address, retry_failed=retry_failed, workers=workers)
    if any(o.state in UNFINISHED for o in outcomes):
        raise typer.Exit(1)


@app.command(name="run")
def run_all(
    config: ConfigArg,
    set_: SetOption = None,
    jobs: Annotated[int, typer.Option(min=1, help="Runs trained at once (local backend; one GPU each).")] = 1,
    backend: Annotated[str, typer.Option(help="local (processes here) or ray (a Ray cluster).")] = "local",
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address (default: start a local one).")]
        = None,
    workers: WorkersOption = "warm",
) -> None:
    """The whole study: prepare, train every experiment, generate, evaluate; what is done is skipped."""
    from lookalike.report.build import build_report

    _check_backend(backend, workers)
    study = _load(config, set_)
    problems = run_study(study, config.resolve(), set_ or [], console, jobs=jobs, backend=backend, address=address,
                         workers=workers)
    _print_results(study, sort=None)
    build_report(study, console)
    for problem in problems:
        console.print(f"problem: {problem}", highlight=False)
    if problems:
        raise typer.Exit(1)


@app.command()
def report(
    config: ConfigArg,
    force: Annotated[bool, typer.Option(help="Rebuild even when nothing changed.")] = False,
) -> None:
    """Figures, best settings by rule, image grids and every run in report/index.html."""
    from lookalike.report.build import build_report

    build_report(_load(config, None), console, force=force)


@app.command()
def ablate(config: ConfigArg, set_: SetOption = None) -> None:
    """Base model against a fine-tuned run, on prompts with the trigger word, the real name and a stranger."""
    _quiet()
    run_ablation(_load(config, set_), console)


@app.command()
def demo(
    config: ConfigArg,
    set_: SetOption = None,
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 opens it to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 7860,
    share: Annotated[bool, typer.Option(help="Also publish a public gradio.live link (off by default).")] = False,
    auth: Annotated[Optional[str], typer.Option(help="Require a login, given as user:password (visible to "
                                                "other users in the process list: prefer --auth-file).")] = None,
    auth_file: Annotated[Optional[Path], typer.Option(help="Require a login: user:password on the first line "
                                                      "of this file (or set LOOKALIKE_DEMO_AUTH).")] = None,
) -> None:
    """The interactive app: generate with any trained LoRA and score each image at once."""
    login = credentials(auth, auth_file)
    _quiet()
    launch(_load(config, set_), host=host, port=port, share=share, credentials=login)


@app.command()
def studio(
    path: Annotated[Path, typer.Argument(help="The study's config file (.toml), or a workspace folder (a new one is "
                                         "made into a study on its Photos page).")],
    host: Annotated[str, typer.Option(help="Address to bind; beyond this machine it needs --auth-file.")]
        = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 7860,
    auth_file: Annotated[Optional[Path], typer.Option(help="Require a login: user:password on the first line "
                                                      "of this file (or set LOOKALIKE_DEMO_AUTH).")] = None,
) -> None:
    """The whole study in the browser: photos, training jobs with live curves, comparison, trying and sharing."""
    from lookalike.studio.serve import serve

    _quiet()
    serve(path, host=host, port=port, credentials=credentials(None, auth_file))


@app.command()
def results(
    config: ConfigArg,
    sort: Annotated[Optional[str], typer.Option(help="Sort by this column (e.g. face_distance, clip_score).")]
        = None,
) -> None:
    """Every run of the study: settings, state, time, final loss and evaluation metrics."""
    _print_results(_load(config, None), sort)


def _print_results(study, sort: str | None) -> None:
    from rich.table import Table

    workspace = Workspace(study.workspace)
    rows = refresh(workspace.runs, workspace.results)
    if not rows:
        console.print(f"results: no runs yet in {workspace.runs}")
        return
    rows = sort_runs(rows, sort) if sort else rows
    columns = result_columns(rows)
    # One space between columns (collapsed padding): the fifteen columns fit a 140-column terminal whole.
    table = Table(*columns.values(), title=f"results ({workspace.results})", collapse_padding=True)
    for column in table.columns:
        column.overflow = "fold"  # a long name or number wraps rather than losing its end to an ellipsis
    for row in rows:
        table.add_row(*(shown(row, k) for k in columns))
    console.print(table)
    for row in rows:
        if row["reason"]:  # why it failed, or why a finished run is of other settings or photos
            console.print(f"{row['name']}: {row['state']}: {row['reason']}", highlight=False)


@app.command()
def generate(
    config: ConfigArg,
    set_: SetOption = None,
    run: Annotated[Optional[str], typer.Option(help="Use this run's LoRA.")] = None,
    lora: Annotated[Optional[list[Path]], typer.Option(help="A LoRA file (.safetensors); repeat for several.")]
        = None,
    weights: Annotated[Optional[str], typer.Option(help="Weights of the --lora files, e.g. 1,0.5.")] = None,
    checkpoint: Annotated[str, typer.Option(help="With --run: its final LoRA, the best sample step's (best), or "
                                            "a kept step's number; images go to images-<checkpoint>/.")]
        = "final",
) -> None:
    """Generate the config's prompts x seeds x guidance scales, with LoRAs or with the base model alone."""
    _quiet()
    study = _load(config, set_)
    # A run draws with its own experiment's settings: its base among them, in a study across bases.
    generate_images(config_for_run(study, run) if run else study, run=run, loras=lora or [],
                    weights=_weights(weights), console=console, checkpoint=checkpoint)


def _print_estimate(study, gpu_memory: float | None, processes: int) -> None:
    for line in dry_run_lines(study, gpu_memory, processes):
        console.print(line, highlight=False)


def _launch_processes(processes: int) -> int:
    """Run this same command as `processes` ranks under torchrun (accelerate reads its environment: NCCL on
    GPUs, gloo on the CPU); the ranks' output is the main rank's, prefixed by torchrun."""
    import socket
    import subprocess

    arguments, skip = [], False
    for argument in sys.argv[1:]:
        if skip or argument.startswith("--processes"):
            skip = argument == "--processes"
            continue
        arguments.append(argument)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               f"--master_port={port}", "-m", "lookalike", "--", *arguments]  # --: the rest is ours, not torchrun's
    return subprocess.run(command).returncode


def _weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError:
        weights = []
    if not weights or not all(math.isfinite(weight) for weight in weights):
        raise LookalikeError(f"--weights: expected finite numbers separated by commas, like 1,0.5 (got {text!r})")
    return weights


@app.command()
def merge(
    lora_a: Annotated[str, typer.Argument(help="The first LoRA file; with --config a run, NAME or "
                                          "NAME@CHECKPOINT.")],
    lora_b: Annotated[str, typer.Argument(help="The second LoRA, as the first.")],
    out: Annotated[Path, typer.Option(help="The merged LoRA file to write.")],
    weights: Annotated[str, typer.Option(help="a,b: the merged weight change is a·ΔA + b·ΔB.")] = "1,1",
    config: Annotated[Optional[Path], typer.Option(help="The study's config: the LoRAs are its runs'.")] = None,
    checkpoint: Annotated[str, typer.Option(help="With --config: the runs' final LoRAs, their best sample steps' "
                                            "(best) or a kept step's number (NAME@CHECKPOINT sets one run's).")]
        = "final",
    rank: Annotated[Optional[int], typer.Option(help="Lower the merge to this rank, as `resize` does (kohya's SVD "
                                                "merge); default: exact, the two ranks added.")] = None,
    force: ForceOption = False,
) -> None:
    """Merge two LoRAs exactly into one file (ranks concatenated, alpha included), or at a lower --rank."""
    pair = _weights(weights)
    if len(pair) != 2:
        raise LookalikeError(f"--weights: give two weights, like 1,0.5 (got {weights!r})")
    if config is None:
        if checkpoint != "final":
            raise LookalikeError("--checkpoint picks a run's LoRA: give --config with run names")
        study, sources = None, [Path(lora_a), Path(lora_b)]
    else:
        study = _load(config, None)
        sources = [Workspace(study.workspace).lora_of(choice, checkpoint) for choice in (lora_a, lora_b)]
    _check_out(out, sources, force, study)
    _quiet()
    if rank is None:
        merge_loras(sources[0], sources[1], out, (pair[0], pair[1]))
        console.print(f"merge: {out}")
        return
    _print_lowered("merge", rank, *merge_at_rank(sources[0], sources[1], out, (pair[0], pair[1]), rank))


def _check_out(out: Path, sources: list[Path], force: bool, study) -> Path:
    """Refuse an --out that would replace a source photo, a file lookalike manages or a LoRA being read, and an
    existing file without --force (outputs.check_lora_out)."""
    if study is None:
        return check_lora_out(out, sources, force)
    return check_lora_out(out, sources, force, study.workspace, study.photo_folders)


def _print_lowered(command: str, rank: int, written: Path, norms: dict) -> None:
    share, worst_share, worst = kept_share(norms)
    console.print(f"{command}: {written} (rank {rank}): it keeps {share:.1%} of the weight change (squared Frobenius "
                  f"norm), the least of any layer {worst_share:.1%} ({worst})")


@app.command()
def resize(
    lora: Annotated[str, typer.Argument(help="The LoRA file; with --config a run, NAME or NAME@CHECKPOINT.")],
    rank: Annotated[int, typer.Option(help="The rank to lower it to.")],
    out: Annotated[Path, typer.Option(help="The resized LoRA file to write.")],
    config: Annotated[Optional[Path], typer.Option(help="The study's config: the LoRA is its run's.")] = None,
    checkpoint: Annotated[str, typer.Option(help="With --config: the run's final LoRA, its best sample step's "
                                            "(best) or a kept step's number.")] = "final",
    force: ForceOption = False,
) -> None:
    """Lower a LoRA's rank, keeping each layer's largest singular values (kohya's resize_lora)."""
    if config is None and checkpoint != "final":
        raise LookalikeError("--checkpoint picks a run's LoRA: give --config with a run name")
    study = _load(config, None) if config else None
    source = Workspace(study.workspace).lora_of(lora, checkpoint) if study else Path(lora)
    _check_out(out, [source], force, study)
    _quiet()
    _print_lowered("resize", rank, *resize_lora(source, out, rank))


@app.command()
def export(
    config: Annotated[Optional[Path], typer.Argument(help="The study's config (with --run).")] = None,
    run: Annotated[Optional[str], typer.Option(help="Export this run's LoRA.")] = None,
    lora: Annotated[Optional[Path], typer.Option(help="Or export this LoRA file.")] = None,
    format: Annotated[str, typer.Option(help="kohya, comfyui or diffusers.")] = "comfyui",
    out: Annotated[Optional[Path], typer.Option(help="File to write (default: beside the LoRA).")] = None,
    dtype: Annotated[str, typer.Option(help="fp32, or bf16: half the size, as most shared LoRAs are.")] = "fp32",
    checkpoint: Annotated[str, typer.Option(help="With --run: final, best (the best sample step's) or a kept "
                                            "step's number.")] = "final",
    card: Annotated[bool, typer.Option(help="With --run: also write a model card (README.md, as the Hugging Face Hub "
                                       "reads one) and a few of the run's images beside the file.")] = False,
    force: ForceOption = False,
) -> None:
    """Write a LoRA in the layout ComfyUI, kohya's sd-scripts or diffusers read."""
    if (config is None or run is None) == (lora is None):
        raise LookalikeError("give CONFIG --run NAME, or --lora FILE")
    if card and run is None:
        raise LookalikeError("--card describes a run's LoRA: give CONFIG --run NAME")
    _quiet()
    checkpoint = checked_checkpoint(checkpoint)  # one spelling of a step: the card names it
    study = _load(config, None) if config is not None else None
    paths = Workspace(study.workspace).run(run) if run is not None else None
    source = lora if lora is not None else paths.lora_at(checkpoint)
    target = out or source.with_name(f"{source.stem}.{format}.safetensors")
    # The default name beside a run's LoRA is the export's own place in the run folder, written again each time.
    if out is not None or run is None:
        _check_out(target, [source], force, study)
    shown = card_plan(paths, checkpoint, target) if card else []  # refused before anything is written
    written = export_lora(source, target, format, dtype)
    console.print(f"export: {written}")
    if card:
        console.print(f"export: model card {write_card(study, paths, checkpoint, written, format, shown)}")


@app.command()
def evaluate(
    config: Annotated[Optional[Path], typer.Argument(help="The study's config: score its runs' images.")] = None,
    set_: SetOption = None,
    run: Annotated[Optional[str], typer.Option(help="Only this run (default: every run with images).")] = None,
    images: Annotated[Optional[Path], typer.Option(help="Without CONFIG: a folder of images to score.")] = None,
    references: Annotated[Optional[Path], typer.Option(help="Without CONFIG: the person's reference photos.")]
        = None,
    person: Annotated[Optional[list[str]], typer.Option(help="Group photos: NAME=DIR of a person's photos; "
                                                        "repeat for each person (instead of --references).")]
        = None,
    prompts: Annotated[Optional[Path], typer.Option(help="Prompts, one line for all images or one per image.")] = None,
    face_backend: Annotated[Optional[str], typer.Option(help="facenet (the study's) or dlib (offline).")] = None,
    clip_model: Annotated[Optional[str], typer.Option(help="CLIP model: hub name, local folder, or tiny.")] = None,
    all_pairs: Annotated[Optional[bool], typer.Option("--all-pairs/--paired",
                         help="CLIP Score over all prompts x all images (the study's) or image by image.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Where metrics.json and scores.csv go (default: --images).")]
        = None,
    force: Annotated[bool, typer.Option(help="Score runs again even when nothing changed.")] = False,
    checkpoint: Annotated[str, typer.Option(help="With --run: score the images of this checkpoint (best, a kept "
                                            "step), made by generate --checkpoint.")] = "final",
) -> None:
    """Score images for likeness (face distance, identity), face failures and CLIP Score."""
    chosen = {key: value for key, value in
              {"face_backend": face_backend, "clip_model": clip_model, "all_pairs": all_pairs}.items()
              if value is not None}
    if config is not None:
        if images or references or prompts or out:
            raise LookalikeError("give CONFIG [--run NAME], or --images and --references, not both")
        options = [f"evaluate.{key}={str(value).lower() if isinstance(value, bool) else value}"
                   for key, value in chosen.items()]
        study = _load(config, (set_ or []) + options)
        if not evaluate_runs(study, console, run=run, force=force, checkpoint=checkpoint) and run is None:
            console.print("evaluate: nothing to score (no run has generated images yet, or all are up to date)")
        return
    if images is not None and person:
        if references is not None:
            raise LookalikeError("give --references (one person) or --person NAME=DIR (several), not both")
        people = {}
        for item in person:
            name, sep, folder = item.partition("=")
            if not sep or not name or not folder:
                raise LookalikeError(f"--person {item!r}: expected NAME=DIR")
            people[name] = Path(folder)
        evaluate_group_folder(images, people, evaluate_settings(chosen), console, prompts_file=prompts, out=out)
        return
    if images is None or references is None:
        raise LookalikeError("give CONFIG [--run NAME], or --images DIR and --references DIR (or --person NAME=DIR)")
    evaluate_folder(images, references, evaluate_settings(chosen), console, prompts_file=prompts, out=out)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _stop_with_parent() -> None:
    """Under a sweep, stop (as on Ctrl-C: status written, resumable) if the sweep itself is killed."""
    parent = os.environ.get("LOOKALIKE_PARENT_PID")
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):  # it died before the line above
        raise KeyboardInterrupt


def _fail(message: str, code: int) -> None:
    error_console.print(f"error: {message}", highlight=False, soft_wrap=True)
    sys.exit(code)


def main() -> None:
    """Entry point: a user's mistake is one line on stderr and exit code 2, never a traceback. SIGTERM stops
    a command as Ctrl-C does, so an interrupted run can always be resumed."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        _stop_with_parent()
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:  # typer.Exit(code) from a command
            sys.exit(code)
    except LookalikeError as error:
        _fail(str(error), error.exit_code)
    except KeyboardInterrupt:
        error_console.print("interrupted")
        sys.exit(130)
    except TyperException as error:  # usage errors: click's, vendored by typer
        if hasattr(error, "show"):
            error.show()
        sys.exit(getattr(error, "exit_code", 2) or 1)
    except Exception as error:  # a full disk, a read-only workspace: said in one line, never a traceback
        problem = filesystem_problem(error)
        if problem is None:
            raise
        _fail(problem, 2)
