"""Identity in the training loop at full size: what scoring a run's samples costs with the study's own evaluator
architectures, and the share of a run's time that makes at a measured training step.

Training scores its samples on the CPU (train/sample_scores.py loads the evaluator off the accelerator, which the
run needs), so on a GPU machine the cost is CPU time beside GPU steps. This measures, on the CPU as training does:

- loading: the face backend (MTCNN with its shipped weights, InceptionResnetV1) and CLIP ViT-L/14, once per
  training process, and the subject's reference embeddings;
- one sample step: each sample prompt's image (a real photo at the training size) detected, embedded and CLIP-scored.

The embedding and CLIP weights cannot be downloaded here, so both are the published architectures with random
weights: the same work, meaningless numbers. With `--step-seconds` (a training step measured in the same call, as
bench/gpu_run.sh passes bench/gpu_train_step.py's figure) it prints the share of a run's time that scoring takes:
(loading + samples x one sample step) / (steps x step seconds + the same), sampling left out (it happens anyway).

    .venv/bin/python bench/score_cost.py [--resolution 1024] [--prompts 1] [--step-seconds S]

Last line: scoring_share=<share> with --step-seconds, else sample_step_s=<seconds of one sample step>.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageOps

from lookalike.config import TrainConfig
from lookalike.evaluate.clip_score import ClipScorer
from lookalike.evaluate.evaluator import Evaluator
from lookalike.evaluate.scoring import ImageScore
from lookalike.faces import FaceRule
from lookalike.faces.facenet_backend import FacenetBackend
from lookalike.models.base import quiet_libraries
from lookalike.models.tiny import byte_level_clip_tokenizer

REPO = Path(__file__).resolve().parents[1]
# openai/clip-vit-large-patch14, the study's CLIP, as its config.json publishes it.
CLIP_VIT_L14_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         max_position_embeddings=77)
CLIP_VIT_L14_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=224, patch_size=14)


def clip_vit_l14():
    """CLIP ViT-L/14's architecture with random weights, its image processor's 224 px crop, a byte-level tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = byte_level_clip_tokenizer()
    text = dict(CLIP_VIT_L14_TEXT, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=CLIP_VIT_L14_VISION, projection_dim=768)).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 224},
                                                                 crop_size={"height": 224, "width": 224}),
                              tokenizer=tokenizer)
    return model, processor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, default=REPO / "tests" / "data" / "faces" / "obama")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--prompts", type=int, default=len(TrainConfig().sample_prompts))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--step-seconds", type=float, help="a training step's seconds, measured in the same call")
    parser.add_argument("--steps", type=int, default=TrainConfig().max_train_steps)
    parser.add_argument("--every", type=int, default=TrainConfig().sample_every)
    args = parser.parse_args()
    quiet_libraries()
    photos = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))

    started = time.perf_counter()
    cpu = torch.device("cpu")
    backend = FacenetBackend(pretrained=False, device="cpu")
    evaluator = Evaluator(backend, FaceRule.for_backend(backend), ClipScorer(*clip_vit_l14(), device=cpu))
    reference = evaluator.reference(photos)
    load_s = time.perf_counter() - started

    with tempfile.TemporaryDirectory() as tmp:
        # The samples of one sample step: photos at the training size, as a run's samples are drawn.
        samples = []
        for index in range(args.prompts):
            path = Path(tmp) / f"step_p{index}.png"
            with Image.open(photos[index % len(photos)]) as photo:
                ImageOps.fit(photo.convert("RGB"), (args.resolution,) * 2).save(path)
            samples.append(path)
        times = []
        for _ in range(args.repeats):
            rows = [ImageScore(image=p.name, prompt="a photo of sks", clip_prompt="a photo of a man") for p in samples]
            began = time.perf_counter()
            evaluator.score(samples, rows, reference)
            times.append(time.perf_counter() - began)
    step_s = statistics.median(times)
    print(f"evaluator: MTCNN + InceptionResnetV1 + CLIP ViT-L/14 (random weights) on the CPU, torch threads "
          f"{torch.get_num_threads()}; {args.prompts} sample(s) of {args.resolution} px per sample step")
    print(f"load_s={load_s:.2f}")
    print(f"sample_step_s={step_s:.3f}")
    if args.step_seconds:
        scored = args.steps // args.every if args.every else 0
        scoring = load_s + scored * step_s
        share = scoring / (args.steps * args.step_seconds + scoring)
        print(f"{args.steps} steps of {args.step_seconds:.3f} s, {scored} sample steps scored")
        print(f"scoring_share={share:.4f}")


if __name__ == "__main__":
    main()
