"""The experiments of a study: the ones listed in [[sweep.experiments]], then the ones its design makes of
[sweep.factors]; a study with neither has one run, `default`, with the [train] settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lookalike.config import StudyConfig
from lookalike.errors import LookalikeError
from lookalike.sweep import designs
from lookalike.workspace import run_name_problem

DEFAULT_RUN = "default"


@dataclass(frozen=True)
class Planned:
    name: str
    overrides: dict[str, Any]  # [train] keys (and the base, prior) this experiment sets

    def describe(self) -> str:
        return self.name + ("  " + " ".join(f"{k}={v}" for k, v in self.overrides.items()) if self.overrides else "")


def experiments(config: StudyConfig) -> list[Planned]:
    sweep = config.sweep
    planned = [Planned(e.name, e.model_dump(exclude={"name"}, exclude_none=True)) for e in sweep.experiments]
    if not sweep.factors:
        made = []
    elif sweep.design in (None, "grid"):
        made = designs.grid(sweep.factors)
    elif sweep.design == "one-at-a-time":
        made = designs.one_at_a_time(sweep.factors, {**config.train.model_dump(), "base": config.model.base,
                                                     "prior": bool(config.prior.num_class_images)})
    else:
        made = designs.pairwise(sweep.factors)
    for settings in made:
        name = designs.experiment_name(settings)
        problem = run_name_problem(name)
        if problem:  # a name made of the settings' values, which a value can make unusable
            raise LookalikeError(f"sweep: the experiment {settings} makes a run name that cannot be used "
                                 f"({problem}): list it in [[sweep.experiments]] with a name of its own")
        planned.append(Planned(name, settings))
    names = [p.name for p in planned]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise LookalikeError(f"sweep: experiment names repeat ({', '.join(repeated)}); rename the listed ones")
    for experiment in planned:  # every bad value is found now, not when its run starts
        config.with_experiment(experiment.overrides, f"sweep experiment {experiment.name}")
    return planned or [Planned(DEFAULT_RUN, {})]


def config_for_run(config: StudyConfig, name: str) -> StudyConfig:
    """The config a run trains with: [train] and the base with the overrides of the experiment of that name, if
    any (a run name that is no experiment trains with the study's settings as they are)."""
    for experiment in experiments(config):
        if experiment.name == name:
            return config.with_experiment(experiment.overrides, f"sweep experiment {name}")
    return config
