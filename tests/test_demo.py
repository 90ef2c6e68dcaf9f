"""lookalike demo, driven as a user's browser or script would: through gradio_client and headless Chromium."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookalike.config import load_config
from lookalike.demo import DemoError, DemoModels, build_app, serve_options
from lookalike.workspace import file_sha256, read_json
from tests.conftest import run_cli, tiny_study

pytestmark = pytest.mark.slow  # trains, serves or starts lookalike processes: `make test` only

CHROMIUM = shutil.which("chromium")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, faces):
    """The app on a workspace with one trained tiny run, served on 127.0.0.1."""
    folder = tmp_path_factory.mktemp("demo")
    config_file = tiny_study(folder, faces, train={"max_train_steps": 10}, generate={"num_inference_steps": 2},
                             evaluate={"clip_model": "tiny"})
    assert run_cli("train", str(config_file), "--run", "r").returncode == 0
    run = folder / "work" / "runs" / "r"
    shutil.copy(run / "lora.safetensors", run / "lora-best.safetensors")  # as training keeps its best step's
    config = load_config(config_file)
    models = DemoModels(config)
    app = build_app(config, models)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **serve_options(None))
    yield f"http://127.0.0.1:{port}/", models, folder
    app.close()


def client_for(url):
    from gradio_client import Client

    return Client(url, verbose=False)


def generate(client, lora="r", prompt="a photo of sks", size=64):
    return client.predict(lora, 1.0, "(none)", 1.0, prompt, 0, 5.0, 2, size, api_name="/generate")


def test_generate_shows_the_image_with_its_scores(demo):
    url, _, _ = demo
    image, scores, gallery = generate(client_for(url))
    assert Image.open(image).size == (64, 64)
    assert Image.open(generate(client_for(url), size=96)[0]).size == (96, 96)
    assert set(scores) >= {"clip_score", "face_distance", "identity_similarity"}
    assert isinstance(scores["clip_score"], float) and scores["references"] == 4
    assert "seed 0" in gallery[0]["caption"]


def test_a_lora_retrained_while_the_app_is_open_is_drawn_as_the_new_file(demo):
    """Adapters and images are keyed by the LoRA file's content, and each image's sidecar names it."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    url, models, folder = demo
    client = client_for(url)
    lora = folder / "work" / "runs" / "r" / "lora.safetensors"
    original = lora.read_bytes()
    first = Path(generate(client)[0])
    kept = models.folder / "images"
    before = {path.name: path.read_bytes() for path in kept.glob("*.png")}
    try:
        with safe_open(str(lora), "pt") as handle:
            metadata = handle.metadata()
        save_file({key: value * 3 for key, value in load_file(lora).items()}, str(lora), metadata=metadata)
        second = Path(generate(client)[0])
        assert not np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second))), \
            "drawn with the new weights, not the adapter loaded before"
        facts = sorted((read_json(path.with_suffix(".json")) for path in kept.glob("*.png")
                        if path.name not in before), key=str)
        assert [[entry["sha256"] for entry in fact["loras"]] for fact in facts] == [[file_sha256(lora)]]
        assert all((kept / name).read_bytes() == content for name, content in before.items()), \
            "an image of the old file is never written over"
    finally:
        lora.write_bytes(original)


def test_adding_a_reference_photo_changes_the_scores(demo, faces, monkeypatch):
    """The tiny model draws no faces, so the generated image is a real photo here: what is tested is the
    scoring against references that change."""
    from gradio_client import handle_file

    url, models, _ = demo
    portrait = Image.open(faces / "test" / "obama.jpg").convert("RGB")
    monkeypatch.setattr(models, "render", lambda *args, **kwargs: portrait)
    client = client_for(url)
    _, before, _ = generate(client)
    assert before["faces"] == 1 and before["identity_similarity"] is not None
    after, shown, _ = client.predict([handle_file(faces / "test" / "biden.jpg")], api_name="/add_references")
    assert after["references"] == 5 and len(shown) == 5
    assert after["face_distance"] != pytest.approx(before["face_distance"])
    assert after["identity_similarity"] < before["identity_similarity"], "another man's face joined the references"


def test_a_bad_upload_is_refused_and_the_app_keeps_working(demo, tmp_path):
    from gradio_client import handle_file

    url, _, _ = demo
    fake = tmp_path / "photo.jpg"
    fake.write_text("not an image at all")
    client = client_for(url)
    with pytest.raises(Exception, match="photo.jpg is not a readable image"):
        client.predict([handle_file(fake)], api_name="/add_references")
    image, scores, _ = generate(client)
    assert Image.open(image).size == (64, 64) and scores["clip_score"] is not None


