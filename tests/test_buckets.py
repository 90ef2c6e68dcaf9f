"""Aspect-ratio buckets ([data] buckets): each photo keeps its own framing, trimmed to the nearest aspect ratio
around its face; a run trains each batch on one size, uses every photo every epoch, caches latents per size, and
resumes exactly after a kill. Multi-resolution training ([train] extra_resolutions) trains on sizes as buckets do."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from lookalike import display
from lookalike.config import load_config
from lookalike.data.crop import bucket_crop_box, bucket_size, nearest_ratio
from lookalike.data.prepare import prepare_study
from lookalike.train.batches import BatchOrder, BucketBatches, batch_order
from tests.helpers import assert_a_killed_run_resumes_exactly


def test_a_photo_takes_the_nearest_ratio_and_a_bucket_of_about_the_same_pixels():
    assert nearest_ratio((1350, 1080)) == (5, 4) and nearest_ratio((900, 750)) == (5, 4)
    assert nearest_ratio((1280, 720)) == (16, 9) and nearest_ratio((720, 1280)) == (9, 16)
    assert nearest_ratio((600, 591)) == (1, 1) and nearest_ratio((2000, 1000)) == (16, 9)
    assert bucket_size(1.0, 1024, 64) == (1024, 1024) and bucket_size(1.0, 48, 64) == (48, 48), "a square as is"
    for ratio in [(4, 5), (3, 2), (16, 9)]:
        width, height = bucket_size(ratio[0] / ratio[1], 1024, 64)
        assert width % 64 == 0 and height % 64 == 0
        assert abs(math.log(width / height * ratio[1] / ratio[0])) < 0.08, (ratio, width, height)
        assert 0.9 < width * height / 1024**2 < 1.05, (ratio, width, height)


def test_the_strip_cut_away_keeps_the_face_nearest_the_centre():
    # A 1000x900 photo (nearest 1:1): a 900 px square, slid towards a face near the right edge.
    assert bucket_crop_box((850, 400, 950, 500), (1000, 900)) == (100, 0, 1000, 900)
    assert bucket_crop_box((450, 400, 550, 500), (1000, 900)) == (50, 0, 950, 900)
    assert bucket_crop_box(None, (1000, 900)) == (50, 0, 950, 900)
    # A 1280x720 photo is 16:9 already: kept whole.
    assert bucket_crop_box((100, 100, 200, 200), (1280, 720)) == (0, 0, 1280, 720)
    # A 900x1400 portrait is nearest 2:3: 1350 tall, the strip cut below the face near its top.
    assert bucket_crop_box((400, 100, 500, 200), (900, 1400)) == (0, 0, 900, 1350)


def test_bucket_batches_never_mix_sizes_and_use_every_example_each_epoch():
    sizes = [(144, 112)] * 5 + [(176, 96)] * 2 + [(128, 128)] * 3
    order = batch_order(sizes, batch_size=3)
    assert isinstance(order, BucketBatches)
    generator = torch.Generator().manual_seed(0)
    for epoch in (1, 2):
        batches = []
        while not batches or order.position < len(order.batches):
            batches.append(order.next(generator))
        assert order.epoch == epoch and all(len(batch) == 3 for batch in batches)
        assert all(len({sizes[i] for i in batch}) == 1 for batch in batches), "a batch of one size"
        assert {i for batch in batches for i in batch} == set(range(10)), "every example in every epoch"
        assert len(batches) == 2 + 1 + 1  # 5 -> 2 batches (the second filled up), 2 -> 1, 3 -> 1
    state, generator_state = order.state_dict(), generator.get_state()
    expected = [order.next(generator) for _ in range(9)]
    restored = batch_order(sizes, batch_size=3)
    restored.load_state_dict(state)
    generator.set_state(generator_state)
    assert [restored.next(generator) for _ in range(9)] == expected
    assert isinstance(batch_order([(64, 64)] * 4, 2), BatchOrder), "one size: the plain order"


@pytest.fixture
def framed(tmp_path, faces):
    """Four photos of one person in two framings: two landscape 16:9 (1280 x 720) and two 5:4 (1350 x 1080), each
    a photo of tests/data/faces padded whole into that frame, so that every face stays inside it."""
    from PIL import ImageOps

    folder = tmp_path / "framed"
    folder.mkdir()
    for index, size in enumerate([(1280, 720), (1280, 720), (1350, 1080), (1350, 1080)], start=1):
        with Image.open(faces / "train" / "obama" / f"{index}.jpg") as photo:
            ImageOps.pad(photo.convert("RGB"), size, color=(128, 128, 128)).save(folder / f"{index}.jpg", quality=95)
    return folder


@pytest.fixture
def bucketed(tiny_config, framed):
    return tiny_config(subject={"images": str(framed)}, data={"resolution": 128, "buckets": True},
                       train={"max_train_steps": 12, "checkpoint_every": 4, "checkpoints_keep": 2,
                              "batch_size": 3, "learning_rate": 1e-3, "offload": True,
                              "background_loss_weight": 0.2, "flip": True},
                       prior={"num_class_images": 2})


def test_prepared_photos_keep_their_framing_with_the_face_inside(bucketed):
    config = load_config(bucketed)
    photos = [p for p in prepare_study(config, display.console(quiet=True))["sks"] if p.status == "kept"]
    assert len(photos) == 4
    for photo in photos:
        left, top, right, bottom = photo.crop_box
        face = photo.faces[photo.face]["box"]
        assert left <= face[0] and top <= face[1] and face[2] <= right and face[3] <= bottom, "the face is kept"
        ratio = nearest_ratio(tuple(photo.size))
        assert abs((right - left) / (bottom - top) - ratio[0] / ratio[1]) < 0.01
        assert max(right - left, bottom - top) == max(photo.size), "the photo's framing, not a face crop"
        with Image.open(config.workspace / "data" / photo.output) as crop:
            assert crop.size == bucket_size(ratio[0] / ratio[1], 128, 16)
    assert sorted({Image.open(config.workspace / "data" / p.output).size for p in photos}) == [(144, 112), (176, 96)]


@pytest.mark.slow
def test_a_bucketed_run_with_class_images_caches_latents_per_size_and_resumes_exactly(bucketed):
    """Batches of 3 from buckets of 2 photos (each filled up), class images fitted to each bucket's size; the base
    offloaded block by block (train.offload), the loss weighted towards each photo's face (the class images'
    plain) and each photo mirrored too (train.flip), which resume exactly too."""
    config = load_config(bucketed)
    assert_a_killed_run_resumes_exactly(bucketed, steps=12, killed_after="step-000008")
    from safetensors.torch import load_file

    shapes = sorted(tuple(load_file(path)["mean"].shape[-2:]) for path in (config.workspace / "cache" / "latents")
                    .glob("*.safetensors"))
    # 2 photos in each bucket (96x176 and 112x144 pixels), each also mirrored, and the 2 class images fitted to each
    assert shapes == [(12, 22)] * 6 + [(14, 18)] * 6


@pytest.mark.slow
@pytest.mark.parametrize("base", ["tiny-flux2-klein", "tiny-qwen-image", "tiny-z-image", "tiny-sdxl", "tiny-sd15"])
def test_every_family_trains_on_buckets(tiny_config, framed, base):
    """(The FLUX.1 family's run above.) SDXL conditions on each bucket's size; a transformer gets its latents'
    layout, and the face's loss weights laid out as them."""
    from safetensors.torch import load_file

    from lookalike.train.trainer import train

    config = load_config(tiny_config(model={"base": base}, subject={"images": str(framed)},
                                     data={"resolution": 128, "buckets": True},
                                     train={"max_train_steps": 2, "batch_size": 2, "background_loss_weight": 0.5}))
    assert load_file(train(config, "bucketed")), "a LoRA"
    sides = {load_file(path)["mean"].shape[-2:] for path in (config.workspace / "cache" / "latents").glob("*")}
    assert sorted(sides) == [(12, 22), (14, 18)], "trained on both buckets"


def test_sides_are_multiples_of_what_each_denoiser_needs_and_the_estimate_counts_the_largest_bucket(tiny_config):
    from lookalike.data.crop import largest_bucket_share
    from lookalike.models.families import FAMILIES
    from lookalike.models.families.stable_diffusion import SD1_UNET, SDXL_UNET
    from lookalike.train.memory import estimate

    assert FAMILIES["sd1"].pixel_multiple(SD1_UNET) == 64 and FAMILIES["sdxl"].pixel_multiple(SDXL_UNET) == 32
    assert FAMILIES["flux1"].pixel_multiple({}) == 16, "8x VAE, 2x2 patches"
    square = estimate(load_config(tiny_config(name="square.toml", data={"resolution": 512})), "no")
    bucketed = estimate(load_config(tiny_config(data={"resolution": 512, "buckets": True})), "no")
    assert largest_bucket_share(512, 16) == 1.01953125  # 4:5, 464 x 576 pixels
    assert bucketed.activations == pytest.approx(square.activations * 1.01953125)


@pytest.mark.slow
def test_with_extra_resolutions_every_photo_trains_at_every_side(tiny_config):
    """Multi-resolution training: an example of each photo at each side, latents cached per size; the estimate
    counts the largest side, and names the extra sides among the lighter settings."""
    from safetensors.torch import load_file

    from lookalike.train.memory import estimate, lighter_settings
    from lookalike.train.trainer import train

    config = load_config(tiny_config(data={"resolution": 128},
                                     train={"resolution": 64, "extra_resolutions": [128, 32], "max_train_steps": 3,
                                            "batch_size": 2, "background_loss_weight": 0.5}))
    assert load_file(train(config, "sides")), "a LoRA"
    shapes = sorted(tuple(load_file(path)["mean"].shape[-2:]) for path in (config.workspace / "cache" / "latents")
                    .glob("*.safetensors"))
    assert shapes == [(4, 4)] * 4 + [(8, 8)] * 4 + [(16, 16)] * 4, "4 photos at 32, 64 and 128 px"
    alone = load_config(tiny_config(name="alone.toml", data={"resolution": 128},
                                    train={"resolution": 128, "batch_size": 2}))
    ours = estimate(config, "no")
    assert ours.activations == pytest.approx(estimate(alone, "no").activations), "the largest side's"
    assert "train.extra_resolutions=[]" in [label for label, _ in lighter_settings(config, "no", ours)]


@pytest.mark.parametrize("sides, message", [
    ([256], r"train.extra_resolutions \[256\] above \[data\] resolution 128"),
    ([100], "multiple of 16"),
])
def test_extra_resolutions_are_multiples_of_16_within_the_crops(tiny_config, sides, message):
    from lookalike.errors import LookalikeError

    with pytest.raises(LookalikeError, match=message):
        load_config(tiny_config(data={"resolution": 128}, train={"extra_resolutions": sides}))
