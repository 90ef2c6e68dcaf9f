"""lookalike studio, used as a person uses it: in real Chromium (Debian's, driven through playwright), from an empty
workspace to an exported LoRA; its job queue across a server restart; a run started in a terminal; its guards."""

from __future__ import annotations

import html
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lookalike.models.lora import check_lora_file, lookalike_metadata
from lookalike.studio.serve import serve
from lookalike.studio.study import StudioStudy
from lookalike.workspace import Workspace, read_json, read_metrics
from tests.conftest import PHOTOS, run_in_process

pytestmark = pytest.mark.slow  # trains and serves: `make test` only

CHROMIUM = shutil.which("chromium")
STEPS = 200  # long enough to be watched, stopped and resumed (about 50 s on the tiny model)
# The runs of the studio killed mid-job: still training when a server is killed 8 steps in (a few seconds more).
KILLED_STEPS = 60


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def study_toml(workspace: Path, steps: int) -> str:
    """The study as a user writes it in the studio's editor: the tiny base, offline scorers, samples scored."""
    return f"""name = "sks"
workspace = "{workspace}"

[model]
base = "tiny"

[subject]
token = "sks"
class_word = "man"
images = "{workspace / 'photos' / 'sks'}"

[data]
resolution = 64

[train]
max_train_steps = {steps}
rank = 4
sample_every = 4
sample_steps = 2
checkpoint_every = 4

[generate]
seeds = [0]
num_inference_steps = 2

[evaluate]
face_backend = "dlib"
clip_model = "tiny"
"""


def contents(lora: Path) -> tuple[dict, dict]:
    """A safetensors file's header metadata and tensors (as bytes)."""
    from safetensors import safe_open

    with safe_open(str(lora), "pt") as handle:
        tensors = {key: handle.get_tensor(key).view(-1).view(torch.uint8).numpy().tobytes() for key in handle.keys()}
        return handle.metadata(), tensors


def studio_study(workspace: Path, steps: int, photos: list[Path] | None = None) -> StudioStudy:
    """A study made as the Photos page makes one (four photos of one person), with study_toml's settings."""
    study = StudioStudy.open(workspace)
    study.create("sks", "man", None, "tiny")
    study.add_photos(photos or sorted((PHOTOS / "obama").glob("[1-4].jpg")))
    study.save(study_toml(workspace, steps=steps))
    return study


