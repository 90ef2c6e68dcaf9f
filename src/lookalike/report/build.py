"""lookalike report: report/index.html (self-contained: everything it shows lies in report/, no network),
report/summary.md and report/figures/*.png, from the workspace's runs and results.sqlite.

Sections: a summary with the best settings chosen by rule (pareto.py, which states the rule), a table of
every run (settings, metrics, time, state, and why a run failed), the figures, an image grid (prompts as
rows, the best runs as columns, one seed, each column headed by its settings and scores) and the resolved
config. The report is rebuilt only when what it shows has changed, and replaced whole (atomically).
"""

from __future__ import annotations

import hashlib
import html
import json
from pathlib import Path

from rich.console import Console

from lookalike.config import StudyConfig
from lookalike.display import cell, result_columns, several_bases, shown, trained_base
from lookalike.evaluate.pareto import RANK_RULE, front_steps, pareto_front
from lookalike.generate import current_image, image_jobs, job_settings, lora_fingerprints
from lookalike.models.base import drawing_base, guidance_scales
from lookalike.report import figures
from lookalike.report.confidence import confidence, confidence_html, confidence_markdown, image_scores
from lookalike.report.effects import EFFECTS_TITLE, effects_html, effects_markdown, factor_effects
from lookalike.store import refresh
from lookalike.sweep.plan import config_for_run
from lookalike.workspace import UNFINISHED, Workspace, atomic_dir, read_metrics

