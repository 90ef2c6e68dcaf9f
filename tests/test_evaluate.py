"""`lookalike evaluate` on plain folders: real photos, noise and blank images, an unreadable file."""

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.conftest import drawn_by_its_lora, run_cli


@pytest.mark.slow
def test_evaluate_folders_scores_every_image_and_counts_face_failures(faces, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for person in ("biden", "lin_manuel_miranda"):
        shutil.copy(faces / "test" / f"{person}.jpg", images / f"{person}.jpg")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(
        images / "noise.png")
    Image.new("RGB", (256, 256), (200, 200, 200)).save(images / "blank.png")
    (images / "broken.jpg").write_text("a text file named .jpg")
    (tmp_path / "prompts.txt").write_text("a photo of a man\n")

    result = run_cli("evaluate", "--images", str(images), "--references", str(faces / "train" / "biden"),
                     "--prompts", str(tmp_path / "prompts.txt"), "--face-backend", "dlib", "--clip-model", "tiny",
                     "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    rows = {row["image"]: row for row in csv.DictReader((tmp_path / "out" / "scores.csv").open())}
    assert set(rows) == {"biden.jpg", "lin_manuel_miranda.jpg", "noise.png", "blank.png", "broken.jpg"}
    assert rows["biden.jpg"]["id_match"] == "True" and rows["lin_manuel_miranda.jpg"]["id_match"] == "False"
    assert float(rows["biden.jpg"]["face_distance"]) < float(rows["lin_manuel_miranda.jpg"]["face_distance"])
    assert rows["noise.png"]["face_found"] == "False" and rows["blank.png"]["face_found"] == "False"
    assert "unreadable" in rows["broken.jpg"]["error"]
    assert all(rows[name]["clip_score"] for name in ("biden.jpg", "noise.png"))

    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (metrics["images"], metrics["unreadable"], metrics["faceless"]) == (5, 1, 2)
    assert metrics["id_match_rate"] == 0.25
    assert metrics["face_distance"] == np.mean([float(rows[n]["face_distance"])
                                                for n in ("biden.jpg", "lin_manuel_miranda.jpg")])
    assert metrics["face_backend"] == "dlib" and metrics["face_backend_version"]


@pytest.mark.slow
def test_references_without_any_face_is_a_clear_error(tmp_path):
    references = tmp_path / "refs"
    references.mkdir()
    Image.new("RGB", (128, 128)).save(references / "dark.png")
    result = run_cli("evaluate", "--images", str(references), "--references", str(references),
                     "--face-backend", "dlib")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: references: no face found in any photo of {references}"


def fake_run(workspace, faces, name="r"):
    """A run folder as train + generate leave it, with real photos standing in for generated images."""
    from lookalike.workspace import Workspace, write_json

    run = Workspace(workspace).run(name)
    run.images.mkdir(parents=True)
    made = [("obama", "a photo of sks", 3.5), ("obama", "sks smiling", 5.0),
            ("biden", "sks smiling", 3.5)]
    for index, (person, prompt, guidance) in enumerate(made):
        stem = f"p{index:02d}_s0_g{guidance:g}"
        Image.open(faces / "test" / f"{person}.jpg").convert("RGB").save(run.images / f"{stem}.png")
        write_json(run.images / f"{stem}.json", drawn_by_its_lora(run, {"prompt": prompt, "seed": 0,
                                                                       "guidance_scale": guidance}))
    write_json(run.config, {"train": {"learning_rate": 5e-4, "rank": 4, "alpha": None, "max_train_steps": 20,
                                      "lr_scheduler": "cosine"}})
    run.write_status("done", seconds=12.5, final_loss=0.25)
    return run


@pytest.mark.slow
def test_evaluate_a_run_per_prompt_per_guidance_into_the_results_store(tiny_config, faces, tmp_path):
    import sqlite3

    config = tiny_config(evaluate={"face_backend": "dlib", "clip_model": "tiny"})
    run = fake_run(tmp_path / "work", faces)

    result = run_cli("evaluate", str(config), "--run", "r")
    assert result.returncode == 0, result.stderr
    assert "'sks' replaced by 'man'" in result.stdout
    rows = list(csv.DictReader((run.root / "scores.csv").open()))
    assert [r["clip_prompt"] for r in rows] == ["a photo of man", "man smiling", "man smiling"]
    assert [r["id_match"] for r in rows] == ["True", "True", "False"], "guido's photos are guido, paul's is not"
    metrics = json.loads((run.root / "metrics.json").read_text())
    assert set(metrics["per_prompt"]) == {"a photo of sks", "sks smiling"}
    assert metrics["per_prompt"]["sks smiling"]["images"] == 2
    assert metrics["per_prompt"]["sks smiling"]["id_match_rate"] == 0.5
    assert set(metrics["per_guidance_scale"]) == {"3.5", "5.0"}
    assert metrics["references"] == 4

    db = sqlite3.connect(tmp_path / "work" / "results.sqlite")
    assert db.execute("SELECT state, rank, alpha, final_loss FROM runs WHERE name='r'").fetchone() == \
        ("done", 4, 4.0, 0.25)
    stored = dict(db.execute("SELECT value, id_match_rate FROM metrics WHERE run='r' AND grouping='prompt'"))
    assert stored == {"a photo of sks": 1.0, "sks smiling": 0.5}
    assert db.execute("SELECT face_distance FROM metrics WHERE grouping='run'").fetchone()[0] == \
        metrics["face_distance"]

    again = run_cli("evaluate", str(config))
    assert again.returncode == 0 and "r is up to date" in again.stdout
    (run.images / "p02_s0_g3.5.png").unlink()
    (run.images / "p02_s0_g3.5.json").unlink()
    changed = run_cli("evaluate", str(config), "--all-pairs")
    assert changed.returncode == 0, changed.stderr
    metrics = json.loads((run.root / "metrics.json").read_text())
    assert metrics["images"] == 2 and metrics["clip_pairs"] == "all prompts x all images"
    from lookalike.evaluate.clip_score import ClipScorer
    from lookalike.models.clip import load_clip

    images = [Image.open(p).convert("RGB") for p in sorted(run.images.glob("*.png"))]
    study_average = ClipScorer(*load_clip("tiny")).all_pairs(images, ["a photo of man", "man smiling"]).mean()
    assert metrics["clip_score"] == pytest.approx(float(study_average), rel=1e-5)


@pytest.mark.slow
def test_evaluate_a_run_without_images_says_what_to_do(tiny_config):
    result = run_cli("evaluate", str(tiny_config()), "--run", "nope")
    assert result.returncode == 2
    assert "run 'nope' has no generated images yet" in result.stderr and "lookalike generate" in result.stderr


@pytest.mark.slow
def test_bad_evaluate_option_names_it(tmp_path):
    result = run_cli("evaluate", "--images", str(tmp_path), "--references", str(tmp_path), "--face-backend", "x")
    assert result.returncode == 2 and "evaluate options: face_backend" in result.stderr


def test_models_load_once_per_process_for_the_same_settings():
    from lookalike.config import EvaluateConfig
    from lookalike.evaluate.command import load_evaluator

    settings = EvaluateConfig(face_backend="dlib", clip_model="tiny")
    evaluator = load_evaluator(settings, with_clip=True)
    assert load_evaluator(EvaluateConfig(face_backend="dlib", clip_model="tiny"), with_clip=True) is evaluator
    assert load_evaluator(settings, with_clip=False).clip is None, "other settings, other models"


@pytest.mark.slow
def test_likeness_is_measured_against_held_out_photos_when_given(tiny_config, faces, tmp_path):
    """[subject] references: a run's faces are measured against those photos alone, exactly as `evaluate --images
    --references` measures a folder; the report says so; a training photo among them is refused by name."""
    from tests.conftest import run_in_process

    held_out = tmp_path / "held_out"
    held_out.mkdir()
    shutil.copy(faces / "test" / "obama.jpg", held_out / "guido.jpg")
    config = tiny_config(subject={"references": "held_out"})  # relative to the config file, as every path
    run = fake_run(tmp_path / "work", faces)
    result = run_in_process("evaluate", str(config), "--run", "r")
    assert result.returncode == 0, result.stderr
    assert "references: 1 held-out photos of sks" in result.stdout
    ours = json.loads((run.root / "metrics.json").read_text())
    assert ours["references"] == 1 and ours["references_held_out"] is True
    alone = run_in_process("evaluate", "--images", str(run.images), "--references", str(held_out),
                           "--face-backend", "dlib", "--clip-model", "tiny", "--out", str(tmp_path / "alone"))
    assert alone.returncode == 0, alone.stderr
    theirs = json.loads((tmp_path / "alone" / "metrics.json").read_text())
    for key in ("face_distance", "identity_similarity", "id_match_rate"):
        assert ours[key] == pytest.approx(theirs[key]), key
    plain = run_in_process("evaluate", str(tiny_config(name="plain.toml")), "--run", "r")
    assert plain.returncode == 0 and "r is up to date" not in plain.stdout, "other references: scored again"
    trained_on = json.loads((run.root / "metrics.json").read_text())
    assert trained_on["references"] == 4 and not trained_on["references_held_out"]
    assert trained_on["face_distance"] != pytest.approx(ours["face_distance"]), "other references, other distances"

    assert run_in_process("report", str(config)).returncode == 0
    summary = (tmp_path / "work" / "report" / "summary.md").read_text()
    assert "Likeness is measured against held-out photos of each person ([subject] references)" in summary

    # Once prepared, training photos are known by the hashes prepare recorded.
    assert run_in_process("prepare", str(config)).returncode == 0
    training_photo = sorted((faces / "train" / "obama").iterdir())[0]
    with Image.open(training_photo) as photo:  # the same photo, smaller and recompressed: a near copy
        photo.convert("RGB").resize((photo.width // 2, photo.height // 2)).save(held_out / "smaller.jpg", quality=70)
    refused = run_in_process("evaluate", str(config), "--run", "r", "--force")
    assert refused.returncode == 2
    assert refused.stderr.strip() == (f"error: subject.references: {held_out / 'smaller.jpg'} is a near copy of the "
                                      f"training photo {training_photo}: held-out references are photos the LoRA "
                                      "never trained on")
    (held_out / "smaller.jpg").unlink()
    shutil.copy(training_photo, held_out / "again.jpg")
    refused = run_in_process("evaluate", str(config), "--run", "r", "--force")
    assert refused.returncode == 2
    assert refused.stderr.strip() == (f"error: subject.references: {held_out / 'again.jpg'} is the training photo "
                                      f"{training_photo}: held-out references are photos the LoRA never trained on")


def test_likeness_counts_the_images_that_name_a_person_and_bleed_the_others():
    """Hand-made scores: an image whose prompt names nobody measures how much of the subject leaks into anyone
    drawn (bleed), and stays out of likeness; face failures and CLIP count every image."""
    from lookalike.evaluate.scoring import ImageScore, aggregate

    def row(named, face, similarity=None, match=None):
        return ImageScore(image="x.png", names_person=named, face_found=face, n_faces=int(face),
                          identity_similarity=similarity, face_distance=None if similarity is None else 1 - similarity,
                          id_match=match, clip_score=0.3)

    rows = [row(True, True, 0.8, True), row(True, True, 0.6, False), row(True, False),
            row(False, True, 0.3, True), row(False, True, 0.1, False), row(False, False)]
    metrics = aggregate(rows)
    assert metrics["identity_similarity"] == pytest.approx(0.7) and metrics["id_match_rate"] == pytest.approx(1 / 3)
    assert metrics["bleed_similarity"] == pytest.approx(0.2)
    assert (metrics["images"], metrics["faceless"], metrics["clip_score"]) == (6, 2, pytest.approx(0.3))
    unknown = aggregate([row(None, True, 0.5, True)])  # a folder of images: who a prompt names is not known
    assert unknown["identity_similarity"] == 0.5 and unknown["bleed_similarity"] is None


def test_a_results_store_written_before_bleed_gets_its_column_and_keeps_each_metric_in_place(tmp_path):
    import sqlite3

    from lookalike.store import refresh
    from lookalike.workspace import Workspace, file_sha256, write_json

    store = tmp_path / "results.sqlite"
    old = sqlite3.connect(store)  # the metrics table as it was: no bleed_similarity
    old.executescript("CREATE TABLE metrics (run TEXT NOT NULL, grouping TEXT NOT NULL, value TEXT NOT NULL, "
                      "images REAL, unreadable REAL, face_distance REAL, identity_similarity REAL, id_match_rate REAL, "
                      "faceless REAL, several_faces REAL, clip_score REAL, face_backend TEXT, clip_model TEXT, "
                      "PRIMARY KEY (run, grouping, value));")
    old.close()
    run = Workspace(tmp_path / "work").run("r")
    run.root.mkdir(parents=True)
    write_json(run.config, {"train": {"rank": 4}})
    run.write_status("done", seconds=1.0, final_loss=0.5)
    run.lora.write_bytes(b"stands in for the run's LoRA")
    write_json(run.root / "metrics.json", {"images": 4, "identity_similarity": 0.7, "bleed_similarity": 0.2,
                                           "clip_score": 0.3, "faceless": 1, "lora_sha256": file_sha256(run.lora)})
    [stored] = refresh(tmp_path / "work" / "runs", store)
    assert (stored["identity_similarity"], stored["bleed_similarity"], stored["clip_score"], stored["faceless"]) == \
        (0.7, 0.2, 0.3, 1)


@pytest.mark.slow
def test_an_image_whose_prompt_names_nobody_measures_bleed_not_likeness(tiny_config, faces, tmp_path):
    """The study's prompts may name nobody ("a photo of a man"): such an image of the subject is bleed."""
    from lookalike.workspace import write_json

    config = tiny_config(evaluate={"face_backend": "dlib", "clip_model": "tiny"})
    run = fake_run(tmp_path / "work", faces)
    Image.open(faces / "test" / "obama.jpg").convert("RGB").save(run.images / "p03_s0_g3.5.png")
    write_json(run.images / "p03_s0_g3.5.json", drawn_by_its_lora(run, {"prompt": "a photo of a man", "seed": 0,
                                                                      "guidance_scale": 3.5}))
    result = run_cli("evaluate", str(config), "--run", "r")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader((run.root / "scores.csv").open()))
    assert [r["names_person"] for r in rows] == ["True", "True", "True", "False"]
    metrics = json.loads((run.root / "metrics.json").read_text())
    assert metrics["id_match_rate"] == pytest.approx(2 / 3), "likeness: the three images that name the subject"
    assert metrics["bleed_similarity"] == pytest.approx(float(rows[3]["identity_similarity"]))
    assert metrics["per_prompt"]["a photo of a man"]["identity_similarity"] is None
    shown = run_cli("results", str(config))
    assert "bleed" in shown.stdout, "the results table shows bleed when a run measured it"


def test_runs_scored_by_an_earlier_meaning_of_the_metrics_are_scored_again(tiny_config, faces, tmp_path,
                                                                             monkeypatch):
    """SCORING_VERSION is part of what a run's metrics depend on: a run scored before a metric changed meaning (as
    likeness did when bleed came) is not kept as up to date."""
    from lookalike.config import load_config
    from lookalike.evaluate import command
    from lookalike.evaluate.command import _inputs_digest, reference_photos

    config = load_config(tiny_config())
    run = fake_run(tmp_path / "work", faces)
    lora = run.lora_sha256("final")
    now = _inputs_digest(config, run.images, reference_photos(config), lora)
    assert now == _inputs_digest(config, run.images, reference_photos(config), lora)
    assert _inputs_digest(config, run.images, reference_photos(config), "0" * 64) != now, "another LoRA's images"
    monkeypatch.setattr(command, "SCORING_VERSION", command.SCORING_VERSION + 1)
    assert _inputs_digest(config, run.images, reference_photos(config), lora) != now
