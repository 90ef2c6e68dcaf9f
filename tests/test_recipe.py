"""The training recipe beyond plain AdamW: an exponential moving average of the LoRA weights (diffusers' EMAModel),
the Prodigy optimizer, LoRA+, learning-rate schedules, DoRA, prior preservation and what captions train with, each
resumed exactly after a kill."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from lookalike.config import load_config
from lookalike.errors import LookalikeError
from lookalike.models.base import resolve_base, text_encoding
from lookalike.train.caption_draws import tag_orders
from lookalike.train.checkpoint import list_checkpoints
from lookalike.train.memory import estimate
from lookalike.train.trainer import train
from tests.helpers import assert_a_killed_run_resumes_exactly


def test_the_lora_is_the_moving_average_of_the_raw_weights_step_by_step(tiny_config):
    """An EMA written out independently from the raw weights after every step (each step's checkpoint, and the
    last step's lora-raw): the first step's weights, then decay d_k = min(k / (9 + k), ema_decay) at step k."""
    steps, decay = 6, 0.6
    config = load_config(tiny_config(train={"max_train_steps": steps, "learning_rate": 1e-2, "ema_decay": decay,
                                            "checkpoint_every": 1, "checkpoints_keep": steps}))
    lora = train(config, "ema")
    run = lora.parent
    raw = [load_file(c / "lora.safetensors") for c in list_checkpoints(run / "checkpoints")]
    raw.append(load_file(run / "lora-raw.safetensors"))
    assert len(raw) == steps
    average = dict(raw[0])
    for k, weights in enumerate(raw[1:], start=2):
        d = min(k / (9 + k), decay)
        average = {key: d * average[key] + (1 - d) * weights[key] for key in weights}
    saved = load_file(lora)
    assert saved.keys() == average.keys()
    for key in saved:
        torch.testing.assert_close(saved[key], average[key], rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(saved[key], raw[-1][key]) for key in saved), "the average is not the raw weights"


def test_prodigy_takes_its_own_learning_rate_and_counts_its_state(tiny_config):
    with pytest.raises(LookalikeError, match="optimizer = 'prodigy' finds its own step size.*got 0.0005"):
        load_config(tiny_config(train={"optimizer": "prodigy", "learning_rate": 5e-4}))
    adamw = estimate(load_config(tiny_config(train={"rank": 4})), "no")
    prodigy = estimate(load_config(tiny_config(train={"rank": 4, "optimizer": "prodigy", "learning_rate": 1.0,
                                                      "ema_decay": 0.99})), "no")
    # Per trainable value: a gradient and AdamW's two moments (12 bytes); Prodigy's four tensors and the EMA (24).
    assert prodigy.optimizer == pytest.approx(adamw.optimizer * 24 / 12)


@pytest.mark.parametrize("schedule, expected", [
    ("constant", lambda progress: 1.0),
    ("cosine", lambda progress: 0.5 * (1 + math.cos(math.pi * progress))),
    ("linear", lambda progress: 1 - progress),
    # Two cosines, each from the top: the second starts again at half way.
    ("cosine_with_restarts", lambda progress: 0.5 * (1 + math.cos(math.pi * ((2 * progress) % 1)))),
    # Down to 1e-7 (of a learning rate of 1) along the square of what remains.
    ("polynomial", lambda progress: (1 - 1e-7) * (1 - progress) ** 2 + 1e-7),
])
def test_learning_rate_schedules_follow_their_formulas_after_the_warm_up(schedule, expected):
    from lookalike.config import TrainConfig
    from lookalike.train.trainer import make_scheduler

    t = TrainConfig(lr_scheduler=schedule, lr_warmup_steps=4, max_train_steps=20, lr_num_cycles=2, lr_power=2.0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(t, optimizer, processes=1)
    rates = []
    for _ in range(t.max_train_steps):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[:4] == pytest.approx([0, 0.25, 0.5, 0.75]), "a linear warm-up from 0"
    assert rates[4:] == pytest.approx([expected((step - 4) / 16) for step in range(4, 20)], abs=1e-12)


def test_loraplus_trains_the_up_matrices_at_the_ratio_times_the_learning_rate(tiny_config):
    """AdamW's first step moves every weight with a gradient by the learning rate (its update is the gradient over its
    own magnitude): the B matrices, which start at zero, move by it times the ratio. The A matrices get no gradient
    while B is zero, so only weight decay moves them, and it moves them alike either way."""
    runs = {}
    for name, ratio in (("plain", None), ("plus", 4.0)):
        plus = {"loraplus_lr_ratio": ratio} if ratio else {}
        config = load_config(tiny_config(train={"max_train_steps": 1, "learning_rate": 1e-3, "sample_every": 0,
                                                "checkpoint_every": 0, **plus}))
        runs[name] = load_file(train(config, name))
    up = [key for key in runs["plain"] if ".lora_B." in key]
    down = [key for key in runs["plain"] if ".lora_A." in key]
    assert up and down
    for key in up:
        assert runs["plain"][key].abs().max() == pytest.approx(1e-3, rel=1e-3)
        assert runs["plus"][key].abs().max() == pytest.approx(4e-3, rel=1e-3)
    for key in down:
        torch.testing.assert_close(runs["plus"][key], runs["plain"][key], rtol=0, atol=0)


def test_loraplus_needs_a_ratio_above_one_and_one_learning_rate_for_prodigy(tiny_config):
    with pytest.raises(LookalikeError, match="train.loraplus_lr_ratio"):
        load_config(tiny_config(train={"loraplus_lr_ratio": 1.0}))
    with pytest.raises(LookalikeError, match="loraplus_lr_ratio cannot be combined with optimizer = 'prodigy'"):
        load_config(tiny_config(train={"loraplus_lr_ratio": 16.0, "optimizer": "prodigy", "learning_rate": 1.0}))


@pytest.mark.slow
def test_a_killed_prodigy_run_with_an_ema_resumes_exactly(tiny_config):
    path = tiny_config(train={"max_train_steps": 40, "checkpoint_every": 10, "checkpoints_keep": 2,
                              "optimizer": "prodigy", "learning_rate": 1.0, "ema_decay": 0.9, "batch_size": 2})
    assert_a_killed_run_resumes_exactly(path, steps=40, killed_after="step-000010")
    runs = load_config(path).workspace / "runs"
    a, b = (load_file(runs / name / "lora-raw.safetensors") for name in ("straight", "killed"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_a_dora_adapter_draws_what_the_stock_pipeline_draws_and_is_refused_by_merge_and_export(tiny_config,
                                                                                                tmp_path):
    from lookalike.models.export import export_lora
    from lookalike.models.merge import merge_loras
    from tests.helpers import stock_image, train_sampled_run

    lora, ours = train_sampled_run(tiny_config, "tiny", adapter="dora")
    assert any(key.endswith(".lora_magnitude_vector") for key in load_file(lora))
    assert abs(ours - stock_image("tiny", lora, guidance_scale=4.0, max_sequence_length=32)).max() <= 1, \
        "within 1/255 of the stock pipeline with the DoRA file"
    assert abs(ours - stock_image("tiny", guidance_scale=4.0, max_sequence_length=32)).max() > 1
    with pytest.raises(LookalikeError, match="a DoRA adapter, whose weight change is not a low-rank product"):
        export_lora(lora, tmp_path / "kohya.safetensors", "kohya")
    with pytest.raises(LookalikeError, match="a DoRA adapter"):
        merge_loras(lora, lora, tmp_path / "merged.safetensors")


def test_prior_preservation_adds_the_class_examples_loss_times_its_weight():
    """The reference scripts' formula, written out: the batch's two halves (subject, class), each one's mean squared
    error against its target, the class one times prior_loss_weight."""
    from lookalike.config import TrainConfig
    from lookalike.train.objectives import FlowMatching, with_prior

    generator = torch.Generator().manual_seed(0)
    x0, noise, prediction = (torch.randn(4, 16, 8, 8, generator=generator) for _ in range(3))
    sigmas = torch.rand(4, generator=generator)
    ours = with_prior(FlowMatching(), prediction, x0, noise, sigmas, TrainConfig(), subject_rows=2, weight=0.7)
    target = noise - x0
    subject_prediction, class_prediction = torch.chunk(prediction, 2, dim=0)
    subject_target, class_target = torch.chunk(target, 2, dim=0)
    reference = torch.nn.functional.mse_loss(subject_prediction, subject_target) + \
        0.7 * torch.nn.functional.mse_loss(class_prediction, class_target)
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)


@pytest.mark.slow
def test_class_images_are_drawn_once_by_the_base_and_a_killed_run_with_them_resumes_exactly(tiny_config):
    """With caption dropout and shuffled tags too: all draw from the run's generator, so the resume is exact with
    all of them. And with LoRA+, a schedule that restarts and a second side (extra_resolutions): the optimizer's
    groups, the schedule and the order of the sizes' batches resume too."""
    path = tiny_config(train={"max_train_steps": 30, "checkpoint_every": 10, "checkpoints_keep": 2,
                              "learning_rate": 1e-3, "caption_dropout": 0.3, "tag_shuffle": 3,
                              "loraplus_lr_ratio": 4.0, "lr_scheduler": "cosine_with_restarts", "lr_num_cycles": 3,
                              "extra_resolutions": [32]},
                       subject={"caption": "a photo of {token}, smiling, indoors, sharp focus"},
                       prior={"num_class_images": 3, "weight": 0.5})
    config = load_config(path)
    from lookalike.train.cache import EmbeddingCache
    from lookalike.train.prior import class_folder

    assert_a_killed_run_resumes_exactly(path, steps=30, killed_after="step-000010")
    cache = EmbeddingCache(config.workspace / "cache", resolve_base("tiny"), torch.device("cpu"), torch.float32)
    orders = tag_orders("a photo of sks, smiling, indoors, sharp focus", 3, config.train.seed)
    text = text_encoding(config.model)
    assert len(orders) == 3 and all(cache.text_path(order, text).is_file() for order in orders), "each encoded"
    folder = class_folder(config)
    assert sorted(p.name for p in folder.glob("*.png")) == ["p00_s0_g5.png", "p00_s1_g5.png", "p00_s2_g5.png"]
    assert "a photo of a man" in (folder / "index.html").read_text()
    qa = (config.workspace / "data" / "qa.html").read_text()
    assert "Class images (prior preservation)" in qa and f'href="../prior/{folder.name}/index.html"' in qa
    assert f'src="../prior/{folder.name}/p00_s0_g5.png"' in qa
    drawn = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")}
    train(config, "again")
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")} == drawn, "drawn once, then reused"
    plain = load_file(train(config.model_copy(update={"prior": config.prior.model_copy(
        update={"num_class_images": 0})}), "plain"))
    with_class = load_file(config.workspace / "runs" / "again" / "lora.safetensors")
    assert any(not torch.equal(plain[key], with_class[key]) for key in plain), "the class examples were trained on"


