"""lookalike demo: the interactive Gradio app. Pick a trained LoRA of the workspace (or two, with weights),
generate, and see at once how the image scores: CLIP Score, face distance and identity similarity against
reference photos that can be added and removed in the app.

Secure by default: it binds 127.0.0.1, shares nothing publicly unless asked (and warns when it is reachable
without a password), can require a password (failed logins throttled), offers only the safetensors LoRAs of
the workspace's runs (the browser sends a run's name, never a path), checks every upload (size and count per
request, a readable image with a face) before use, keeps uploads and its own temporary files inside the
workspace, shows the user no server path or Python internals, and queues requests so that concurrent users
take turns on the one model.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from lookalike.config import StudyConfig
from lookalike.data.images import load_rgb
from lookalike.demo_guard import LoginFirst, LoginThrottle, UploadLimit, is_loopback
from lookalike.display import trained_base
from lookalike.errors import LookalikeError
from lookalike.evaluate.command import load_evaluator, reference_photos
from lookalike.evaluate.scoring import ImageScore, clip_prompt
from lookalike.generate import image_size, offload_pipeline, render
from lookalike.models.base import (
    check_drawing_base,
    drawing_base,
    guidance_scales,
    inference_dtype,
    inference_steps,
    load_pipeline,
    pick_device,
    text_encoding,
)
from lookalike.models.checkpoint import resolve_drawing_base
from lookalike.models.lora import check_lora_file, load_lora_into, lookalike_metadata
from lookalike.trained_on import trained_base_problem
from lookalike.workspace import Workspace, atomic_path, file_sha256, write_json

NONE = "(none)"
MAX_UPLOAD_MB = 10  # per file
MAX_FILES_PER_UPLOAD = 8
MAX_REFERENCES = 32
REFRESH_S = 15  # how often the list of trained runs is read again
MAX_SEED = 2**63 - 1  # torch's generators take a signed 64-bit seed
LIMITS = {"steps": (1, 100), "size": (64, 2048), "guidance": (0.0, 30.0)}
# Image sides every base draws at: multiples of 32 px (Qwen-Image 2.1's 16x VAE and 2x2 image slots; the other
# transformers need 16, the SD pipelines 8).
SIDE_STEP = 32
TEMPORARY_FILES_S = 3600  # gradio's own copies (uploads, images it serves) are deleted after an hour


class DemoError(Exception):
    """A request the app refuses, with the message shown to the user."""


def _lora_base(path: Path) -> str | None:
    """The base a LoRA file says it was trained on (None: it does not say, or cannot be read)."""
    try:
        return lookalike_metadata(check_lora_file(path)).get("base_model")
    except LookalikeError:
        return None


def _what_draws(config: StudyConfig) -> tuple:
    """The settings the app's pipeline is loaded by: another value of any of them needs another pipeline."""
    return config.model.base, config.model.checkpoint, config.generate.base, config.generate.offload