def wait_until(check, timeout: float = 240, every: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out")


def pick(page, dropdown, option: str, timeout: float = 30) -> None:
    """Choose `option` in a dropdown as a person does: open it, click the option (once the page has listed it)."""
    deadline = time.time() + timeout
    while True:
        dropdown.click()
        if page.get_by_role("option", name=option, exact=True).count():
            break
        page.keyboard.press("Escape")
        assert time.time() < deadline, f"{option} never listed"
        time.sleep(0.5)
    page.get_by_role("option", name=option, exact=True).click()
    page.keyboard.press("Escape")


def test_a_new_user_goes_from_photos_to_an_exported_lora_in_the_browser(tmp_path):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "chromium not found: `make test` installs Debian's chromium package"
    workspace = tmp_path / "ws"
    port = free_port()
    app, studio = serve(workspace, port=port, block=False)
    photos = sorted((PHOTOS / "obama").glob("[1-4].jpg")) + [PHOTOS / "group" / "obama_and_biden.jpg"]
    run = Workspace(workspace).run("r1")
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
            page.goto(f"http://127.0.0.1:{port}/")
            # Photos: a subject, its photos uploaded (the group photo among them), then its study's settings.
            page.get_by_label("token (trigger word)").fill("sks")
            page.get_by_role("button", name="Create subject").click()
            page.get_by_text("Study created").wait_for(timeout=30000)
            page.locator("input[type=file]").first.set_input_files([str(p) for p in photos])
            page.get_by_text("Added 5 photos").wait_for(timeout=30000)
            page.get_by_role("tab", name="Train").click()
            editor = page.locator(".cm-content").last
            editor.fill(study_toml(workspace, steps=STEPS))
            page.get_by_role("button", name="Save config").click()
            page.get_by_text("saved", exact=True).wait_for(timeout=30000)

            # Prepare: the QA grid flags the photo of two people (kept, with a warning: the face most like the
            # others' is the subject's); left out by hand, it stays out.
            page.get_by_role("tab", name="Photos").click()
            page.get_by_role("button", name="Prepare").click()
            page.get_by_text(re.compile(r"obama_and_biden.jpg: kept \(warning: 2 faces")).wait_for(timeout=60000)
            pick(page, page.get_by_label("photo", exact=True), "obama_and_biden.jpg")
            page.get_by_role("button", name="Exclude").click()
            page.get_by_text(re.compile(r"obama_and_biden.jpg: excluded \(.*excluded by hand")).wait_for(timeout=60000)
            page.screenshot(path=str(tmp_path / "photos.png"), full_page=True)

            # Train: one run, queued; the Jobs page fills in while it runs.
            page.get_by_role("tab", name="Train").click()
            page.get_by_label("run name").fill("r1")
            page.get_by_role("button", name="Start run").click()
            page.get_by_text(re.compile("Queued: .*train .*--run r1 --resume")).wait_for(timeout=30000)
            page.get_by_role("tab", name="Jobs").click()
            running = re.compile(rf"running, step \d+ of {STEPS}, loss .*best step \d+")
            page.get_by_text(running).wait_for(timeout=180000)
            page.get_by_text(re.compile(r"step \d+: identity .*, CLIP ")).first.wait_for(timeout=60000)  # a sample
            page.screenshot(path=str(tmp_path / "jobs.png"), full_page=True)
            page.get_by_role("button", name="Stop").click()
            page.get_by_text(re.compile(rf"interrupted, step \d+ of {STEPS}")).wait_for(timeout=60000)
            assert read_metrics(run.metrics)[-1]["step"] < STEPS, "stopped before its end"
            page.get_by_role("button", name="Resume").click()
            page.get_by_text(re.compile(rf"done, step {STEPS} of {STEPS}")).wait_for(timeout=240000)
            page.screenshot(path=str(tmp_path / "jobs-done.png"), full_page=True)

            # Compare: the results table and the run's checkpoints side by side.
            page.get_by_role("tab", name="Compare").click()
            page.get_by_role("button", name="Refresh").click()
            page.get_by_text("sched", exact=True).wait_for(timeout=30000)  # the results table's header
            pick(page, page.get_by_label("runs side by side"), "r1")
            first_sample = page.locator("table.sample-grid img").first  # a row per prompt, a column per step
            first_sample.wait_for(timeout=30000)
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=first_sample.element_handle())
            assert page.locator("table.sample-grid th", has_text=re.compile(r"step 4(?!\d).*identity")).count() == 1
            page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)

            page.get_by_role("button", name="Build report").click()
            report = page.get_by_role("link", name="Open the report")
            report.wait_for(timeout=60000)
            with page.context.expect_page() as opened:  # the whole report, served from the workspace
                report.click()
            opened.value.get_by_text("Identity and CLIP Score while training").first.wait_for(timeout=30000)
            opened.value.close()

            # Share: a ComfyUI file, downloaded, that lookalike reads back.
            page.get_by_role("tab", name="Share").click()
            pick(page, page.get_by_label("run", exact=True).last, "r1")
            page.get_by_role("button", name="Export").click()
            page.get_by_text("r1-final.comfyui").first.wait_for(timeout=60000)
            page.get_by_text("README").first.wait_for(timeout=60000)  # its model card, a download too
            link = page.locator("a[download='r1-final.comfyui.safetensors']")
            with page.expect_download() as download:
                link.click()
            downloaded = tmp_path / "download.safetensors"
            download.value.save_as(downloaded)
            browser.close()
    finally:
        app.close()
        studio.close()
    # The download is a LoRA file lookalike reads, byte for byte what the command the page showed writes.
    assert lookalike_metadata(check_lora_file(downloaded))["base_model"] == "tiny"
    by_command = tmp_path / "by-command.safetensors"
    assert run_in_process("export", str(workspace / "studio" / "study.toml"), "--run", "r1", "--format", "comfyui",
                          "--dtype", "bf16", "--out", str(by_command)).returncode == 0
    assert contents(downloaded) == contents(by_command)
    # Trained once: every step recorded once, resumed from the checkpoint before the stop.
    steps = [record["step"] for record in read_metrics(run.metrics)]
    assert steps == list(range(1, STEPS + 1))
    manifest = (workspace / "data" / "manifest.json").read_text()
    assert '"excluded by hand (subject.exclude)"' in manifest
    for name in ("photos.png", "jobs.png", "jobs-done.png", "compare.png"):
        shot = np.asarray(Image.open(tmp_path / name).convert("L"), dtype=float)
        assert shot.std() > 10, f"{name} is blank"
    if os.environ.get("LOOKALIKE_SCREENSHOTS"):  # `make screenshots`: the README's picture, made by this test
        shutil.copy(tmp_path / "jobs.png", Path(os.environ["LOOKALIKE_SCREENSHOTS"]) / "studio-jobs.png")


