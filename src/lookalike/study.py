"""lookalike run: the whole study in order (prepare, sweep, generate, evaluate; the CLI then prints the results
and builds the report), each stage
skipping what is already up to date, so running it again after an interruption continues where it stopped.
A run whose best scored sample step is not its last also has that step's LoRA drawn and scored
([generate] best_checkpoint), so the report can compare the two.

A run that fails to train, or whose images fail to generate, is reported and left out of the later stages;
the other runs go on.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.text import Text

from lookalike.config import StudyConfig
from lookalike.errors import LookalikeError
from lookalike.evaluate.command import evaluate_runs
from lookalike.generate import generate
from lookalike.models.base import check_drawing_base, quiet_libraries
from lookalike.sweep.plan import config_for_run, experiments
from lookalike.sweep.runner import sweep
from lookalike.trained_on import trained_base_problem
from lookalike.workspace import UNFINISHED, Workspace


def run_study(config: StudyConfig, config_file: Path, overrides: list[str], console: Console, jobs: int = 1,
              backend: str = "local", address: str | None = None, workers: str = "warm") -> list[str]:
    """Every stage of the study; returns the problems met (empty when every run went through)."""
    from lookalike.data.prepare import prepare_study

    quiet_libraries()
    plan = experiments(config)
    for planned in plan:  # a drawing base no run's LoRA fits fails now, not after the training
        check_drawing_base(config.with_experiment(planned.overrides, f"sweep experiment {planned.name}"))
    stage = lambda name: console.rule(Text(name, style="bold"))  # noqa: E731
    stage("1/4 prepare")
    prepare_study(config, console)

    stage("2/4 train (sweep)")
    outcomes = sweep(config, config_file, plan, console, overrides, jobs=jobs, backend=backend, address=address,
                     workers=workers)
    problems = [f"run {o.name} {o.state}: {o.reason}" for o in outcomes if o.state in UNFINISHED]
    trained = [o.name for o in outcomes if o.state in ("done", "skipped")]

    stage("3/4 generate")
    drawn = []  # (run, checkpoint) of every LoRA whose images were made
    for name in trained:
        run = Workspace(config.workspace).run(name)
        wrong_base = trained_base_problem(run, config_for_run(config, name))
        if wrong_base:  # its images and figures stay those of the base it trained on
            console.print(f"generate: skipped: {wrong_base}", highlight=False)
            continue
        checkpoints = ["final"]
        if config.generate.best_checkpoint and run.has_distinct_best():
            checkpoints.append("best")
        for checkpoint in checkpoints:
            try:
                generate(config_for_run(config, name), run=name, console=console, checkpoint=checkpoint)
                drawn.append((name, checkpoint))
            except (LookalikeError, RuntimeError) as error:  # RuntimeError: torch, e.g. out of memory
                problems.append(f"run {name}{_at(checkpoint)}: generate failed: {error}")
                console.print(f"generate: run {name}{_at(checkpoint)} failed: {error}")
                break

    stage("4/4 evaluate")
    for name, checkpoint in drawn:
        try:
            evaluate_runs(config, console, run=name, checkpoint=checkpoint)
        except LookalikeError as error:
            problems.append(f"run {name}{_at(checkpoint)}: evaluate failed: {error}")
            console.print(f"evaluate: run {name}{_at(checkpoint)} failed: {error}")
    return problems


def _at(checkpoint: str) -> str:
    return "" if checkpoint == "final" else f" ({checkpoint} checkpoint)"