class DemoModels:
    """The pipeline, its loaded LoRAs and the evaluator, loaded once and shared by every user (the queue lets
    one request run at a time, so the pipeline's adapters are never switched under another request).

    follow: where the study's config comes from while the app runs (the studio's study, which its Train page
    edits). Each request then reads it again; a change of what draws (the base, its fine-tune, the drawing base,
    offloading) lets the loaded pipeline and its adapters go, and one of the evaluation settings or the people the
    evaluator."""

    def __init__(self, config: StudyConfig, follow: Callable[[], StudyConfig] | None = None):
        self.config = config
        self._follow = follow
        self.workspace = Workspace(config.workspace)
        self.folder = self.workspace.root / "demo"
        self._pipe = None
        self._adapters: set[str] = set()
        self._evaluator = None
        self._references: dict[tuple[str, ...], object] = {}
        self._lock = threading.Lock()

    def current(self) -> StudyConfig:
        """The study as it is now (the followed one's config, read again)."""
        self._refresh()
        return self.config

    def _refresh(self) -> None:
        """The followed study's config, now; what the change makes stale is let go (loaded again when asked)."""
        if self._follow is None:
            return
        config = self._follow()
        if _what_draws(config) != _what_draws(self.config):
            with self._lock:
                self._pipe, self._adapters = None, set()
        if (config.evaluate, config.people) != (self.config.evaluate, self.config.people):
            self._evaluator, self._references = None, {}
        self.config = config

    def lora_choices(self) -> list[str]:
        """The runs of the workspace that have a trained LoRA for the base the app draws with ([model] base, with
        its fine-tune where model.checkpoint names one): the only LoRAs the app loads (a study across bases lists
        the others under their own base's config). A run whose best sample step was kept is also listed as
        `<run>@best`."""
        self._refresh()
        runs = self.workspace.runs
        files = sorted(runs.glob("*/lora.safetensors")) if runs.is_dir() else []
        names = [f.parent.name for f in files if _lora_base(f) in (None, self.config.model.base)
                 and trained_base_problem(self.workspace.run(f.parent.name), self.config) is None]
        return [choice for name in names
                for choice in [name] + ([f"{name}@best"] if self.workspace.run(name).best_lora.is_file() else [])]

    def lora_path(self, name: str) -> Path:
        if name not in self.lora_choices():
            raise DemoError(f"LoRA {name!r} is not a trained run of this workspace")
        return self.workspace.lora_of(name)

    def pipe(self):
        self._refresh()
        if self._pipe is None:
            device = pick_device()
            pipe = load_pipeline(resolve_drawing_base(self.config), dtype=inference_dtype(device))
            if self.config.generate.offload:  # LoRAs load later: diffusers offloads their weights as they come
                offload_pipeline(pipe, device)
            else:
                pipe.to(device)
            self._pipe = pipe
        return self._pipe

    def render(self, loras: list[tuple[str, float, str]], prompt: str, seed: int, guidance: float | None,
               steps: int, size: int, progress=None):
        """One image with the given LoRAs (name, weight, the file's SHA-256) at their weights (diffusers' weighted
        adapters; none: the base). Adapters are kept by their file's content: a run retrained, or a best step
        that moved on, while the app is open loads as the new file it is."""
        pipe = self.pipe()
        with self._lock:
            adapters = [f"sha256_{sha256[:16]}" for _, _, sha256 in loras]
            for (name, _, _), adapter in zip(loras, adapters):
                if adapter not in self._adapters:
                    load_lora_into(pipe, self.lora_path(name), adapter_name=adapter)
                    self._adapters.add(adapter)
            if loras:
                pipe.enable_lora()
                pipe.set_adapters(adapters, [weight for _, weight, _ in loras])
            elif self._adapters:
                pipe.disable_lora()
            pipe.set_progress_bar_config(disable=True)
            callback = None
            if progress is not None:
                def callback(_pipe, step, _timestep, kwargs):
                    progress((step + 1) / steps, desc="generating")
                    return kwargs
            return render(pipe, prompt=prompt, seed=seed, guidance=guidance, steps=steps, size=size,
                          text=text_encoding(self.config.model), callback=callback)

    def evaluator(self):
        if self._evaluator is None:
            self._evaluator = load_evaluator(self.config.evaluate, with_clip=True)
        return self._evaluator

    def reference(self, photos: list[str]):
        key = tuple(photos)
        if key not in self._references:
            self._references[key] = self.evaluator().reference([Path(p) for p in photos])
        return self._references[key]

    def score(self, image_path: Path, prompt: str, photos: list[str]) -> dict:
        self._refresh()
        row = ImageScore(image=image_path.name, prompt=prompt,
                         clip_prompt=clip_prompt(prompt, {p.token: p.class_word for p in self.config.people}))
        self.evaluator().score([image_path], [row], self.reference(photos))
        return {"clip_score": row.clip_score, "face_distance": row.face_distance,
                "identity_similarity": row.identity_similarity, "id_match": row.id_match,
                "faces": row.n_faces, "references": len(photos)}

    def keep_image(self, image, facts: dict) -> Path:
        """Save a generated image with its settings (sidecar first, image last), named by its settings."""
        digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:12]
        path = self.folder / "images" / f"{digest}.png"
        write_json(path.with_suffix(".json"), facts)
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
        return path

    def check_upload(self, path: str) -> Path:
        """An uploaded reference photo, re-encoded into the workspace once it has proven to be a readable image
        with a face; anything else is refused with the reason."""
        import gradio

        source = Path(path).resolve()
        if not source.is_relative_to(Path(gradio.utils.get_upload_folder()).resolve()):
            raise DemoError("refused: uploads must come through the app")
        name = Path(path).name
        try:
            image = load_rgb(source)
        except OSError as error:  # its reason, without the server's path to the upload
            reason = str(error).replace(str(path), name).replace(str(source), name)
            raise DemoError(f"{name} is not a readable image ({reason})") from None
        finally:
            source.unlink(missing_ok=True)  # only the checked copy below is kept
        evaluator = self.evaluator()  # its face rule: the one the images are scored by
        if not evaluator.rule.faces(evaluator.backend, image):
            raise DemoError(f"{name}: no face found; a reference photo must show the person's face")
        digest = hashlib.sha256(image.tobytes()).hexdigest()[:16]
        kept = self.folder / "references" / f"{digest}.png"
        if not kept.is_file():
            with atomic_path(kept) as tmp:
                image.save(tmp, format="PNG")
        return kept