def start_server(workspace: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "lookalike", "studio", str(workspace), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_until(lambda: _serving(port) or server.poll() is not None, timeout=120)
    assert server.poll() is None, "the studio did not start"
    return server


def _serving(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def steps_of(run) -> list[int]:
    return [record["step"] for record in read_metrics(run.metrics)]


def test_a_studio_killed_mid_job_shows_the_truth_when_started_again_and_nothing_trains_twice(tmp_path):
    """Killed alone, its job trains on (a process of its own) and shows as running; killed with its job, the job
    shows as interrupted, never as running, the queue goes on, and the job resumes from its last checkpoint."""
    from lookalike.studio.jobs import JobQueue

    workspace = tmp_path / "ws"
    study = studio_study(workspace, steps=KILLED_STEPS)
    queue = JobQueue(study.workspace)
    first, second, third = (queue.submit(study.snapshot(name), name) for name in ("r1", "r2", "r3"))
    runs = {name: study.workspace.run(name) for name in ("r1", "r2", "r3")}

    port = free_port()
    server = start_server(workspace, port)
    wait_until(lambda: len(steps_of(runs["r1"])) > 8, timeout=180)
    os.killpg(server.pid, signal.SIGKILL)  # the server alone
    server.wait()
    assert queue.state(queue.job(first.id)) == "running", "its job trains on, in a process of its own"
    server = start_server(workspace, port)
    wait_until(lambda: queue.state(queue.job(second.id)) == "running" and len(steps_of(runs["r2"])) > 8, timeout=240)
    assert queue.state(queue.job(first.id)) == "done"
    job = queue.job(second.id)
    os.killpg(server.pid, signal.SIGKILL)  # the server, and the job it runs: as a machine's crash would
    os.killpg(job.pid, signal.SIGKILL)
    server.wait()
    wait_until(lambda: queue.state(queue.job(second.id)) == "interrupted", timeout=30)
    server = start_server(workspace, port)
    try:
        wait_until(lambda: queue.state(queue.job(third.id)) == "done", timeout=240)  # the queue goes on
        assert queue.state(queue.job(second.id)) == "interrupted", "a killed job is never shown as running"
        queue.requeue(second.id)
        wait_until(lambda: queue.state(queue.job(second.id)) == "done", timeout=240)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait()
    for name, run in runs.items():
        assert steps_of(run) == list(range(1, KILLED_STEPS + 1)), f"{name}: every step once"
    resumed = runs["r2"].log.read_text()
    assert resumed.count("studio job") == 2 and "resum" in resumed.split("studio job")[-1], "r2 resumed"


def test_a_run_started_in_a_terminal_shows_on_the_jobs_page_with_its_curves(tmp_path):
    from playwright.sync_api import sync_playwright

    workspace = tmp_path / "ws"
    study = studio_study(workspace, steps=12)
    port = free_port()
    app, studio = serve(workspace, port=port, block=False)
    try:
        terminal = run_in_process("train", str(study.file), "--run", "from-terminal")
        assert terminal.returncode == 0, terminal.stderr
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/")
            page.get_by_role("tab", name="Jobs").click()
            page.get_by_text("terminal", exact=True).last.wait_for(timeout=30000)  # who started it
            page.get_by_text(re.compile(r"done, step 12 of 12, loss .*best step \d+")).wait_for(timeout=30000)
            page.get_by_text(re.compile(r"step 12: identity .*, CLIP ")).first.wait_for(timeout=30000)
            assert page.locator("img").count() >= 2, "the loss and score figures, and samples"
            browser.close()
    finally:
        app.close()
        studio.close()


def test_the_studio_serves_only_workspace_files_limits_uploads_and_needs_a_login_beyond_loopback(tmp_path):
    import httpx

    from lookalike.demo import MAX_FILES_PER_UPLOAD
    from lookalike.demo_guard import FAILURE_DELAY_S
    from lookalike.errors import LookalikeError

    workspace = tmp_path / "ws"
    secret = tmp_path / "secret.txt"
    secret.write_text("not the studio's")
    refused = run_in_process("studio", str(workspace), "--host", "0.0.0.0")
    assert refused.returncode == 2 and "needs a login: give --auth-file" in refused.stderr
    with pytest.raises(LookalikeError, match="needs a login"):
        serve(workspace, host="0.0.0.0", block=False)
    port = free_port()
    app, studio = serve(workspace, port=port, block=False, credentials=("user", "pass"))
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/", timeout=60) as client:
            started = time.time()
            assert client.post("login", data={"username": "user", "password": "wrong"}).status_code != 200
            assert time.time() - started >= FAILURE_DELAY_S, "a wrong password waits"
            assert client.post("login", data={"username": "user", "password": "pass"}).status_code == 200
            ours = workspace / "studio" / "origin.json"
            ours.parent.mkdir(parents=True, exist_ok=True)
            ours.write_text("{}")
            assert client.get(f"gradio_api/file={ours}").status_code == 200
            for outside in (secret, Path("/etc/passwd"), workspace / ".." / "secret.txt"):
                answer = client.get(f"gradio_api/file={outside}")
                assert answer.status_code in (403, 404) and "not the studio's" not in answer.text, outside
            too_many = [("files", (f"{i}.jpg", b"\xff\xd8 tiny", "image/jpeg"))
                        for i in range(MAX_FILES_PER_UPLOAD + 4)]
            huge = [("files", ("big.jpg", b"\xff" * (11 * 2**20), "image/jpeg"))]
            for files in (too_many, huge):
                try:
                    status = client.post("gradio_api/upload", files=files).status_code
                except httpx.HTTPError:
                    status = None  # cut off as it streamed in
                assert status is None or status >= 400, status
            kept = [path.name for path in (workspace / "studio" / ".gradio").rglob("*") if path.is_file()]
            assert "big.jpg" not in kept and "0.jpg" not in kept, "nothing of a refused upload is kept"
    finally:
        app.close()
        studio.close()


def test_the_train_page_says_each_bases_licence_and_whether_it_is_gated():
    from lookalike.studio.app import base_note

    assert base_note("flux-dev") == ("`flux-dev`: FLUX.1, from the hub's `black-forest-labs/FLUX.1-dev`; licence: "
                                     "non-commercial (FLUX.1 [dev] licence); gated: accept its licence on the hub, "
                                     "then run `hf auth login` once")
    assert base_note("z-image").endswith("licence: Apache 2.0")
    assert base_note("krea2-raw").endswith("licence: read its model card")
    assert base_note("tiny") == "`tiny`: FLUX.1, built here for tests (no download)"


def test_each_base_has_its_presets_and_init_writes_the_balanced_one(tmp_path):
    """The Train page's presets: the same three for every base, and each base's reference script's layers,
    schedule and (for the guidance-distilled bases) training guidance, transcribed from the scripts:
    train_dreambooth_lora_flux.py and _flux2.py default --guidance_scale to 3.5 and --lr_scheduler to constant."""
    from lookalike.config import load_config
    from lookalike.presets import presets
    from lookalike.starter import write_starter

    assert list(presets("sdxl")) == ["quick", "balanced", "best likeness", "reference script"]
    assert presets("flux-dev")["reference script"] == {"train.target_modules": "diffusers",
                                                        "train.lr_scheduler": "constant", "train.guidance": 3.5}
    assert presets("flux2-dev")["reference script"]["train.guidance"] == 3.5
    assert "train.guidance" not in presets("flux-schnell")["reference script"], "schnell takes no guidance"
    assert "train.guidance" not in presets("z-image")["reference script"]
    study = load_config(write_starter(tmp_path / "starter.toml", "sdxl", "photos", "sks"))
    balanced = presets("sdxl")["balanced"]
    assert (study.train.max_train_steps, study.train.rank, study.train.learning_rate) == (
        balanced["train.max_train_steps"], balanced["train.rank"], balanced["train.learning_rate"])


def test_the_photos_page_captions_the_kept_photos_as_lookalike_caption_does(tmp_path, tiny_blip):
    """The Caption button runs `lookalike caption`'s function: each kept photo's caption is written once to
    data/captions/ and trains from there."""
    from gradio_client import Client

    workspace = tmp_path / "ws"
    study = studio_study(workspace, steps=4)
    port = free_port()
    app, studio = serve(workspace, port=port, block=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        *_, note = client.predict(str(tiny_blip), api_name="/caption_photos")
    finally:
        app.close()
        studio.close()
    assert note.startswith("Captioned. Command: `lookalike caption studio/study.toml --model ")
    captions = sorted((workspace / "data" / "captions").glob("*.txt"))
    assert len(captions) == 4
    manifest = read_json(workspace / "data" / "manifest.json")
    written = [study.config().fill(caption.read_text().strip()) for caption in captions]  # {token} filled in
    assert sorted(p["caption"] for p in manifest["photos"]) == sorted(written)


def test_compare_lays_out_each_runs_samples_as_prompts_by_steps(tmp_path):
    """The Compare page's grid: a row per sample prompt, a column per (run, step) headed by its scores, every image
    in the cell of its prompt and step, and the user's text (run names, prompts) shown as text."""
    from lookalike.studio.progress import sample_grid
    from lookalike.workspace import write_json

    workspace = Workspace(tmp_path / "ws")
    runs = []
    for name, steps in (("a<b", (5, 10)), ("plain", (5,))):
        run = workspace.run(name)
        run.samples.mkdir(parents=True)
        write_json(run.config, {"train": {"sample_prompts": ["a photo of sks", "sks <smiling>"]}})
        for step in steps:
            for prompt in (0, 1):
                Image.new("RGB", (8, 8)).save(run.samples / f"step-{step:06d}_p{prompt}.png")
        run.sample_scores.write_text('{"step": 5, "identity_similarity": 0.5, "clip_score": 0.25}\n')
        runs.append(run)
    grid = sample_grid(runs)
    rows = grid.split("</tr>")[:-1]
    assert len(rows) == 3, "a header and a row per prompt"
    assert rows[0].count("<th>") == 1 + 3 and "a&lt;b<br>step 10" in rows[0] and "plain<br>step 5" in rows[0]
    assert "identity 0.5, CLIP 0.25" in rows[0]
    assert "<th>sks &lt;smiling&gt;</th>" in rows[2]
    assert rows[2].count("<img") == 3 and html.escape(f"{runs[0].samples}/step-000010_p1.png") in rows[2]
    assert sample_grid([workspace.run("none")]).startswith("No samples yet")
    filled = sample_grid(runs, fill=lambda prompt: prompt.replace("sks", "alice"))
    assert "<th>alice &lt;smiling&gt;</th>" in filled, "each prompt shown as the trainer filled it"