def test_a_lora_outside_the_workspace_is_refused(demo, tmp_path):
    url, models, folder = demo
    outside = tmp_path / "evil.safetensors"
    shutil.copy(folder / "work" / "runs" / "r" / "lora.safetensors", outside)
    client = client_for(url)
    for name in (str(outside), "../../evil", "r/../../evil"):
        with pytest.raises(Exception, match="not a trained run of this workspace|not in the list of choices"):
            generate(client, lora=name)
    assert models.lora_choices() == ["r", "r@best"], "the run, and its best scored step's LoRA"
    assert models.lora_path("r@best") == folder / "work" / "runs" / "r" / "lora-best.safetensors"
    with pytest.raises(Exception, match="is not a trained run of this workspace"):
        models.lora_path(str(outside))


def test_a_bad_login_setting_is_refused_before_anything_starts(tmp_path):
    from tests.conftest import write_config

    config = write_config(tmp_path / "s.toml", {"": {"name": "s", "workspace": str(tmp_path / "w")},
                                                "subject": {"token": "sks", "images": str(tmp_path)}})
    result = run_cli("demo", str(config), "--auth", "only-a-user")
    assert result.returncode == 2 and "error: --auth: expected user:password" in result.stderr


def test_a_drawing_base_of_another_family_is_refused_before_anything_serves(tiny_config):
    from tests.conftest import run_in_process

    result = run_in_process("demo", str(tiny_config(generate={"base": "tiny-z-image"})))
    assert result.returncode != 0
    assert "error: generate.base: tiny-z-image is a z-image base, and the LoRAs of model.base tiny are flux1's" \
        in result.stderr


def test_the_page_shows_its_main_controls_in_headless_chromium(demo, tmp_path):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "chromium not found: `make test` installs Debian's chromium package"
    url, _, _ = demo
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.get_by_role("button", name="Generate").wait_for(state="visible", timeout=30000)
        # gradio renders its components one by one: under load the prompt box can come after the button
        page.get_by_label("prompt").wait_for(state="visible", timeout=30000)
        page.screenshot(path=str(tmp_path / "demo.png"))
        browser.close()
    shot = np.asarray(Image.open(tmp_path / "demo.png").convert("L"), dtype=float)
    assert shot.std() > 10, "the screenshot is not blank"


def test_with_a_login_nothing_of_the_study_reaches_a_visitor_before_login(demo, tmp_path):
    """gradio embeds its API description (run names, trigger word, prompt, reference photos) in the page it serves
    before login; the app blanks it until the visitor logs in, and the page is then the login form alone."""
    import httpx
    from playwright.sync_api import sync_playwright

    _, models, _ = demo
    app = build_app(models.config, models)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
               **serve_options(("user", "pass word ")))
    url = f"http://127.0.0.1:{port}/"
    secrets = ["sks", "a photo of", models.config.subject.images.name, '"r@best"', models.config.name]
    try:
        with httpx.Client(base_url=url, timeout=30) as visitor:
            for path in ("", "?view=api", "manifest.json", "config", "gradio_api/info"):
                answer = visitor.get(path)
                assert not [s for s in secrets if s in answer.text], (path, answer.status_code)
            assert visitor.post("login", data={"username": "user", "password": "pass word"}).status_code == 400, \
                "the password is kept exactly, its trailing space included"
            assert visitor.post("login", data={"username": "user", "password": "pass word "}).status_code == 200
            assert "a photo of sks" in visitor.get("").text, "logged in, the app is whole"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.get_by_label("password").wait_for(state="visible", timeout=30000)
            page.screenshot(path=str(tmp_path / "login.png"))
            page.get_by_label("username").fill("user")
            page.get_by_label("password").fill("pass word ")
            page.get_by_role("button", name="Login").click()
            page.get_by_role("button", name="Generate").wait_for(state="visible", timeout=30000)
            browser.close()
    finally:
        app.close()


def test_uploads_and_gradio_files_stay_in_the_workspace_and_checked_uploads_are_deleted(demo, faces):
    import gradio
    from gradio_client import handle_file

    url, models, _ = demo
    upload_folder = Path(gradio.utils.get_upload_folder())
    assert upload_folder == models.folder / ".gradio" and upload_folder.stat().st_mode & 0o777 == 0o700
    client_for(url).predict([handle_file(faces / "test" / "obama.jpg")], api_name="/add_references")
    uploads = [p for p in upload_folder.rglob("obama.jpg")]
    assert uploads == [], "the checked upload is deleted; its re-encoded copy lives in demo/references"
    assert list((models.folder / "references").glob("*.png"))


