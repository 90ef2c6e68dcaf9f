"""Masked training around the face ([train] background_loss_weight): the face's region in each training image,
the weights over its latent cells, laid out as each family's latents are, and the weighted loss."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lookalike.config import TrainConfig, load_config
from lookalike.data.dataset import crop_pixel_size, load_training_image, training_images, training_size
from lookalike.faces.facenet_backend import MtcnnDetector
from lookalike.models.base import resolve_base
from lookalike.models.families import FAMILIES
from lookalike.train.face_weights import UNCHANGED, batch_weights, face_region, loss_weights
from lookalike.train.objectives import FlowMatching, NoisePrediction, squared_errors
from lookalike.train.trainer import train


def test_the_cells_the_region_touches_weigh_one_and_the_rest_the_background():
    weights = loss_weights((0.3, 0.1, 0.55, 0.6), (4, 8), 0.25)
    expected = torch.full((4, 8), 0.25)
    expected[0:3, 2:5] = 1.0  # rows 0.4-2.4 of 4 and columns 2.4-4.4 of 8, each cell they touch
    torch.testing.assert_close(weights, expected, rtol=0, atol=0)
    assert torch.equal(loss_weights((0.5, 0.5, 0.5, 0.5), (4, 4), 0.0), torch.ones(4, 4)), \
        "a region that touches no cell: the plain loss, never a zero sum"


def test_the_region_follows_the_cut_that_fits_a_crop_to_its_size():
    # A 5:4 crop (250x200) fitted to 144x112 (1.29:1): a strip of 2.9% of its height is cut from top and bottom.
    left, top, right, bottom = face_region((0.4, 0.4, 0.6, 0.6), (250, 200), (144, 112))
    height = (250 / 200) / (144 / 112)
    assert (left, right) == pytest.approx((0.35, 0.65))
    assert (top, bottom) == pytest.approx(((0.35 - (1 - height) / 2) / height, (0.65 - (1 - height) / 2) / height))
    assert face_region((0.0, 0.0, 0.9, 1.0), (100, 100), (64, 64)) == (0.0, 0.0, 1.0, 1.0), "clipped to the image"


def test_the_weighted_loss_is_each_examples_weighted_mean_and_ones_give_the_plain_loss():
    generator = torch.Generator().manual_seed(0)
    prediction, x0, noise = (torch.randn(2, 4, 6, 6, generator=generator) for _ in range(3))
    weights = torch.rand(2, 4, 6, 6, generator=generator)
    sigmas = torch.rand(2, generator=generator)
    plain = TrainConfig()
    errors = (prediction - (noise - x0)) ** 2
    expected = torch.stack([(errors[i] * weights[i]).sum() / weights[i].sum() for i in range(2)]).mean()
    torch.testing.assert_close(FlowMatching().loss(prediction, x0, noise, sigmas, plain, weights), expected)
    torch.testing.assert_close(FlowMatching().loss(prediction, x0, noise, sigmas, plain, torch.ones_like(weights)),
                               FlowMatching().loss(prediction, x0, noise, sigmas, plain))
    # Stable Diffusion's noise prediction, min-SNR weighting on top: each example's weighted mean times its
    # min(SNR, gamma) / SNR, the SNR read from the scheduler's alphas.
    objective = NoisePrediction(resolve_base("tiny-sd15"))
    timesteps = torch.tensor([10, 700])
    alphas = objective.scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    expected = (squared_errors(prediction, noise, weights) * torch.clamp(snr, max=5.0) / snr).mean()
    torch.testing.assert_close(objective.loss(prediction, x0, noise, timesteps, TrainConfig(snr_gamma=5.0), weights),
                               expected)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_weights_are_laid_out_as_each_familys_latents(family):
    """The weighted loss in the denoiser's input layout (packed, patchified) equals the weighted loss over the
    latent grid, where the weights were made: the weights moved with the latents, cell for cell."""
    family = FAMILIES[family]
    generator = torch.Generator().manual_seed(0)
    prediction, target = (torch.randn(2, 16, 6, 10, generator=generator) for _ in range(2))
    maps = [loss_weights((0.1, 0.2, 0.45, 0.9), (6, 10), 0.1), None]
    expected_first = ((prediction[0] - target[0]) ** 2 * maps[0]).sum() / (maps[0].sum() * 16)
    expected = torch.stack([expected_first, ((prediction[1] - target[1]) ** 2).mean()])
    packed = [family.model_input(tensor, UNCHANGED)[0] for tensor in (prediction, target)]
    weights = batch_weights(family, maps, prediction.shape[1:])
    assert weights.shape == packed[0].shape
    torch.testing.assert_close(squared_errors(*packed, weights), expected)


@pytest.mark.slow
@pytest.mark.parametrize("buckets", [False, True])
def test_the_region_holds_the_face_found_in_each_training_image(tiny_config, buckets):
    """Found again, independently, by MTCNN in the very image the run encodes (the crop fitted to its size)."""
    config = load_config(tiny_config(data={"resolution": 256, "buckets": buckets}))
    detector = MtcnnDetector()
    for image in training_images(config):
        size = training_size(image, 256, 16)
        region = face_region(image.face, crop_pixel_size(image), size)
        picture = load_training_image(image, size)
        found = max(detector.find_faces(picture), key=lambda face: face.area).box
        left, top, right, bottom = (found[0] / size[0], found[1] / size[1], found[2] / size[0], found[3] / size[1])
        slack = 0.03  # MTCNN's boxes move by a few pixels between sizes
        assert region[0] - slack <= left and region[1] - slack <= top, (image.path, region, found)
        assert right <= region[2] + slack and bottom <= region[3] + slack, (image.path, region, found)
        assert (region[2] - region[0]) * (region[3] - region[1]) < 0.8, "the background is left out"


def test_a_run_that_learns_the_face_alone_differs_from_a_plain_one_and_is_finite(tiny_config):
    loras = {}
    for name, background in (("plain", 1.0), ("face", 0.0)):
        config = load_config(tiny_config(train={"max_train_steps": 2, "learning_rate": 1e-2, "sample_every": 0,
                                                "checkpoint_every": 0, "background_loss_weight": background}))
        loras[name] = load_file(train(config, name))
    assert all(torch.isfinite(tensor).all() for tensor in loras["face"].values())
    assert any(not torch.equal(loras["face"][key], loras["plain"][key]) for key in loras["plain"])


def test_a_mirrored_example_is_encoded_from_mirrored_pixels_and_weighs_its_mirrored_face(tiny_config):
    """[train] flip: each photo is also an example mirrored left to right; its latents are the VAE's of the mirrored
    pixels (not the latents flipped), and its loss weights are the photo's, mirrored."""
    from PIL import ImageOps

    from lookalike.data.dataset import mirrored
    from lookalike.models.base import load_component
    from lookalike.models.families import folder_family
    from lookalike.train.cache import EmbeddingCache, _to_tensor
    from lookalike.train.face_weights import photo_weights

    config = load_config(tiny_config(data={"resolution": 128, "buckets": True},
                                     train={"max_train_steps": 2, "flip": True, "background_loss_weight": 0.0}))
    assert load_file(train(config, "flipped")), "a LoRA"
    latents = sorted((config.workspace / "cache" / "latents").glob("*.safetensors"))
    assert len(latents) == 8, "4 photos, each also mirrored"

    photo = training_images(config)[0]
    flipped = mirrored(photo)
    size = training_size(photo, 128, 16)
    assert load_training_image(flipped, size).tobytes() == ImageOps.mirror(load_training_image(photo, size)).tobytes()
    folder = resolve_base("tiny")
    cache = EmbeddingCache(config.workspace / "cache", folder, torch.device("cpu"), torch.float32)
    ours, theirs = cache.latents([photo, flipped], [size, size])
    vae = load_component(folder, "vae")
    with torch.no_grad():
        mean, _ = folder_family(folder).encode_pixels(vae, _to_tensor(load_training_image(flipped, size)))
    torch.testing.assert_close(theirs.mean, mean.float())
    assert not torch.allclose(theirs.mean, ours.mean.flip(-1), atol=1e-3), "not the latents flipped"
    plain, mirror = photo_weights([photo, flipped], [size, size], [ours, theirs], 0.0)
    torch.testing.assert_close(mirror, plain.flip(-1), rtol=0, atol=0)
