"""The studio's pages (Gradio): Photos, Train, Jobs, Compare, Try and Share. Each action calls the function its
command calls, and says that command, so it can be repeated in a terminal. The pages read the workspace's files
on a timer; the web process never loads a model, except on Try (the demo's own pipeline, which follows the study's
base as the Train page changes it) and Share."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

from lookalike import display
from lookalike.data.captions import caption_file
from lookalike.data.prepare import caption_study, data_folder, prepare_study
from lookalike.demo import MAX_FILES_PER_UPLOAD, DemoModels, build_app
from lookalike.display import cell, result_columns, shown
from lookalike.errors import LookalikeError
from lookalike.models.families import FAMILIES, KNOWN_BASES
from lookalike.presets import presets
from lookalike.store import refresh
from lookalike.studio.jobs import JobQueue
from lookalike.studio.progress import (
    file_signature,
    log_tail,
    loss_points,
    run_progress,
    runs_of,
    sample_gallery,
    sample_grid,
    scores_figure,
)
from lookalike.studio.study import StudioStudy
from lookalike.sweep.plan import experiments
from lookalike.train.memory import dry_run_lines, parse_gpu_memory
from lookalike.workspace import atomic_path, read_json

REFRESH_S = 2.0  # how often the Jobs page reads the runs' files
SAMPLES_SHOWN = 24  # the Jobs page's newest samples (Compare shows every step of the runs chosen there)
# The main keys the Train page sets one by one, each with its decimals (0: a whole number; None: any).
MAIN_KEYS = {"train.max_train_steps": 0, "train.rank": 0, "train.learning_rate": None, "train.resolution": 0,
             "prior.num_class_images": 0, "train.background_loss_weight": None}


def base_note(base: str | None) -> str:
    """What a user should know of a base before training on it: its family, where it downloads from, its licence
    and whether the hub asks them to accept it first."""
    info = KNOWN_BASES.get(base or "")
    if info is None:
        return ""
    if info.repo is None:
        return f"`{base}`: {FAMILIES[info.family].title}, built here for tests (no download)"
    licence = info.licence or "read its model card"
    gated = "; gated: accept its licence on the hub, then run `hf auth login` once" if info.gated else ""
    return f"`{base}`: {FAMILIES[info.family].title}, from the hub's `{info.repo}`; licence: {licence}{gated}"


class Studio:
    """The study, its job queue and the thread that starts queued jobs, shared by every page."""

    def __init__(self, study: StudioStudy):
        self.study = study
        self.queue = JobQueue(study.workspace)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run_queue, daemon=True, name="studio-queue")

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()

    def _run_queue(self) -> None:
        while not self._stop.wait(1.0):
            self.tick()

    def tick(self) -> None:
        """Record the jobs that ended, and start the next queued one when none trains."""
        self.queue.reap()
        try:
            self.queue.start_next()
        except (LookalikeError, OSError) as error:  # a bad job never stops the queue
            print(f"studio: could not start a job: {error}", flush=True)

    def submit(self, runs: list[str]) -> list[str]:
        """Queue each run with a snapshot of the study; the command each job runs."""
        commands = []
        for run in runs:
            job = self.queue.submit(self.study.snapshot(run), run)
            commands.append("lookalike " + " ".join(job.command()[3:]))
        return commands


def build_studio(studio: Studio):
    import gradio as gr

    study = studio.study

    def fail(error: Exception):
        raise gr.Error(str(error)) from None

    # ---- Photos ------------------------------------------------------------------------------------------------
    def create_subject(token, class_word, real_name, base):
        try:
            config = study.create(token.strip(), class_word.strip(), real_name.strip() or None, base)
        except LookalikeError as error:
            fail(error)
        return f"Study created: `{config.subject.token}` ({config.subject.class_word}), photos in " \
               f"`{config.subject.images}`. Add photos below.", study.text()

    def add_photos(files):
        try:
            if not study.exists:
                raise LookalikeError("create the subject first")
            if len(files or []) > MAX_FILES_PER_UPLOAD * 4:
                raise LookalikeError(f"at most {MAX_FILES_PER_UPLOAD * 4} photos at a time")
            added = study.add_photos([Path(f) for f in files or []])
        except LookalikeError as error:
            fail(error)
        return f"Added {len(added)} photos: {', '.join(added) or 'none new'}. Now prepare them."

    def prepare(progress=gr.Progress()):
        try:
            progress(0.1, desc="prepare")
            prepare_study(study.config(), display.console(quiet=True))
        except LookalikeError as error:
            fail(error)
        return (*qa_view(), "Prepared. Command: `lookalike prepare studio/study.toml`")

    def caption_photos(model):
        try:
            caption_study(study.config(), model.strip() or None, display.console(quiet=True))
        except LookalikeError as error:
            fail(error)
        return (*qa_view(), f"Captioned. Command: `lookalike caption studio/study.toml --model {model.strip()}`")

    def qa_view():
        """The QA grid (each photo's thumbnail, status and every flag) and the names to choose from."""
        if not study.exists:
            return [], gr.update(choices=[]), gr.update(choices=[])
        config = study.config()
        manifest = data_folder(config, config.subject) / "manifest.json"
        photos = read_json(manifest)["photos"] if manifest.is_file() else []
        data = manifest.parent
        items = [(str(data / p["thumbnail"]) if p.get("thumbnail") else p["source"],
                  f"{Path(p['source']).name}: {p['status']}" + (f" ({'; '.join(p['reasons'])})" if p["reasons"]
                                                                 else "")) for p in photos]
        names = [Path(p["source"]).name for p in photos]
        kept = [Path(p["source"]).name for p in photos if p["status"] == "kept"]
        return items, gr.update(choices=names), gr.update(choices=kept)

    def choose(name, choice):
        """Exclude a photo, keep it over the checks, or leave it to them; prepared again at once."""
        try:
            subject = study.config().subject
            exclude = [n for n in subject.exclude if n != name] + ([name] if choice == "exclude" else [])
            keep = [n for n in subject.keep if n != name] + ([name] if choice == "keep" else [])
            study.set({"subject.exclude": exclude or None, "subject.keep": keep or None})
        except LookalikeError as error:
            fail(error)
        return prepare()

    def photo_record(name) -> dict | None:
        config = study.config()
        manifest = data_folder(config, config.subject) / "manifest.json"
        photos = read_json(manifest)["photos"] if manifest.is_file() else []
        return next((p for p in photos if Path(p["source"]).name == name), None)

    def caption_of(name):
        record = photo_record(name) if name else None
        return (record or {}).get("caption") or ""

    def save_caption(name, text):
        """Into data/captions/, the captions prepare reads (as `lookalike caption` writes them); a caption the user
        keeps beside the photo wins there and is theirs to edit."""
        try:
            record = photo_record(name) if name else None
            if record is None or not text.strip():
                raise LookalikeError("choose a kept photo and write its caption")
            beside = Path(record["source"]).with_suffix(".txt")
            if beside.is_file():
                raise LookalikeError(f"{name}'s caption is the file beside it, {beside.name}: edit it there")
            config = study.config()
            file = caption_file(data_folder(config, config.subject), SimpleNamespace(**record))
            with atomic_path(file) as tmp:
                tmp.write_text(text.strip() + "\n")
        except LookalikeError as error:
            fail(error)
        return prepare()

    # ---- Train -------------------------------------------------------------------------------------------------
    def check_text(text):
        try:
            study.config(text)
            return "valid"
        except LookalikeError as error:
            return f"**error:** {error}"

    def save_text(text):
        try:
            study.save(text)
        except LookalikeError as error:
            fail(error)
        return "saved"

    def apply_settings(base, preset, *values):
        """The base, the preset's keys and the main keys typed in, into the study; the Photos page's base follows."""
        settings = {"model.base": base, **presets(base).get(preset, {})}
        settings.update({key: value for key, value in zip(MAIN_KEYS, values) if value not in (None, "")})
        try:
            study.set(settings)
        except LookalikeError as error:
            fail(error)
        return study.text(), "applied", gr.update(value=base)

    def choose_base(base):
        """A base's facts, and its presets to choose from."""
        return base_note(base), gr.update(choices=["(keep)", *presets(base)], value="(keep)")

    def memory(gpu):
        try:
            return "\n".join(dry_run_lines(study.config(), parse_gpu_memory(gpu) if gpu else None))
        except LookalikeError as error:
            fail(error)

    def start_run(name):
        try:
            commands = studio.submit([name.strip() or "default"])
        except LookalikeError as error:
            fail(error)
        return "Queued: `" + "`, `".join(commands) + "`"

    def start_sweep():
        try:
            commands = studio.submit([planned.name for planned in experiments(study.config())])
        except LookalikeError as error:
            fail(error)
        return f"Queued {len(commands)} runs: `" + "`, `".join(commands) + "`"

    # ---- Jobs --------------------------------------------------------------------------------------------------
    def jobs_table():
        jobs = {job.run: job for job in studio.queue.jobs()}  # each run's latest job
        rows = []
        waiting = [name for name in jobs if not study.workspace.run(name).root.exists()]  # queued, not started yet
        for run in runs_of(study.workspace.runs) + waiting:
            job = jobs.get(run)
            state = studio.queue.state(job) if job else study.workspace.run(run).state()
            progress = run_progress(study.workspace.run(run))
            rows.append([run, state, progress.step, progress.steps, cell(progress.loss), progress.best_step,
                         f"job {job.id}" if job else "terminal"])
        return rows

    def watch(run, sent):
        """The Jobs page's parts, each sent only when it changed since this page last got it (`sent`: what each
        was made from then): a refresh while a run trains sends its progress line and loss chart, and draws the
        scores figure only when a sample step was scored."""
        sent = dict(sent or {})

        def fresh(part: str, made_from, make):
            if sent.get(part) == made_from:
                return gr.skip()
            sent[part] = made_from
            return make()

        table = jobs_table()
        names = [row[0] for row in table]
        run = run if run in names else (names[0] if names else None)
        if run is None:
            return table, gr.update(choices=[]), "No run yet.", None, None, [], "", {}
        paths = study.workspace.run(run)
        line, log_text = run_progress(paths).line(), log_tail(paths)
        gallery = sample_gallery(paths, newest=SAMPLES_SHOWN)
        return (fresh("table", table, lambda: table),
                fresh("chosen", (names, run), lambda: gr.update(choices=names, value=run)),
                fresh("line", line, lambda: line),
                fresh("loss", (run, file_signature(paths.metrics)), lambda: loss_points(paths)),
                fresh("scores", (run, file_signature(paths.sample_scores)), lambda: scores_figure(paths)),
                fresh("samples", gallery, lambda: gallery),
                fresh("log", log_text, lambda: log_text),
                sent)

    def job_action(run, action):
        try:
            job = next((j for j in reversed(studio.queue.jobs()) if j.run == run), None)
            if action in ("resume", "retry") and job is None:
                job = studio.queue.job(studio.queue.submit(study.snapshot(run), run).id)  # a terminal's run
            elif job is None:
                raise LookalikeError(f"run {run!r} has no studio job")
            elif action == "stop":
                studio.queue.stop(job.id)
            elif action == "cancel":
                studio.queue.cancel(job.id)
            else:
                studio.queue.requeue(job.id)
        except LookalikeError as error:
            fail(error)
        return f"{action}: {run}"

    # ---- Compare -----------------------------------------------------------------------------------------------
    def results():
        import pandas

        rows = refresh(study.workspace.runs, study.workspace.results) if study.workspace.runs.is_dir() else []
        columns = result_columns(rows) if rows else {}
        return pandas.DataFrame([[shown(row, key) for key in columns] for row in rows], columns=list(columns.values()))

    def compare(chosen):
        """The chosen runs' checkpoints side by side: a grid of each sample step's images, a row per prompt and a
        column per (run, step); then the images generate drew with the final and best LoRAs (only those that
        LoRA drew)."""
        items = []
        for run in chosen or []:
            paths = study.workspace.run(run)
            for checkpoint in ("final", "best"):
                for image in paths.images_made_by(checkpoint, paths.lora_sha256(checkpoint))[0]:
                    items.append((str(image), f"{run} ({checkpoint}): {image.stem}"))
        return sample_grid([study.workspace.run(run) for run in chosen or []], study.config().fill), items

    def build_report():
        """The report, as `lookalike report` writes it: a link to the whole page, and its figures here."""
        from lookalike.report.build import build_report as report

        try:
            page = report(study.config(), display.console(quiet=True))
        except LookalikeError as error:
            fail(error)
        figures = [(str(path), path.stem) for path in sorted((page.parent / "figures").glob("*.png"))]
        return (f"[Open the report](/gradio_api/file={page}) (`lookalike report studio/study.toml`: {page})",
                figures)

    # ---- Share -------------------------------------------------------------------------------------------------
    def export(run, checkpoint, layout, dtype, card):
        """The run's LoRA in `layout`, with its model card (README.md and its images) where asked, each a download;
        in studio/exports/<run>-<checkpoint>/, written again on each export."""
        from lookalike.models.card import card_plan, write_card
        from lookalike.models.export import export_lora
        from lookalike.outputs import check_lora_out

        try:
            paths = study.workspace.run(run)
            source = paths.lora_at(checkpoint)
            out = study.folder / "exports" / f"{run}-{checkpoint}" / f"{run}-{checkpoint}.{layout}.safetensors"
            check_lora_out(out, [source], force=True, workspace=study.workspace.root)
            shown = card_plan(paths, checkpoint, out) if card else []
            files = [str(export_lora(source, out, layout, dtype))]
            if card:
                files.append(str(write_card(study.config(), paths, checkpoint, out, layout, shown)))
                files += [str(out.parent / "images" / name) for _, name, _ in shown]
        except LookalikeError as error:
            fail(error)
        return files, (f"`lookalike export studio/study.toml --run {run} --checkpoint {checkpoint} --format {layout} "
                       f"--dtype {dtype} --out {out}{' --card' if card else ''} --force`")

    def merge(run_a, weight_a, run_b, weight_b):
        """Two runs' LoRAs merged exactly (two people's, for group photos), a download."""
        from lookalike.models.merge import merge_loras
        from lookalike.outputs import check_lora_out

        try:
            if not run_a or not run_b:
                raise LookalikeError("choose two runs")
            sources = [study.workspace.lora_of(run_a), study.workspace.lora_of(run_b)]
            out = study.folder / "exports" / f"merge-{run_a}-{run_b}.safetensors".replace("@", "-")
            check_lora_out(out, sources, force=True, workspace=study.workspace.root)
            merged = merge_loras(sources[0], sources[1], out, (float(weight_a), float(weight_b)))
        except LookalikeError as error:
            fail(error)
        return str(merged), (f"`lookalike merge {run_a} {run_b} --config studio/study.toml --weights "
                             f"{float(weight_a):g},{float(weight_b):g} --out {out} --force`")

    bases = sorted(KNOWN_BASES)
    initial = study.config() if study.exists else None
    with gr.Blocks(title="lookalike studio") as app:
        gr.Markdown("# lookalike studio")
        with gr.Tabs():
            with gr.Tab("Photos"):
                with gr.Row():
                    token = gr.Textbox(label="token (trigger word)", value=initial.subject.token if initial else "")
                    class_word = gr.Textbox(label="class word", value=initial.subject.class_word if initial else "man")
                    real_name = gr.Textbox(label="real name (optional)")
                    new_base = gr.Dropdown(bases, label="base", value=initial.model.base if initial else "flux-dev")
                create = gr.Button("Create subject", interactive=not study.exists)
                photos_note = gr.Markdown()
                uploads = gr.File(label="photos", file_count="multiple", file_types=["image"])
                prepare_button = gr.Button("Prepare", variant="primary")
                with gr.Row():
                    captioner = gr.Textbox(label="captioner (an image-to-text model: hub id or folder)",
                                           value=initial.data.captioner or "" if initial else "")
                    caption_button = gr.Button("Caption the kept photos")
                grid = gr.Gallery(label="QA: every photo with what prepare found", columns=6, height="auto")
                with gr.Row():
                    photo = gr.Dropdown([], label="photo")
                    exclude = gr.Button("Exclude")
                    keep = gr.Button("Keep")
                    checks = gr.Button("Leave to the checks")
                with gr.Row():
                    kept_photo = gr.Dropdown([], label="kept photo")
                    caption = gr.Textbox(label="caption")
                    save_caption_button = gr.Button("Save caption")
            with gr.Tab("Train"):
                with gr.Row():
                    base = gr.Dropdown(bases, label="base", value=initial.model.base if initial else "flux-dev")
                    first_base = initial.model.base if initial else "flux-dev"
                    preset = gr.Dropdown(["(keep)", *presets(first_base)], value="(keep)", label="preset")
                base_facts = gr.Markdown(base_note(initial.model.base if initial else "flux-dev"))
                with gr.Row():
                    fields = [gr.Number(label=key, value=None, precision=decimals)
                              for key, decimals in MAIN_KEYS.items()]
                apply = gr.Button("Apply")
                with gr.Row():
                    gpu = gr.Textbox(label="GPU memory (e.g. 24GB)")
                    estimate = gr.Button("Estimate memory")
                estimate_out = gr.Code(label="train --dry-run", language=None)
                editor = gr.Code(study.text(), label="study.toml", language=None, interactive=True)
                validity = gr.Markdown()
                save = gr.Button("Save config")
                with gr.Row():
                    run_name = gr.Textbox(label="run name", value="default")
                    start = gr.Button("Start run", variant="primary")
                    sweep = gr.Button("Start sweep")
                train_note = gr.Markdown()
            with gr.Tab("Jobs"):
                table = gr.Dataframe(headers=["run", "state", "step", "steps", "loss", "best step", "started by"],
                                     interactive=False, label="runs")
                with gr.Row():
                    chosen = gr.Dropdown([], label="run")
                    stop, resume, cancel, retry = (gr.Button(label) for label in ("Stop", "Resume", "Cancel", "Retry"))
                job_note = gr.Markdown()
                progress_line = gr.Markdown()
                with gr.Row():
                    loss_plot = gr.LinePlot(x="step", y="loss (smoothed)", label="training loss", height=320)
                    scores_plot = gr.Plot(label="identity and CLIP Score (best step starred)")
                samples = gr.Gallery(label="samples", columns=6, height="auto")
                log = gr.Code(label="log", language=None)
                timer = gr.Timer(REFRESH_S)
            with gr.Tab("Compare") as compare_tab:
                results_table = gr.Dataframe(label="results (sortable)", interactive=False)
                refresh_results = gr.Button("Refresh")
                runs_to_compare = gr.Dropdown([], multiselect=True, label="runs side by side")
                compared_grid = gr.HTML(label="samples: a row per prompt, a column per run and step")
                compared = gr.Gallery(label="drawn by each run's final and best LoRA", columns=6, height="auto")
                report_button = gr.Button("Build report")
                report_note = gr.Markdown()
                report_figures = gr.Gallery(label="the report's figures", columns=2, height="auto")
            with gr.Tab("Try"):
                if initial is not None and initial.subject.images.is_dir() and any(initial.subject.images.iterdir()):
                    build_app(initial, DemoModels(initial, follow=study.config)).render()
                else:
                    gr.Markdown("Add photos and train a run: then draw with it here (restart the studio).")
            with gr.Tab("Share") as share_tab:
                with gr.Row():
                    share_run = gr.Dropdown([], label="run")
                    share_checkpoint = gr.Dropdown(["final", "best"], value="final", label="checkpoint")
                    layout = gr.Dropdown(["comfyui", "kohya", "diffusers"], value="comfyui", label="format")
                    dtype = gr.Dropdown(["fp32", "bf16"], value="bf16", label="dtype")
                    card = gr.Checkbox(label="model card", value=True)
                export_button = gr.Button("Export")
                exported = gr.File(label="download", file_count="multiple")
                export_note = gr.Markdown()
                with gr.Row():
                    merge_a = gr.Dropdown([], label="first run")
                    merge_weight_a = gr.Number(1.0, label="its weight")
                    merge_b = gr.Dropdown([], label="second run")
                    merge_weight_b = gr.Number(1.0, label="its weight")
                merge_button = gr.Button("Merge")
                merged = gr.File(label="merged LoRA")
                merge_note = gr.Markdown()

        create.click(create_subject, [token, class_word, real_name, new_base], [photos_note, editor]).then(
            lambda: gr.update(interactive=False), None, [create])
        uploads.upload(add_photos, [uploads], [photos_note])
        prepare_button.click(prepare, None, [grid, photo, kept_photo, photos_note])
        caption_button.click(caption_photos, [captioner], [grid, photo, kept_photo, photos_note],
                             api_name="caption_photos")
        for button, choice in ((exclude, "exclude"), (keep, "keep"), (checks, None)):
            button.click(lambda name, choice=choice: choose(name, choice), [photo],
                         [grid, photo, kept_photo, photos_note])
        kept_photo.change(caption_of, [kept_photo], [caption])
        save_caption_button.click(save_caption, [kept_photo, caption], [grid, photo, kept_photo, photos_note])
        base.change(choose_base, [base], [base_facts, preset])
        apply.click(apply_settings, [base, preset, *fields], [editor, validity, new_base])
        estimate.click(memory, [gpu], [estimate_out])
        editor.change(check_text, [editor], [validity])
        save.click(save_text, [editor], [validity])
        start.click(start_run, [run_name], [train_note])
        sweep.click(start_sweep, None, [train_note])
        sent = gr.State({})  # what this page was last sent of each part of the Jobs page
        watched = [table, chosen, progress_line, loss_plot, scores_plot, samples, log, sent]
        timer.tick(watch, [chosen, sent], watched)
        chosen.change(watch, [chosen, sent], watched)
        for button, action in ((stop, "stop"), (resume, "resume"), (cancel, "cancel"), (retry, "retry")):
            button.click(lambda run, action=action: job_action(run, action), [chosen], [job_note])
        def trained_runs():
            choices = runs_of(study.workspace.runs)
            return (gr.update(choices=choices),) * 4

        run_lists = [runs_to_compare, share_run, merge_a, merge_b]
        refresh_results.click(results, None, [results_table]).then(trained_runs, None, run_lists)
        for tab in (compare_tab, share_tab):  # the runs as they are when the page is opened
            tab.select(trained_runs, None, run_lists)
        runs_to_compare.change(compare, [runs_to_compare], [compared_grid, compared])
        report_button.click(build_report, None, [report_note, report_figures])
        export_button.click(export, [share_run, share_checkpoint, layout, dtype, card], [exported, export_note])
        merge_button.click(merge, [merge_a, merge_weight_a, merge_b, merge_weight_b], [merged, merge_note])
        app.load(qa_view, None, [grid, photo, kept_photo])
    return app
