"""Evaluate's throughput against a plain per-image loop, on the same images, checking both agree.

The images: 64 generated-size (1024 x 1024) PNGs with sidecars, made from the repository's test photos
(tests/data/faces: crops, flips, the group photo) plus noise and blank frames, each with one of the study's 11 prompts. The face backend is
the study's (MTCNN + InceptionResnetV1; random embedding weights, as the VGGFace2 ones cannot be downloaded
here: the same work, meaningless numbers); CLIP is the tiny offline model unless --clip-model names another.

The baseline is the study's algorithm as it reads: for each image, load it, detect faces (MTCNN at its
default settings), embed the chosen face, compute CLIP on the (prompt, image) pair, one at a time. It
applies the same face rule (confidence and size thresholds, largest face), so both should find the same
faces; their boxes differ slightly, since evaluate's MTCNN skips the scales of faces too small to count.

    .venv/bin/python bench/evaluate.py [--images 64] [--clip-model tiny]

Last line: speedup=<evaluate images/s / per-image loop images/s>.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from lookalike.config import EvaluateConfig
from lookalike.data.images import list_images, load_rgb
from lookalike.evaluate.clip_score import ClipScorer
from lookalike.evaluate.evaluator import Evaluator
from lookalike.evaluate.identity import face_distance
from lookalike.evaluate.scoring import describe_images
from lookalike.faces import FaceRule
from lookalike.faces.facenet_backend import FacenetBackend
from lookalike.models.base import quiet_libraries
from lookalike.models.clip import load_clip

REPO = Path(__file__).resolve().parents[1]
FACES = REPO / "tests" / "data" / "faces"
PROMPTS = ["a photo of a man", "a man with a beard and a white shirt.", "a man in casual clothes",
           "a man, cinematic style, dramatic lighting, movie poster aesthetic, high contrast",
           "a man, fashion magazine style, editorial photography, stylish outfit, modern aesthetic",
           "a man holding a trophy", "a man outdoors in natural environment", "a man playing football on the field",
           "a man smiling at camera", "portrait of a man in studio lighting", "a man wears a tank top and blazer."]


def make_images(folder: Path, count: int) -> None:
    photos = sorted(p for p in FACES.glob("*/*") if p.suffix.lower() in (".jpg", ".png"))
    rng = np.random.default_rng(0)
    for index in range(count):
        if index % 16 == 15:
            image = Image.fromarray(rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8))
        else:
            photo = load_rgb(photos[index % len(photos)])
            image = ImageOps.fit(photo, (1024, 1024), centering=(0.5, (index // len(photos)) * 0.25 % 1.0))
            image = ImageOps.mirror(image) if index % 2 else image
        image.save(folder / f"img{index:03d}.png")
        (folder / f"img{index:03d}.json").write_text(json.dumps({"prompt": PROMPTS[index % len(PROMPTS)]}))


def iou(a, b) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda box: (box[2] - box[0]) * (box[3] - box[1])  # noqa: E731
    return width * height / (area(a) + area(b) - width * height)


def per_image_loop(evaluator, reference, paths, prompts) -> list[tuple[tuple | None, float | None, float]]:
    """(chosen face box, face distance, clip score) per image, everything one image at a time, with the models
    as facenet-pytorch builds them (the same weights as evaluate's)."""
    from facenet_pytorch import MTCNN, InceptionResnetV1
    from facenet_pytorch.models.mtcnn import extract_face, fixed_image_standardization

    rule, clip = evaluator.rule, evaluator.clip
    mtcnn = MTCNN(keep_all=True)
    encoder = InceptionResnetV1(classify=False, num_classes=8631).eval()
    encoder.load_state_dict(evaluator.backend.encoder.state_dict())
    results = []
    for path, prompt in zip(paths, prompts):
        image = load_rgb(path)
        boxes, probabilities = mtcnn.detect(image)  # MTCNN at its defaults, the study's call
        boxes = [] if boxes is None else boxes
        faces = [(box, p) for box, p in zip(boxes, probabilities)
                 if p >= rule.min_score and min(box[2] - box[0], box[3] - box[1]) >= rule.min_size * min(image.size)]
        distance, box = None, None
        if faces:
            box = max(faces, key=lambda f: (f[0][2] - f[0][0]) * (f[0][3] - f[0][1]))[0]
            crop = fixed_image_standardization(extract_face(image, box, image_size=160, margin=0))
            with torch.no_grad():
                embedding = encoder(crop[None])[0].numpy()
            distance = face_distance(embedding, reference)
        with torch.no_grad():
            inputs = clip.processor(text=[prompt], images=image, return_tensors="pt", padding=True,
                                    truncation=True)
            text = clip._tensor(clip.model.get_text_features(inputs["input_ids"], inputs["attention_mask"]))
            pixels = clip._tensor(clip.model.get_image_features(inputs["pixel_values"]))
        score = torch.nn.functional.cosine_similarity(text, pixels).item()
        results.append((box, distance, score))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--clip-model", default="tiny")
    args = parser.parse_args()
    quiet_libraries()

    backend = FacenetBackend(pretrained=False)  # the same architecture and work as with the VGGFace2 weights
    settings = EvaluateConfig()
    evaluator = Evaluator(backend, FaceRule.for_backend(backend, settings.min_face_score, settings.min_face_size),
                          ClipScorer(*load_clip(args.clip_model)))
    reference = evaluator.reference(list_images(FACES / "obama", "references"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_images(folder, args.images)
        paths = list_images(folder, "images")
        rows = describe_images(paths)
        prompts = [row.prompt for row in rows]
        for row in rows:
            row.clip_prompt = row.prompt

        start = time.perf_counter()
        baseline = per_image_loop(evaluator, reference, paths, prompts)
        loop_seconds = time.perf_counter() - start
        start = time.perf_counter()
        evaluator.score(paths, rows, reference)
        batched_seconds = time.perf_counter() - start

    same_faces = sum((box is not None) == row.face_found for (box, _, _), row in zip(baseline, rows))
    overlaps = [iou(box, row.face_box) for (box, _, _), row in zip(baseline, rows) if box is not None
                and row.face_found]
    distance_gaps = [abs(d - row.face_distance) / d for (box, d, _), row in zip(baseline, rows)
                     if box is not None and row.face_found and iou(box, row.face_box) >= 0.5]
    clip_gap = max(abs(c - row.clip_score) for (_, _, c), row in zip(baseline, rows))
    print(f"images={len(paths)} torch_threads={torch.get_num_threads()} clip={args.clip_model}")
    print(f"per-image loop: {loop_seconds:.1f} s, {len(paths) / loop_seconds:.2f} images/s")
    print(f"evaluate:       {batched_seconds:.1f} s, {len(paths) / batched_seconds:.2f} images/s")
    print(f"agreement: a face found by both or neither on {same_faces}/{len(paths)} images; chosen face box IoU "
          f"median {np.median(overlaps):.3f}, another face chosen on {sum(o < 0.5 for o in overlaps)} image(s) "
          f"(the cropped group photo's two faces); face_distance relative gap on the same face median "
          f"{np.median(distance_gaps):.3f}, largest {max(distance_gaps):.3f}; clip_score largest gap {clip_gap:.2e}")
    print(f"speedup={loop_seconds / batched_seconds:.2f}")


if __name__ == "__main__":
    main()