def build_app(config: StudyConfig, models: DemoModels | None = None):
    import gradio as gr

    models = models or DemoModels(config)
    keep_temporary_files_in(models.folder / ".gradio")
    starting_references = [str(p) for p in reference_photos(config)]

    def drawing_settings(current: StudyConfig) -> tuple:
        """The page's header, and its guidance, steps and size sliders' settings at the study's drawing defaults
        (the studio's Train page may change the base while the page is open)."""
        takes_guidance, size = guidance_scales(current) != [None], image_size(current)
        drawn = "" if drawing_base(current) == current.model.base else f", drawn with `{drawing_base(current)}`"
        header = (f"# lookalike: {current.name}\nBase model "
                  f"`{trained_base(current.model.base, current.model.checkpoint)}`{drawn}, subject "
                  f"`{current.subject.token}`. Every image is scored at once against the reference photos below.")
        return (header,
                {"value": guidance_scales(current)[0] or 0.0, "interactive": takes_guidance,
                 "label": "guidance scale" if takes_guidance else "guidance (this base takes none)"},
                {"value": inference_steps(current)},
                {"value": size // SIDE_STEP * SIDE_STEP, "maximum": max(1536, size)})

    def loras_of(lora_a, weight_a, lora_b, weight_b) -> list[tuple[str, float, str]]:
        """(name, weight, SHA-256 of its file now) of each chosen LoRA; lora_path refuses anything that is not a
        trained run of this workspace."""
        return [(name, float(weight), file_sha256(models.lora_path(name)))
                for name, weight in ((lora_a, weight_a), (lora_b, weight_b)) if name and name != NONE]

    def generate(lora_a, weight_a, lora_b, weight_b, prompt, seed, guidance, steps, side, references, history,
                 progress=gr.Progress()):
        try:
            loras = loras_of(lora_a, weight_a, lora_b, weight_b)
            if not prompt or not prompt.strip():
                raise DemoError("write a prompt first")
            _check_settings(seed, steps, side, guidance)
            side, current = int(side) // SIDE_STEP * SIDE_STEP, models.current()
            guidance = float(guidance) if guidance_scales(current) != [None] else None
            image = models.render(loras, prompt, int(seed), guidance, int(steps), side, progress)
            facts = {"prompt": prompt, "seed": int(seed), "guidance_scale": guidance, "steps": int(steps),
                     "size": side, "base_model": drawing_base(current),
                     "loras": [{"name": name, "weight": weight, "sha256": sha256} for name, weight, sha256 in loras]}
            path = models.keep_image(image, facts)
            scores = models.score(path, prompt, references)
        except (DemoError, LookalikeError) as error:  # said in the page, as the command line says it
            raise gr.Error(str(error)) from None
        caption = f"{' + '.join(f'{n}x{w:g}' for n, w, _ in loras) or 'base'} | seed {int(seed)} | {_brief(scores)}"
        history = history + [(str(path), caption)]
        return image, scores, _shown(history), {"path": str(path), "prompt": prompt}, history

    def add_references(files, references, last):
        try:
            files = files or []
            if len(files) > MAX_FILES_PER_UPLOAD:
                raise DemoError(f"at most {MAX_FILES_PER_UPLOAD} photos at a time")
            if len(references) + len(files) > MAX_REFERENCES:
                raise DemoError(f"at most {MAX_REFERENCES} reference photos")
            added = [str(models.check_upload(f)) for f in files]
        except DemoError as error:
            raise gr.Error(str(error)) from None
        references = references + [p for p in added if p not in references]
        return (references, _rescore(last, references), _shown([(p, Path(p).name) for p in references]),
                gr.update(choices=_names(references)))

    def remove_references(names, references, last):
        kept = [p for p in references if Path(p).name not in (names or [])]
        if not kept:
            raise gr.Error("keep at least one reference photo")
        return (kept, _rescore(last, kept), _shown([(p, Path(p).name) for p in kept]),
                gr.update(choices=_names(kept), value=[]))

    def _rescore(last, references):
        return models.score(Path(last["path"]), last["prompt"], references) if last else None

    def refresh(shown):
        """The runs' LoRAs as they are now; and, where the study now draws with something else than the page
        shows (`shown`), the page's drawing settings at its defaults (else the user's own stay)."""
        choices = models.lora_choices()
        lists = gr.update(choices=choices), gr.update(choices=[NONE, *choices])
        current = models.current()
        if _what_draws(current) == shown:
            return *lists, *(gr.skip(),) * 4, shown
        header, *sliders = drawing_settings(current)
        return *lists, header, *(gr.update(**slider) for slider in sliders), _what_draws(current)

    choices = models.lora_choices()
    with gr.Blocks(title=f"lookalike: {config.name}", delete_cache=(TEMPORARY_FILES_S, TEMPORARY_FILES_S)) as app:
        header, *starting = drawing_settings(config)
        title = gr.Markdown(header)
        shown = gr.State(_what_draws(config))  # what draws, as the page's settings show it
        references = gr.State(starting_references)
        history = gr.State([])
        last = gr.State(None)
        with gr.Row():
            with gr.Column():
                lora_a = gr.Dropdown(choices, value=choices[0] if choices else None, label="LoRA (a trained run)")
                weight_a = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="its weight")
                lora_b = gr.Dropdown([NONE, *choices], value=NONE, label="second LoRA (optional)")
                weight_b = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="its weight")
                refresh_button = gr.Button("Refresh the list of runs", size="sm")
                prompt = gr.Textbox(config.fill(config.generate.prompts[0]), label="prompt")
                with gr.Row():
                    seed = gr.Number(0, precision=0, minimum=0, maximum=MAX_SEED, label="seed")
                    guidance = gr.Slider(0.0, 10.0, step=0.5, **starting[0])
                    steps = gr.Slider(1, 50, step=1, label="steps", **starting[1])
                    side = gr.Slider(64, step=SIDE_STEP, label="size (pixels)", **starting[2])
                go = gr.Button("Generate", variant="primary")
            with gr.Column():
                image = gr.Image(type="pil", label="image", interactive=False, format="png", height=360)
                scores = gr.JSON(label="scores")
        with gr.Accordion("Reference photos", open=False):
            reference_gallery = gr.Gallery(_shown([(p, Path(p).name) for p in starting_references]),
                                           label="references", columns=8, height=180)
            uploads = gr.File(file_count="multiple", file_types=["image"], label="add photos")
            add = gr.Button("Add these photos")
            to_remove = gr.Dropdown(_names(starting_references), multiselect=True, label="remove photos")
            remove = gr.Button("Remove")
        gallery = gr.Gallery(label="this session's images (with their scores and settings)", columns=6, height=280,
                             object_fit="contain")

        go.click(generate, [lora_a, weight_a, lora_b, weight_b, prompt, seed, guidance, steps, side, references,
                            history],
                 [image, scores, gallery, last, history], api_name="generate")
        add.click(add_references, [uploads, references, last], [references, scores, reference_gallery, to_remove],
                  api_name="add_references")
        remove.click(remove_references, [to_remove, references, last],
                     [references, scores, reference_gallery, to_remove], api_name="remove_references")
        followed = [lora_a, lora_b, title, guidance, steps, side, shown]
        refresh_button.click(refresh, [shown], followed, api_name="refresh")
        gr.Timer(REFRESH_S).tick(refresh, [shown], followed, api_name=False)  # runs finishing, a base changed
    return app.queue(default_concurrency_limit=1, max_size=32)