def test_one_upload_request_cannot_carry_more_than_the_limits(demo):
    import http.client

    import httpx

    from lookalike.demo import MAX_FILES_PER_UPLOAD

    url, _, _ = demo
    too_many = [("files", (f"{i}.jpg", b"\xff\xd8 tiny", "image/jpeg")) for i in range(MAX_FILES_PER_UPLOAD + 4)]
    answer = None
    try:
        answer = httpx.post(url + "gradio_api/upload", files=too_many, timeout=30)
    except httpx.HTTPError:
        pass  # the connection cut: refused just as well
    assert answer is None or answer.status_code != 200 or len(answer.json()) <= MAX_FILES_PER_UPLOAD
    allowed = httpx.post(url + "gradio_api/upload", files=too_many[:2], timeout=30)
    assert allowed.status_code == 200 and len(allowed.json()) == 2

    # 12 files of 9 MB: refused from the request's declared size, before a byte of it is read.
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.putrequest("POST", "/gradio_api/upload")
    connection.putheader("Content-Type", "multipart/form-data; boundary=x")
    connection.putheader("Content-Length", str(12 * 9 * 2**20))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and b"at most" in response.read()
    connection.close()


def test_a_seed_out_of_range_is_refused_without_internals(demo):
    url, _, _ = demo
    client = client_for(url)
    with pytest.raises(Exception) as refused:
        client.predict("r", 1.0, "(none)", 1.0, "a photo of sks", 2**70, 5.0, 2, 64, api_name="/generate")
    message = str(refused.value)
    assert "Overflow" not in message and "Traceback" not in message and "site-packages" not in message
    assert "seed" in message or "maximum" in message


def test_logins_come_from_a_file_or_the_environment_not_only_the_command_line(tmp_path, monkeypatch):
    from lookalike.demo_guard import AUTH_ENVIRONMENT, credentials
    from lookalike.errors import LookalikeError

    secret = tmp_path / "login"
    secret.write_text("ada:lovelace\n")
    assert credentials(None, secret) == ("ada", "lovelace")
    monkeypatch.setenv(AUTH_ENVIRONMENT, "grace:hopper")
    assert credentials(None, None) == ("grace", "hopper")
    assert credentials("alan:turing", None) == ("alan", "turing")
    secret.write_text("no-colon\n")
    with pytest.raises(LookalikeError, match="--auth-file"):
        credentials(None, secret)


def test_failed_logins_are_slowed_and_then_locked_out():
    from lookalike.demo_guard import FAILURES_BEFORE_LOCKOUT, LOCKOUT_S, LoginThrottle

    now, slept = [1000.0], []
    check = LoginThrottle("ada", "lovelace", clock=lambda: now[0], sleep=slept.append)
    assert check("ada", "lovelace") and not slept
    for _ in range(FAILURES_BEFORE_LOCKOUT):
        assert not check("ada", "guess")
    assert len(slept) == FAILURES_BEFORE_LOCKOUT
    assert not check("ada", "lovelace"), "locked out: even the right password waits"
    now[0] += LOCKOUT_S + 1
    assert check("ada", "lovelace")


def test_serving_beyond_this_machine_without_a_password_warns_loudly(demo, capsys):
    from lookalike.demo import launch

    _, models, _ = demo
    app = launch(models.config, host="0.0.0.0", port=free_port(), block=False)
    app.close()
    assert "WARNING: the demo is open to every machine" in capsys.readouterr().err


def test_the_app_lists_only_the_loras_of_the_base_it_draws_with(tiny_config):
    """In a study across bases, a LoRA of another base cannot be drawn by the app's pipeline: it is not listed."""
    import torch
    from peft import LoraConfig

    from lookalike.models.lora import save_lora
    from lookalike.workspace import Workspace

    config = load_config(tiny_config())
    workspace = Workspace(config.workspace)
    tensors = {"transformer.layers.0.attention.to_q.lora_A.weight": torch.zeros(2, 4),
               "transformer.layers.0.attention.to_q.lora_B.weight": torch.zeros(4, 2)}
    for run, base in (("flux", "tiny"), ("zimage", "tiny-z-image")):
        save_lora(workspace.run(run).lora, tensors, LoraConfig(r=2, lora_alpha=2), {"base_model": base})
    assert DemoModels(config).lora_choices() == ["flux"]
    with pytest.raises(DemoError, match="not a trained run of this workspace"):
        DemoModels(config).lora_path("zimage")