GRID_RUNS = 4  # columns of the image grid
THUMBNAIL = 384
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #222; }
table { border-collapse: collapse; font-size: 13px; } td, th { border: 1px solid #ccc; padding: 3px 7px; }
th { background: #f3f3f3; } tr.failed td { background: #fff0f0; } tr.best td { background: #f0fff0; }
img.figure { max-width: 100%; border: 1px solid #ddd; margin: 8px 0; }
.grid img { width: 220px; height: 220px; object-fit: cover; display: block; }
.grid th { font-weight: normal; font-size: 12px; } pre { background: #f7f7f7; padding: 1em; overflow: auto; }
"""


def _loss_curve(metrics_log: Path) -> list[tuple[int, float]]:
    points = []
    if metrics_log.is_file():
        for line in metrics_log.read_text().splitlines():
            try:
                record = json.loads(line)
                points.append((record["step"], record["loss"]))
            except (ValueError, KeyError):
                continue  # a line cut short by a kill
    return points


def _digest(config: StudyConfig, workspace: Workspace, rows: list[dict]) -> str:
    """What the report shows: the config, the runs' results, and the files of every run it reads."""
    files = []
    for row in rows:
        run = workspace.run(row["name"])
        for path in [run.metrics, run.sample_scores, run.status, run.lora, run.best_lora, run.root / "metrics.json",
                     run.images_at("best") / "metrics.json", *sorted(run.images.glob("*.png"))]:
            if path.is_file():
                files.append((str(path), path.stat().st_size, path.stat().st_mtime_ns))
    facts = [config.to_json_dict(), rows, files]
    return hashlib.sha256(json.dumps(facts, default=str, sort_keys=True).encode()).hexdigest()


def _middle_scale(config: StudyConfig) -> float | None:
    scales = guidance_scales(config)
    return scales[len(scales) // 2]


def _grid_strength(config: StudyConfig) -> float | None:
    """The LoRA strength the grid shows: the trained one (1.0) where lora_scales has it, else their middle one;
    None when only the trained strength is made."""
    scales = config.generate.lora_scales
    if scales == [1.0]:
        return None
    return 1.0 if 1.0 in scales else sorted(scales)[len(scales) // 2]


def _grid(config: StudyConfig, workspace: Workspace, chosen: list[dict], folder: Path) -> str:
    """Prompts as rows, chosen runs as columns, the first seed at each run's middle guidance scale (a run on
    another base than the study's draws with its own base's settings)."""
    from PIL import Image

    seed = config.generate.seeds[0]
    columns = []  # per run: its config, its jobs by prompt, its LoRA
    for row in chosen:
        run_config = config_for_run(config, row["name"])
        guidance = _middle_scale(run_config)
        strength = _grid_strength(run_config)
        jobs = {job.prompt_index: job for job in image_jobs(run_config)
                if job.seed == seed and job.guidance == guidance and job.lora_scale == strength}
        columns.append((row, run_config, jobs, lora_fingerprints([(workspace.run(row["name"]).lora, 1.0)])))
    bases = several_bases(chosen)
    header = "".join(
        f"<th><b>{html.escape(r['name'])}</b><br>" + (f"{html.escape(shown(r, 'base'))}, " if bases else "") +
        f"lr {cell(r['learning_rate'])}, rank {cell(r['rank'])}, "
        f"alpha {cell(r['alpha'])}, {cell(r['max_train_steps'])} steps, {cell(r['lr_scheduler'])}<br>"
        f"CLIP {cell(r['clip_score'])}, face distance {cell(r['face_distance'])}, "
        f"identity {cell(r['identity_similarity'])}</th>" for r, *_ in columns)
    body = []
    for index, prompt in enumerate(config.generate.prompts):
        cells = []
        for row, run_config, jobs, lora in columns:
            job = jobs.get(index)
            source = job and current_image(workspace.run(row["name"]).images, job, job_settings(run_config, job, lora))
            if source is None:  # missing, or made with other settings than the ones this row names
                cells.append("<td>not generated with these settings</td>")
                continue
            name = f"grid/{row['name']}_{job.stem}.jpg"
            with Image.open(source) as image:
                thumbnail = image.convert("RGB")
                thumbnail.thumbnail((THUMBNAIL, THUMBNAIL))
                (folder / name).parent.mkdir(exist_ok=True)
                thumbnail.save(folder / name, quality=88)
            cells.append(f'<td><img src="{name}" alt="{html.escape(row["name"])}: {html.escape(job.prompt)}"></td>')
        body.append(f"<tr><th>{html.escape(config.fill(prompt))}</th>{''.join(cells)}</tr>")
    scales = {_middle_scale(run_config) for _, run_config, *_ in columns} or {_middle_scale(config)}
    shown_guidance = ", ".join("no guidance (the base takes none)" if g is None else f"guidance scale {g:g}"
                               for g in sorted(scales, key=lambda g: -1 if g is None else g))
    return (f"<p>Seed {seed}, {shown_guidance}.</p><table class='grid'><tr><th>prompt</th>{header}</tr>"
            f"{''.join(body)}</table>")


def build_report(config: StudyConfig, console: Console, force: bool = False) -> Path:
    """Write report/ for the study's runs as they stand; return the path of index.html."""
    workspace = Workspace(config.workspace)
    rows = refresh(workspace.runs, workspace.results)
    report = workspace.root / "report"
    digest = _digest(config, workspace, rows)
    if not force and (report / ".inputs").is_file() and (report / ".inputs").read_text() == digest:
        console.print(f"report: up to date: {report / 'index.html'}")
        return report / "index.html"

    done = [r for r in rows if r["state"] == "done"]
    failed = [r for r in rows if r["state"] in UNFINISHED]
    unrankable = cannot_rank(config, done)
    front, unplaced = ([], {}) if unrankable else pareto_front(done)
    best = [r["name"] for r in front]
    # The grid's columns: the best runs, then the other finished runs, best CLIP Score first.
    others = sorted((r for r in done if r["name"] not in best), key=lambda r: -(r["clip_score"] or -1e9))
    chosen = (front + others)[:GRID_RUNS]

    # Each run's final LoRA's figures, where they measured the file it holds now (as the results table's), and
    # each run's scored training samples.
    evaluations = {row["name"]: metrics for row in done
                   if (metrics := workspace.run(row["name"]).current_metrics("final")) is not None}
    scores = {r["name"]: records for r in rows if (records := read_metrics(workspace.run(r["name"]).sample_scores))}
    with atomic_dir(report) as folder:
        shown = _figures(folder, workspace, rows, done, best, evaluations, scores)
        grid = _grid(config, workspace, chosen, folder) if chosen else "<p>No run has finished yet.</p>"
        stale = [r for r in done if r["reason"]]  # finished on other settings or photos than asked for now
        best_of = [] if unrankable else _best_of(workspace, done, evaluations, scores)
        best_lines = _best_lines(front, unplaced, failed + stale, unrankable, best_of)
        effects = factor_effects(config, done)
        per_image = {r["name"]: image_scores(workspace.run(r["name"]).root / "scores.csv") for r in done}
        sure = confidence({name: rows for name, rows in per_image.items() if rows}, best[0] if best else None)
        (folder / "index.html").write_text(_page(config, rows, front, best_lines, failed, shown, grid, effects,
                                                 sure))
        (folder / "summary.md").write_text(_summary(config, rows, best_lines, effects, sure))
        (folder / ".inputs").write_text(digest)
    console.print(f"report: {report / 'index.html'}")
    return report / "index.html"


def _figures(folder: Path, workspace: Workspace, rows: list[dict], done: list[dict], best: list[str],
             evaluations: dict[str, dict], scores: dict[str, list[dict]]) -> list[tuple[str, str | None]]:
    """The report's figures, drawn into figures/: (title, file) of each, a file of None where a figure has nothing
    to show and says so in one line."""
    shown = []
    for factor, title in figures.FACTORS.items():
        if len({r[factor] for r in done}) > 1:
            shown.append((f"Metrics against {title}", f"figures/by_{factor}.png"))
            figures.save(figures.factor_figure(done, factor), folder / shown[-1][1])
    if any(r["clip_score"] is not None and r["face_distance"] is not None for r in done):
        shown.append(("Face distance against CLIP Score", "figures/pareto.png"))
        figures.save(figures.pareto_figure(done, best), folder / shown[-1][1])
    elif any(r["clip_score"] is not None for r in done):
        shown.append(("Face distance against CLIP Score", None))  # said in one line instead
    for key, factor, file in (("per_guidance_scale", "inference guidance scale", "guidance"),
                              ("per_lora_scale", "LoRA strength", "lora_strength")):
        per_value = {name: metrics.get(key, {}) for name, metrics in evaluations.items()}
        if any(per_value.values()):
            shown.append((f"Metrics against the {factor}", f"figures/{file}.png"))
            figures.save(figures.inference_figure(per_value, factor), folder / shown[-1][1])
    curves = {r["name"]: _loss_curve(workspace.run(r["name"]).metrics) for r in rows}
    if any(curves.values()):
        shown.append(("Training loss", "figures/loss.png"))
        figures.save(figures.loss_figure({k: v for k, v in curves.items() if v}), folder / shown[-1][1])
    if scores:
        best_steps = {name: steps[0] for name, records in scores.items() if (steps := front_steps(records))}
        shown.append(("Identity and CLIP Score while training (each run's best step starred)", "figures/steps.png"))
        figures.save(figures.steps_figure(scores, best_steps), folder / shown[-1][1])
    return shown


def _best_of(workspace: Workspace, done: list[dict], evaluations: dict[str, dict],
             scores: dict[str, list[dict]]) -> list[str | None]:
    """The headline's lines: the best LoRA over every run's evaluated checkpoints (final and best) and strengths,
    and the best checkpoint over every run's scored training samples."""
    checkpoints = {(name, "final"): metrics for name, metrics in evaluations.items()}
    for row in done:
        best_metrics = workspace.run(row["name"]).current_metrics("best")  # of the best step now, or none
        if best_metrics is not None:
            checkpoints[row["name"], "best"] = best_metrics
    statuses = {row["name"]: workspace.run(row["name"]).read_status() or {} for row in done}
    return [_best_lora(checkpoints, {name: status.get("best_step") for name, status in statuses.items()}),
            _best_checkpoint(scores)]


def _runs_table(rows: list[dict], best: list[str]) -> str:
    columns = result_columns(rows)
    head = "".join(f"<th>{title}</th>" for title in columns.values()) + "<th>reason</th>"
    body = []
    for row in rows:
        kind = "best" if row["name"] in best else "failed" if row["state"] in UNFINISHED else ""
        cells = "".join(f"<td>{html.escape(shown(row, k))}</td>" for k in columns)
        body.append(f"<tr class='{kind}'>{cells}<td>{html.escape(row['reason'] or '')}</td></tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def cannot_rank(config: StudyConfig, done: list[dict]) -> str | None:
    """Why this study's numbers cannot name a best run, or None when they can."""
    if config.evaluate.clip_model == "tiny":
        return ("its CLIP Scores come from the random tiny CLIP model (evaluate.clip_model = 'tiny'), which "
                "measures nothing")
    evaluated = [r for r in done if r["images"]]
    if evaluated and all(r["faceless"] == r["images"] for r in evaluated):
        return "no image of any run shows a face, so likeness was not measured"
    return None


def _best_checkpoint(scores: dict[str, list[dict]]) -> str | None:
    """The best (run, step) of every scored training sample, by the same rule as the runs."""
    front = front_steps([{**record, "step": (name, record["step"])} for name, records in scores.items()
                         for record in records])
    if not front:
        return None
    name, step = front[0]
    return (f"Best checkpoint: run {name} at step {step} (by its training samples' scores, same rule; `generate "
            f"--run {name} --checkpoint {step}` draws with it)")


def _best_lora(evaluations: dict[tuple[str, str], dict], best_steps: dict[str, int | None]) -> str | None:
    """The best (run, checkpoint, LoRA strength) over every evaluated checkpoint of every run ({(run,
    checkpoint): its metrics.json}, checkpoint final or best) at each strength, by the same rule as the runs;
    None when there is nothing to choose beyond the runs themselves (one checkpoint and one strength each)."""
    candidates = [{**values, "name": (run, checkpoint, strength)}
                  for (run, checkpoint), metrics in evaluations.items()
                  for strength, values in (metrics.get("per_lora_scale") or {"1.0": metrics}).items()]
    if len(candidates) <= len({run for run, _ in evaluations}):
        return None
    ranked, _ = pareto_front(candidates)
    if not ranked:
        return None
    best = ranked[0]
    run, checkpoint, strength = best["name"]
    which = (f"its best sample step's (step {best_steps.get(run)})" if checkpoint == "best" else "its final LoRA")
    return (f"Best LoRA: run {run}, {which}, at strength {strength} (identity {cell(best['identity_similarity'])}, "
            f"CLIP {cell(best['clip_score'])}, faceless {cell(best['faceless'])}; best of {len(candidates)} "
            f"checkpoints and strengths by the same rule; `generate --run {run} --checkpoint {checkpoint}` draws "
            "with it)")


def _best_lines(front: list[dict], unplaced: dict[str, str], troubled: list[dict],
                unrankable: str | None, best_of: list[str | None] = ()) -> tuple[list[str], list[str], list[str]]:
    """(the headline: the best LoRA over every run's evaluated checkpoints and strengths, the best checkpoint
    over every run's scored steps; the ranked runs, best first; notes: why nothing is ranked, runs left out,
    failed runs, finished runs trained on other settings or photos than the study now asks for)."""
    bases = several_bases(front)
    ranked = [f"{r['name']}: " + (f"{shown(r, 'base')}, " if bases else "") +
              f"lr {cell(r['learning_rate'])}, rank {cell(r['rank'])}, alpha {cell(r['alpha'])}, "
              f"{cell(r['max_train_steps'])} steps, {r['lr_scheduler']} (identity {cell(r['identity_similarity'])}, "
              f"CLIP {cell(r['clip_score'])}, faceless {cell(r['faceless'])}, face distance "
              f"{cell(r['face_distance'])})" for r in front]
    headline = [line for line in best_of if line]
    notes = [f"No best settings: this study's numbers cannot rank runs: {unrankable}."] if unrankable else []
    notes += [f"not ranked: {name} ({why})" for name, why in unplaced.items()]
    notes += [f"{'failed' if r['state'] in UNFINISHED else r['state']}: {r['name']} ({r['reason']})"
              for r in troubled]
    return headline, ranked, notes


def _page(config, rows, front, best_lines, failed, shown, grid, effects, sure) -> str:
    headline, ranked, notes = best_lines
    best = "".join(f"<p><b>{html.escape(line)}</b></p>" for line in headline) + \
        (f"<ol>{''.join(f'<li>{html.escape(line)}</li>' for line in ranked)}</ol>" if ranked else "") + \
        (f"<ul>{''.join(f'<li>{html.escape(line)}</li>' for line in notes)}</ul>" if notes else "")
    done = sum(r["state"] == "done" for r in rows)
    figures_html = "".join(
        f"<h3>{html.escape(title)}</h3>" + (f"<img class='figure' src='{path}' alt='{html.escape(title)}'>" if path
                                            else "<p>Nothing to plot: no image of any run shows a face.</p>")
        for title, path in shown)
    effects_section = f"<h2>{EFFECTS_TITLE}</h2>{effects_html(effects)}" if effects else ""
    drawn = "" if drawing_base(config) == config.model.base else f", drawn with {html.escape(drawing_base(config))}"
    base = trained_base(config.model.base, config.model.checkpoint)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>lookalike: {html.escape(config.name)}</title>"
            f"<style>{STYLE}</style></head><body><h1>Study {html.escape(config.name)}</h1>"
            f"<p>Base model {html.escape(base)}{drawn}; subject {html.escape(config.subject.token)} "
            f"({html.escape(config.subject.class_word)}); {len(rows)} runs: {done} done, {len(failed)} failed. "
            f"Likeness is measured against {html.escape(likeness_measured_against(config))}.</p>"
            f"<h2>Best settings</h2><p>Rule: {html.escape(RANK_RULE)}.</p>{best or '<p>None yet.</p>'}"
            f"<h2>Every run</h2>{_runs_table(rows, [r['name'] for r in front])}"
            f"{confidence_html(*sure) if sure[0] else ''}{effects_section}"
            f"<h2>Figures</h2>{figures_html or '<p>No figure yet: no run has finished.</p>'}"
            f"<h2>Images</h2>{grid}"
            f"<h2>Config</h2><details><summary>the resolved config of the study</summary>"
            f"<pre>{html.escape(json.dumps(config.to_json_dict(), indent=2))}</pre></details>"
            "</body></html>")


def likeness_measured_against(config) -> str:
    """What the identity metrics compare each face with: held-out photos, or the photos trained on."""
    if all(person.references is not None for person in config.people):
        return "held-out photos of each person ([subject] references), never trained on"
    return ("the photos it trained on (set [subject] references to a folder of held-out photos to measure likeness "
            "on photos the LoRA never saw)")


def _summary(config, rows, best_lines, effects, sure) -> str:
    headline, ranked, notes = best_lines
    lines = [f"# Study {config.name}", "", f"Rule: {RANK_RULE}.", "",
             f"Likeness is measured against {likeness_measured_against(config)}.", "", "## Best settings", ""]
    lines += [f"**{line}**\n" for line in headline]
    lines += [f"{i}. {line}" for i, line in enumerate(ranked, 1)] + [f"- {line}" for line in notes] or ["None yet."]
    columns = result_columns(rows)
    lines += ["", "## Every run", "", "| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(shown(r, k) for k in columns) + " |" for r in rows]
    if sure[0]:
        lines += confidence_markdown(*sure)
    if effects:
        lines += ["", f"## {EFFECTS_TITLE}", *effects_markdown(effects)]
    return "\n".join(lines) + "\n"
