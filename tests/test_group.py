"""Group photos: faces assigned to people (Hungarian), on the shared photos of Obama and Biden."""

import numpy as np
import pytest

from lookalike.data.images import load_rgb
from lookalike.evaluate.group import assign_faces, leakage
from lookalike.evaluate.identity import reference_from
from lookalike.faces import FaceRule, largest, load_backend

pytestmark = pytest.mark.slow  # trains, serves or starts lookalike processes: `make test` only


@pytest.fixture(scope="module")
def dlib_backend():
    return load_backend("dlib")


def embed_all(backend, path):
    image = load_rgb(path)
    faces = FaceRule.for_backend(backend).faces(backend, image)
    return faces, backend.embed([(image, face) for face in faces])


def test_each_face_of_the_group_photo_is_assigned_to_the_right_person(dlib_backend, faces):
    group = faces / "group"
    people = {}
    for name in ("obama", "biden"):
        found, embeddings = embed_all(dlib_backend, group / f"{name}.jpg")
        people[name] = reference_from([embeddings[found.index(largest(found))]])
    found, embeddings = embed_all(dlib_backend, group / "obama_and_biden.jpg")
    assert len(found) == 2
    scores = assign_faces(embeddings, people, dlib_backend.same_person_threshold)
    assert [s.person for s in scores] == ["obama", "biden"] and all(s.found for s in scores)
    assert scores[0].face != scores[1].face
    # Each person's face is the one nearer their own reference than the other's: the right assignment.
    for score, other in ((scores[0], "biden"), (scores[1], "obama")):
        own = embeddings[score.face]
        assert score.face_distance < np.linalg.norm(own - people[other].mean)
    assert leakage(embeddings[scores[0].face], people, {"obama"})["biden"] < scores[0].identity_similarity


def test_fewer_faces_than_people_leaves_someone_unfound(dlib_backend, faces):
    people = {name: reference_from([embed_all(dlib_backend, faces / "group" / f"{name}.jpg")[1][0]])
              for name in ("obama", "biden")}
    _, one_face = embed_all(dlib_backend, faces / "group" / "obama.jpg")
    scores = assign_faces(one_face, people, dlib_backend.same_person_threshold)
    assert [(s.person, s.found) for s in scores] == [("obama", True), ("biden", False)]
    assert scores[1].face is None
    assert assign_faces(np.zeros((0, 128)), people, 0.6)[0].face is None


def test_evaluate_with_several_people_writes_per_person_scores_and_leakage(faces, tmp_path):
    import json
    import shutil

    from tests.conftest import run_cli

    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(faces / "group" / "obama_and_biden.jpg", images / "a_both.jpg")
    shutil.copy(faces / "group" / "obama.jpg", images / "b_obama.jpg")
    (tmp_path / "prompts.txt").write_text("obama and biden together\nobama alone\n")
    people = []
    for name in ("obama", "biden"):
        (tmp_path / name).mkdir()
        shutil.copy(faces / "group" / f"{name}.jpg", tmp_path / name / f"{name}.jpg")
        people += ["--person", f"{name}={tmp_path / name}"]
    result = run_cli("evaluate", "--images", str(images), *people, "--prompts", str(tmp_path / "prompts.txt"),
                     "--face-backend", "dlib", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "out" / "group_metrics.json").read_text())
    assert metrics["all_found_rate"] == 0.5, "both in the group photo, Obama alone in his portrait"
    assert metrics["per_person"]["obama"]["found_rate"] == 1.0
    assert metrics["per_person"]["biden"]["leakage_to"] is not None, "Obama's own prompt, compared with Biden"
    assert "b_obama.jpg" in (tmp_path / "out" / "group_scores.csv").read_text()