def test_the_studios_try_page_follows_a_change_of_base_without_a_restart(tiny_config):
    """DemoModels following a study (the studio's Try page): the LoRAs listed and the pipeline loaded are the
    study's base's as it is now; a change of base lets the old pipeline go, and the next image loads the new one."""
    import torch
    from peft import LoraConfig

    from lookalike.models.lora import save_lora
    from lookalike.workspace import Workspace

    studies = {base: load_config(tiny_config(model={"base": base})) for base in ("tiny", "tiny-sd15")}
    workspace = Workspace(studies["tiny"].workspace)
    save_lora(workspace.run("flux").lora, {"transformer.x.lora_A.weight": torch.zeros(2, 4),
                                           "transformer.x.lora_B.weight": torch.zeros(4, 2)},
              LoraConfig(r=2, lora_alpha=2), {"base_model": "tiny"})
    save_lora(workspace.run("sd").lora, {"unet.x.lora_A.weight": torch.zeros(2, 4),
                                         "unet.x.lora_B.weight": torch.zeros(4, 2)},
              LoraConfig(r=2, lora_alpha=2), {"base_model": "tiny-sd15"})
    current = ["tiny"]
    models = DemoModels(studies["tiny"], follow=lambda: studies[current[0]])
    assert models.lora_choices() == ["flux"]
    assert type(models.pipe()).__name__ == "FluxPipeline"
    current[0] = "tiny-sd15"  # the Train page applies another base
    assert models.lora_choices() == ["sd"]
    assert type(models.pipe()).__name__ == "StableDiffusionPipeline"
    image = models.render([], "a photo of sks", seed=0, guidance=5.0, steps=2, size=64)
    assert image.size == (64, 64)


def test_an_offloaded_demo_draws_what_the_whole_pipeline_draws(demo):
    """[generate] offload in the app: the LoRA is loaded after the pipeline is offloaded, as a user picks it."""
    _, models, _ = demo
    offloaded = DemoModels(models.config.model_copy(update={"generate": models.config.generate.model_copy(
        update={"offload": True})}))
    drawn, sha256 = [], file_sha256(models.lora_path("r"))
    for loras in ([("r", 1.0, sha256)], [], [("r", 0.5, sha256)]):
        expected = np.asarray(models.render(loras, "a photo of sks", seed=0, guidance=5.0, steps=2, size=64))
        got = np.asarray(offloaded.render(loras, "a photo of sks", seed=0, guidance=5.0, steps=2, size=64))
        np.testing.assert_array_equal(got, expected)
        drawn.append(got)
    assert not np.array_equal(drawn[0], drawn[1]), "the LoRA changes the image"


def test_the_studios_try_page_shows_the_new_bases_settings_when_the_base_changes(tiny_config):
    """The page's header, guidance, steps and size follow the study's base as the Train page changes it, and are
    left as the user set them while the base stays (each refresh would otherwise undo their choice)."""
    studies = {"tiny": load_config(tiny_config(model={"base": "tiny"})),
               "tiny-flux2-klein": load_config(tiny_config(model={"base": "tiny-flux2-klein"},
                                                           data={"resolution": 128},
                                                           generate={"num_inference_steps": 7}))}
    current = ["tiny"]
    app = build_app(studies["tiny"], DemoModels(studies["tiny"], follow=lambda: studies[current[0]]))
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **serve_options(None))
    try:
        client = client_for(f"http://127.0.0.1:{port}/")
        config = client.view_api(return_format="dict", print_info=False)
        assert "/refresh" in config["named_endpoints"]
        unchanged = {"__type__": "update"}  # what the client gets of a part the server left as it was
        assert client.predict(api_name="/refresh")[2:6] == (unchanged,) * 4, "the user's settings stay"
        current[0] = "tiny-flux2-klein"  # the Train page applies another base
        header, guidance, steps, side = client.predict(api_name="/refresh")[2:6]
        again = client.predict(api_name="/refresh")[2:6]
    finally:
        app.close()
    assert "Base model `tiny-flux2-klein`" in header
    assert (steps["value"], side["value"]) == (7, 128), "the new base's steps and size"
    assert guidance["value"] == 0.0 and not guidance["interactive"], "FLUX.2 [klein] is distilled: no guidance"
    assert again == (unchanged,) * 4, "shown once: then the user's again"