def _shown(items: list[tuple[str, str]]) -> list:
    """Images for a gallery as pictures, not paths: the browser never learns or names a file of this machine
    (and gradio serves only files it made itself)."""
    from PIL import Image

    shown = []
    for path, caption in items:
        with Image.open(path) as image:
            thumbnail = image.convert("RGB")
        thumbnail.thumbnail((512, 512))
        shown.append((thumbnail, caption))
    return shown


def _names(paths: list[str]) -> list[str]:
    return [Path(p).name for p in paths]


def _brief(scores: dict) -> str:
    shown = {"clip_score": "CLIP", "face_distance": "face distance", "identity_similarity": "identity"}
    return ", ".join(f"{label} {scores[k]:.3f}" for k, label in shown.items() if scores.get(k) is not None) or \
        "no face"


def _check_settings(seed, steps, side, guidance) -> None:
    """The request's numbers within what the app offers (a script can send any number, not only the sliders')."""
    if seed is None or not 0 <= int(seed) <= MAX_SEED:
        raise DemoError(f"the seed must be a whole number from 0 to {MAX_SEED}")
    for label, value in (("steps", steps), ("size", side), ("guidance", guidance)):
        low, high = LIMITS[label]
        if value is None or not low <= float(value) <= high:
            raise DemoError(f"{label} must be from {low:g} to {high:g}")