def test_class_images_from_a_folder_must_be_enough(tiny_config, tmp_path, faces):
    from lookalike import display
    from lookalike.train.prior import class_images

    folder = faces / "train" / "obama"
    config = load_config(tiny_config(prior={"num_class_images": 2, "images": str(folder)}))
    taken = class_images(config, display.console(quiet=True))
    assert len(taken) == 2 and all(image.caption == "a photo of a man" for image in taken)
    many = load_config(tiny_config(name="many.toml", prior={"num_class_images": 50, "images": str(folder)}))
    with pytest.raises(LookalikeError, match=f"prior.images: {folder} holds 4 images, and prior.num_class_images "
                                             "asks for 50"):
        class_images(many, display.console(quiet=True))


@pytest.mark.slow
def test_a_sweep_compares_prior_preservation_and_captions_on_and_off_in_one_report(tmp_path, faces, tiny_blip):
    from tests.conftest import run_cli, tiny_study

    config = tiny_study(tmp_path, faces, train={"max_train_steps": 3}, prior={"num_class_images": 2},
                        data={"captioner": str(tiny_blip)}, evaluate={"clip_model": "tiny"},
                        generate={"num_inference_steps": 2},
                        **{"sweep": {"design": "grid"}, "sweep.factors": {"prior": [True, False],
                                                                          "captions": [True, False]}})
    result = run_cli("run", str(config), "--jobs", "2", timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = (tmp_path / "work" / "report" / "summary.md").read_text()
    for name in ("priorTrue-captionsTrue", "priorTrue-captionsFalse", "priorFalse-captionsTrue",
                 "priorFalse-captionsFalse"):
        assert f"| {name} | done |" in summary, summary
    assert "## What each swept factor did" in summary
    for factor in ("prior", "captions"):
        assert f"| {factor} | runs | identity | bleed | CLIP | faceless share |" in summary, summary
        assert "| True | 2 |" in summary and "| False | 2 |" in summary
    assert len(list((tmp_path / "work" / "prior").glob("*/*.png"))) == 2, "drawn once for the runs that use them"


def test_without_captions_every_photo_trains_on_its_persons_caption(tiny_config, tiny_blip):
    from lookalike.data.dataset import training_images

    config = load_config(tiny_config(data={"captioner": str(tiny_blip)}))
    described = [image.caption for image in training_images(config)]
    assert all(caption.startswith("sks man, ") for caption in described), described
    plain = training_images(config.with_experiment({"captions": False}, "test"))
    assert [image.path for image in plain] == [image.path for image in training_images(config)]
    assert {image.caption for image in plain} == {"a photo of sks"}


def test_tags_are_shuffled_behind_the_first_into_a_fixed_set_of_orders():
    from lookalike.train.caption_draws import CaptionDraws, tag_orders

    caption = "sks man, smiling,outdoors , red shirt"
    orders = tag_orders(caption, 4, seed=0)
    assert len(set(orders)) == 4 and orders == tag_orders(caption, 4, seed=0)
    for order in orders:
        first, *rest = order.split(", ")
        assert first == "sks man" and sorted(rest) == ["outdoors", "red shirt", "smiling"]
    assert len(tag_orders(caption, 100, seed=0)) == 6, "3 tags have 3! orders"
    assert tag_orders("sks man smiling outdoors", 4, seed=0) == ["sks man smiling outdoors"]
    assert tag_orders("sks man, smiling", 4, seed=0) == ["sks man, smiling"]
    assert tag_orders(caption, 0, seed=0) == [caption]

    draws = CaptionDraws([caption, "sks man"], tag_shuffle=4, dropout=0.0, seed=0)
    assert sorted(draws.texts()) == sorted(orders + ["sks man"])
    generator = torch.Generator().manual_seed(0)
    drawn = [draws.draw([caption, "sks man"], generator) for _ in range(200)]
    assert {first for first, _ in drawn} == set(orders) and {second for _, second in drawn} == {"sks man"}
    untouched = torch.Generator().manual_seed(0)
    assert CaptionDraws([caption], 0, 0.0, 0).draw([caption], untouched) == [caption]
    assert torch.equal(untouched.get_state(), torch.Generator().manual_seed(0).get_state()), "nothing drawn when off"


def test_caption_dropout_empties_captions_at_its_rate_from_the_runs_generator():
    from lookalike.train.caption_draws import drop_captions

    captions = ["a photo of sks"] * 4000
    dropped = drop_captions(captions, 0.1, torch.Generator().manual_seed(0))
    assert set(dropped) == {"", "a photo of sks"} and 0.08 < dropped.count("") / len(captions) < 0.12
    assert drop_captions(captions, 0.1, torch.Generator().manual_seed(0)) == dropped, "the same draws again"
    untouched = torch.Generator().manual_seed(0)
    assert drop_captions(captions, 0.0, untouched) == captions
    assert torch.equal(untouched.get_state(), torch.Generator().manual_seed(0).get_state()), "nothing drawn at 0"



def test_prior_preservation_doubles_the_estimated_activations(tiny_config):
    plain = estimate(load_config(tiny_config()), "no")
    prior = estimate(load_config(tiny_config(prior={"num_class_images": 4})), "no")
    assert prior.activations == pytest.approx(2 * plain.activations) and prior.weights == plain.weights
