"""What the studio shows of a run while it trains, read from the run's own files (status.json, metrics.jsonl,
sample_scores.jsonl, samples/, train.log): cheap enough to read every few seconds, and never loading a model, so
that watching a run costs its training nothing. A step-records file is parsed again only from where it grew, and a
log only at its end, so a page's refresh costs the same at step 100,000 as at step 100."""

from __future__ import annotations

import html
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lookalike.display import cell
from lookalike.evaluate.pareto import front_steps
from lookalike.report import figures
from lookalike.workspace import RunPaths, read_json, step_records_of

LOG_LINES = 40
LOG_TAIL_BYTES = 64 * 1024  # the end of a log read for its last lines (progress bars make long logs)
LOSS_POINTS = 500  # the most points the loss chart draws (a long run's curve, thinned evenly)
_CHECK_BYTES = 64  # the bytes before where a file was read to, compared to tell a file grown from one replaced


@dataclass(frozen=True)
class _ReadTo:
    offset: int  # the bytes read and parsed: whole lines only
    before: bytes  # the last _CHECK_BYTES of them
    records: list[dict]


class StepRecords:
    """The step records of JSON-lines files (metrics.jsonl, sample_scores.jsonl), each parsed once: a file that
    grew is read from where it was read to, one replaced (a resumed run rewrites it without the steps it will make
    again) or cut shorter is read whole again. A line still being written waits for its end."""

    def __init__(self):
        self._files: dict[Path, _ReadTo] = {}
        self._lock = threading.Lock()  # the pages' handlers run in threads of their own

    def __call__(self, path: Path) -> list[dict]:
        with self._lock:
            try:
                with path.open("rb") as file:
                    known = self._unchanged_so_far(file, self._files.get(path))
                    file.seek(known.offset)
                    data = file.read()
            except FileNotFoundError:
                self._files.pop(path, None)
                return []
            whole = data[:data.rfind(b"\n") + 1]
            if whole:
                known = _ReadTo(known.offset + len(whole), (known.before + whole)[-_CHECK_BYTES:],
                                known.records + step_records_of(whole.splitlines()))
            self._files[path] = known
            return known.records

    @staticmethod
    def _unchanged_so_far(file, known: _ReadTo | None) -> _ReadTo:
        """What was read of the file before, if the file still holds it; else nothing read yet."""
        if known is not None and known.offset >= len(known.before):
            file.seek(known.offset - len(known.before))
            if file.read(len(known.before)) == known.before:
                return known
        return _ReadTo(0, b"", [])


step_records = StepRecords()