def keep_temporary_files_in(folder: Path) -> None:
    """gradio's uploads and the copies of images it serves go to `folder` (in the workspace, readable by this
    user only), not to the shared temporary folder. Read by gradio when the app is built."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    os.environ["GRADIO_TEMP_DIR"] = str(folder)


def serve_options(credentials: tuple[str, str] | None) -> dict:
    """gradio launch settings that guard the app: uploads limited per file and per request, logins throttled,
    and no error of the server's own (with its paths and internals) shown to the user, only the app's."""
    from starlette.middleware import Middleware

    limit = Middleware(UploadLimit, max_files=MAX_FILES_PER_UPLOAD,
                       max_bytes=MAX_FILES_PER_UPLOAD * (MAX_UPLOAD_MB + 1) * 2**20)  # + multipart framing
    guards = [limit, Middleware(LoginFirst)] if credentials else [limit]
    return {"max_file_size": f"{MAX_UPLOAD_MB}mb", "show_error": False, "app_kwargs": {"middleware": guards},
            "auth": LoginThrottle(*credentials) if credentials else None}


def launch(config: StudyConfig, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           credentials: tuple[str, str] | None = None, block: bool = True):
    """Start the app; returns the Blocks (with block=False, once it serves)."""
    check_drawing_base(config)  # a drawing base no LoRA here fits is refused before anything serves
    resolve_drawing_base(config)  # and a fine-tune (model.checkpoint) that is not of the base, by name
    if credentials is None and (share or not is_loopback(host)):
        reach = "a public gradio.live link" if share else f"every machine that can reach {host}:{port}"
        print(f"WARNING: the demo is open to {reach} without a password: anyone there can generate with your "
              "LoRAs and upload files. Add --auth-file FILE (a line user:password) or set LOOKALIKE_DEMO_AUTH.",
              file=sys.stderr, flush=True)
    app = build_app(config)
    app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block, quiet=not block,
               **serve_options(credentials))
    return app
