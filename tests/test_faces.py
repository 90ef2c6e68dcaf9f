"""Face backends and identity metrics on the real test photos (tests/data/faces, laid out by the faces fixture)."""

import numpy as np
import pytest
from PIL import Image

from lookalike.data.images import load_rgb
from lookalike.evaluate.identity import face_distance, id_match, identity_similarity, reference_from
from lookalike.faces import load_backend

PEOPLE = ["obama", "biden", "alex_lacamoire"]


@pytest.fixture(scope="module")
def dlib_backend():
    return load_backend("dlib")


def best_face_embedding(backend, path):
    image = load_rgb(path)
    faces = [f for f in backend.find_faces(image) if f.score >= backend.default_min_score]
    assert faces, f"no face found in {path}"
    return backend.embed([(image, faces[0])])[0]


@pytest.fixture(scope="module")
def references(dlib_backend, faces):
    return {person: reference_from([best_face_embedding(dlib_backend, p)
                                    for p in sorted((faces / "train" / person).glob("*.jpg"))])
            for person in PEOPLE}


@pytest.mark.parametrize("person", PEOPLE)
def test_dlib_held_out_photo_is_closest_to_its_own_person(dlib_backend, faces, references, person):
    embedding = best_face_embedding(dlib_backend, faces / "test" / f"{person}.jpg")
    distances = {other: face_distance(embedding, ref) for other, ref in references.items()}
    similarities = {other: identity_similarity(embedding, ref) for other, ref in references.items()}
    assert min(distances, key=distances.get) == person, distances
    assert max(similarities, key=similarities.get) == person, similarities
    assert id_match(embedding, references[person], dlib_backend.same_person_threshold)


def test_dlib_unknown_person_matches_nobody(dlib_backend, faces, references):
    embedding = best_face_embedding(dlib_backend, faces / "test" / "lin_manuel_miranda.jpg")
    for person, reference in references.items():
        assert not id_match(embedding, reference, dlib_backend.same_person_threshold), person


def test_face_distance_is_the_studys_formula(references):
    """L2 to the mean of the reference embeddings, not the mean of the L2 distances."""
    reference = references["biden"]
    embedding = np.ones(128, dtype=np.float32) * 0.1
    assert face_distance(embedding, reference) == pytest.approx(float(np.sqrt(((embedding - reference.mean) ** 2)
                                                                               .sum())))
    assert identity_similarity(reference.mean * 3, reference) == pytest.approx(1.0)


def offline_backend(name):
    """facenet's real weights cannot be downloaded here: its detector is real, its embeddings random."""
    return load_backend(name, pretrained=False) if name == "facenet" else load_backend(name)


def noise_and_blank_images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)),
            Image.new("RGB", (512, 512), (128, 128, 128)), Image.new("RGB", (300, 500), (255, 255, 255))]


@pytest.mark.parametrize("backend_name", ["dlib", "facenet"])
def test_noise_and_blank_images_have_no_face_and_photos_do(backend_name, faces):
    backend = offline_backend(backend_name)
    for image in noise_and_blank_images():
        assert not [f for f in backend.find_faces(image) if f.score >= backend.default_min_score]
    for path in sorted((faces / "train").glob("*/*.jpg")):
        found = [f for f in backend.find_faces(load_rgb(path)) if f.score >= backend.default_min_score]
        assert found, f"{backend_name} found no face in {path}"


@pytest.mark.parametrize("backend_name", ["dlib", "facenet"])
def test_group_photo_has_two_faces(backend_name, faces):
    backend = offline_backend(backend_name)
    image = load_rgb(faces / "group" / "obama_and_biden.jpg")
    found = [f for f in backend.find_faces(image) if f.score >= backend.default_min_score]
    assert len(found) == 2
    left, right = sorted(found, key=lambda f: f.box[0])
    assert left.box[2] < right.box[0], "two separate faces, side by side"


def test_facenet_with_random_weights_embeds_real_faces(faces):
    backend = load_backend("facenet", pretrained=False)
    image = load_rgb(faces / "train" / "biden" / "1.jpg")
    embedding = backend.embed([(image, backend.find_faces(image)[0])])[0]
    assert embedding.shape == (512,) and np.linalg.norm(embedding) == pytest.approx(1.0, abs=1e-4)
    assert backend.version.endswith("+random")


def test_facenet_missing_weights_offline_says_which_file_to_put_where(tmp_path, monkeypatch):
    import urllib.error

    import torch

    from lookalike.errors import LookalikeError

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    expected = str(tmp_path / "checkpoints" / "20180402-114759-vggface2.pt")
    with pytest.raises(LookalikeError, match="20180402-114759-vggface2.pt") as caught:
        load_backend("facenet")
    assert expected in str(caught.value) and "dlib" in str(caught.value)


def test_face_rule_drops_faces_below_the_size_floor(faces):
    """The group photo's faces, pasted small into a large canvas, are 4% of its side: counted at a 2% floor,
    not at 5%. facenet searches a shrunk copy for the 2% floor and must still find both."""
    from PIL import Image

    from lookalike.faces import FaceRule

    backend = offline_backend("facenet")
    group = load_rgb(faces / "group" / "obama_and_biden.jpg")
    canvas = Image.new("RGB", (4000, 4000), (128, 128, 128))
    canvas.paste(group, (1000, 1500))
    assert len(FaceRule(0.95, 0.02).faces(backend, canvas)) == 2
    assert FaceRule(0.95, 0.05).faces(backend, canvas) == []
    full_size = [f for f in backend.find_faces(group) if f.score >= 0.95]
    found = sorted(FaceRule(0.95, 0.02).faces(backend, canvas), key=lambda f: f.box[0])
    for near, far in zip(found, sorted(full_size, key=lambda f: f.box[0])):
        assert abs(near.box[0] - 1000 - far.box[0]) < 0.1 * far.side, "boxes mapped back to the canvas's pixels"