def file_signature(path: Path) -> tuple[int, int, int] | None:
    """What changes whenever the file does (its inode, size and time of change); None while it does not exist."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


@dataclass(frozen=True)
class RunProgress:
    state: str
    step: int
    steps: int | None
    loss: float | None
    eta_s: float | None  # seconds left at the pace of its last steps; None before it has one
    best_step: int | None

    def line(self) -> str:
        """One line: state, step of steps, loss, time left, best step."""
        parts = [self.state, f"step {self.step} of {cell(self.steps)}"]
        if self.loss is not None:
            parts.append(f"loss {cell(self.loss)}")
        if self.eta_s is not None and self.state == "running":
            parts.append(f"about {_duration(self.eta_s)} left")
        if self.best_step is not None:
            parts.append(f"best step {self.best_step}")
        return ", ".join(parts)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def run_progress(run: RunPaths) -> RunProgress:
    records = step_records(run.metrics)
    steps = read_json(run.config).get("train", {}).get("max_train_steps") if run.config.is_file() else None
    step = records[-1]["step"] if records else 0
    recent = records[-20:]
    eta = None
    if len(recent) > 1 and steps is not None and recent[-1]["step"] > recent[0]["step"]:
        pace = (recent[-1]["time"] - recent[0]["time"]) / (recent[-1]["step"] - recent[0]["step"])
        eta = max(0.0, pace * (steps - step))
    front = front_steps(step_records(run.sample_scores))  # the best step so far, by the report's rule
    return RunProgress(run.state(), step, steps, records[-1].get("loss") if records else None, eta,
                       front[0] if front else None)


def loss_points(run: RunPaths, most: int = LOSS_POINTS):
    """The training loss against the step, smoothed as the report's loss figure smooths it, at most `most` points
    (every k-th, the last kept): a table for the page's chart, which the browser draws."""
    import pandas

    points = figures.smoothed_loss([(record["step"], record["loss"]) for record in step_records(run.metrics)
                                    if record.get("loss") is not None])
    every = -(-len(points) // most) if points else 1
    thinned = points[::every] + (points[-1:] if points and (len(points) - 1) % every else [])
    # Typed even when empty: a chart first sent columns of no type keeps them as categories once the numbers come.
    return pandas.DataFrame(thinned, columns=["step", "loss (smoothed)"]).astype({"step": "int64",
                                                                                 "loss (smoothed)": "float64"})


def scores_figure(run: RunPaths):
    """Identity and CLIP Score of the scored sample steps, the best one so far starred (the report's own figure)."""
    records = step_records(run.sample_scores)
    front = front_steps(records)
    return figures.steps_figure({run.name: records}, {run.name: front[0]} if front else {})


def _samples(run: RunPaths) -> list[tuple[int, int, Path]]:
    """(step, prompt index, image) of each of the run's training samples, as the trainer names them
    (step-<step>_p<index>.png), in step and prompt order."""
    found = []
    for image in run.samples.glob("step-*_p*.png") if run.samples.is_dir() else []:
        step, prompt = image.stem.removeprefix("step-").split("_p", 1)
        found.append((int(step), int(prompt), image))
    return sorted(found)


def _scored(record: dict) -> str:
    """A sample step's scores as the pages show them."""
    return f"identity {cell(record.get('identity_similarity'))}, CLIP {cell(record.get('clip_score'))}"


def sample_gallery(run: RunPaths, newest: int | None = None) -> list[tuple[str, str]]:
    """(image, caption) of the training samples (the `newest` only, where given), newest step first, each captioned
    with its step's scores."""
    scores = {record["step"]: record for record in step_records(run.sample_scores)}
    return [(str(image), f"step {step}" + (f": {_scored(scores[step])}" if step in scores else ""))
            for step, _, image in reversed(_samples(run))][:newest]


def sample_grid(runs: list[RunPaths], fill: Callable[[str], str] = str) -> str:
    """The runs' training samples as one table: a row per sample prompt (its template filled in by `fill`, as the
    trainer fills it), a column per (run, sample step), each column headed by its step's identity and CLIP Score,
    so checkpoints are compared prompt by prompt. An HTML table whose images the studio serves from the workspace,
    in a box that scrolls sideways when the steps are more than the page is wide."""
    columns, prompts = [], {}
    for run in runs:
        scores = {record["step"]: record for record in step_records(run.sample_scores)}
        settings = read_json(run.config) if run.config.is_file() else {}
        for index, prompt in enumerate(settings.get("train", {}).get("sample_prompts", [])):
            prompts.setdefault(index, fill(prompt))
        by_step: dict[int, dict[int, Path]] = {}
        for step, index, image in _samples(run):
            by_step.setdefault(step, {})[index] = image
            prompts.setdefault(index, f"prompt {index}")
        for step, images in sorted(by_step.items()):
            scored = f"<br>{_scored(scores[step])}" if step in scores else ""
            head = f"{html.escape(run.name)}<br>step {step}{scored}"
            columns.append((head, images))
    if not columns:
        return "No samples yet: a run draws them every train.sample_every steps."
    rows = ["<tr><th>prompt</th>" + "".join(f"<th>{head}</th>" for head, _ in columns) + "</tr>"]
    for index, prompt in sorted(prompts.items()):
        cells = "".join(f'<td><img src="/gradio_api/file={html.escape(str(images[index]))}" width="128" '
                        f'alt="{html.escape(prompt)}"></td>' if index in images else "<td></td>"
                        for _, images in columns)
        rows.append(f"<tr><th>{html.escape(prompt)}</th>{cells}</tr>")
    return '<div style="overflow-x: auto"><table class="sample-grid">' + "".join(rows) + "</table></div>"


def log_tail(run: RunPaths, lines: int = LOG_LINES) -> str:
    """The last lines of the run's log, read from its end (a progress bar's redraws, one line each, are kept to the
    last)."""
    try:
        with run.log.open("rb") as file:
            size = file.seek(0, 2)
            file.seek(max(0, size - LOG_TAIL_BYTES))
            text = file.read().decode(errors="replace").replace("\r\n", "\n")
    except FileNotFoundError:
        return ""
    # Lines end at "\n" only: a progress bar redraws its line after each "\r" (splitlines would split there too).
    whole = text.rstrip("\n").split("\n")[0 if size <= LOG_TAIL_BYTES else 1:]  # the first one read may be cut
    return "\n".join(line.rsplit("\r", 1)[-1] for line in whole[-lines:])


def runs_of(runs: Path) -> list[str]:
    """The runs of a workspace, newest first: those the studio started and those a terminal did."""
    found = [folder for folder in runs.iterdir() if folder.is_dir() and not folder.name.startswith(".")] \
        if runs.is_dir() else []
    return [folder.name for folder in sorted(found, key=lambda f: f.stat().st_mtime, reverse=True)]
