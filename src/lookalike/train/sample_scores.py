"""Identity in the training loop: each sample step's fixed-seed images are scored as `lookalike evaluate` scores a
run's images ([evaluate]'s face backend and CLIP, against the subject's reference photos), recorded per step in
runs/<name>/sample_scores.jsonl, and the best step is chosen by the report's rule (evaluate/pareto.py: the Pareto
front of identity similarity, CLIP Score and faceless images, ranked by mean rank).

The best step's LoRA is kept as lora-best.safetensors. Only the LoRAs of steps on the front are kept
(runs/<name>/front/step-N.safetensors): a step that another step beats on every objective can never be the best
again, so its file goes as soon as it is beaten, and the best is always one of those kept.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

from lookalike.config import StudyConfig
from lookalike.errors import LookalikeError
from lookalike.evaluate.command import load_evaluator, reference_photos, score_named
from lookalike.evaluate.pareto import front_steps
from lookalike.evaluate.scoring import ImageScore, aggregate, clip_prompt
from lookalike.workspace import RunPaths, StepLog, atomic_path, read_metrics


def stop_reason(records: list[dict], rule) -> str | None:
    """Why the run should stop after its latest scored step by the StopRule `rule` (None: go on). A new best
    identity similarity is one above every earlier step's (a step without a face improves nothing)."""
    if rule.identity_plateau is not None:
        identities = [record["identity_similarity"] for record in records]
        improved = [index for index, value in enumerate(identities)
                    if value is not None and all(earlier is None or value > earlier for earlier in identities[:index])]
        since = len(records) - 1 - improved[-1] if improved else len(records)
        if since >= rule.identity_plateau:
            return f"identity similarity did not improve for {since} scored sample steps"
    if rule.clip_below is not None:
        clips = [record["clip_score"] for record in records if record["clip_score"] is not None]
        best = max(clips, default=None)
        if best is not None and best > 0 and clips[-1] < rule.clip_below * best:
            return f"CLIP Score fell to {clips[-1]:.4g}, below {rule.clip_below:g} of its best {best:.4g}"
    return None


class SampleScores:
    """The evaluator (loaded once per training process) and the run's per-step scores and kept LoRAs."""

    def __init__(self, config: StudyConfig, run: RunPaths, start_step: int):
        self.run = run
        try:
            # On the CPU: the accelerator's memory is the training's, and a few sample images score there fast.
            self.evaluator = load_evaluator(config.evaluate, with_clip=True, on_cpu=True)
            self.references = {person.token: self.evaluator.reference(reference_photos(config, person))
                               for person in config.people}
        except LookalikeError as error:
            raise LookalikeError(f"scoring the training samples (train.score_samples): {error}; or set "
                                 "train.score_samples = false") from None
        self.class_words = {person.token: person.class_word for person in config.people}
        # A resumed run makes the steps after its checkpoint again: their scores and LoRAs go.
        self.records = [r for r in read_metrics(run.sample_scores) if r["step"] <= start_step] if start_step else []
        self.log = StepLog(run.sample_scores, start_step)
        self._best_copied: int | None = None
        self._keep(front_steps(self.records))

    @property
    def best(self) -> int | None:
        steps = front_steps(self.records)
        return steps[0] if steps else None

    def record(self, step: int, images: list[Path], prompts: list[str], save_lora: Callable[[Path], None]
               ) -> dict[str, Any]:
        """Score one sample step's images (made from `prompts`), record them, and keep the step's LoRA if it is
        on the front (`save_lora(path)` writes it)."""
        rows = [ImageScore(image=path.name, prompt=prompt, clip_prompt=clip_prompt(prompt, self.class_words))
                for path, prompt in zip(images, prompts)]
        score_named(self.evaluator, self.references, images, rows, all_pairs=False)
        record = {"step": step, **aggregate(rows)}
        self.log.write(record)
        self.records.append(record)
        front = front_steps(self.records)
        if step in front:
            self.run.front.mkdir(exist_ok=True)
            save_lora(self.run.front_lora(step))
        self._keep(front)
        return record

    def _keep(self, front: list[int]) -> None:
        """Delete the LoRAs of steps off the front (or after a resumed run's checkpoint), and make
        lora-best.safetensors the best step's."""
        for path in self.run.front.glob("step-*.safetensors") if self.run.front.is_dir() else []:
            if int(path.stem.removeprefix("step-")) not in front:
                path.unlink()
        if not front or not self.run.front_lora(front[0]).is_file():
            self.run.best_lora.unlink(missing_ok=True)
            self._best_copied = None
        elif front[0] != self._best_copied or not self.run.best_lora.is_file():
            with atomic_path(self.run.best_lora) as tmp:
                shutil.copyfile(self.run.front_lora(front[0]), tmp)
            self._best_copied = front[0]

    def close(self) -> None:
        self.log.close()
