"""Masked training around the face ([train] background_loss_weight): every latent cell of a training photo that
the face's region touches weighs 1 in the loss, every other cell the background weight. Below 1, the LoRA learns
the face more than the photos' backgrounds, clothes and light, which would otherwise come back in every image the
LoRA draws and cost prompt adherence (what OneTrainer's masked training and kohya's masked_loss offer, with the
mask made from the face prepare found rather than painted by hand).

Each example's loss is the weighted mean of its squared errors (sum w·e² / sum w), so a small face does not
shrink the loss and the learning rate keeps its meaning. Class images (prior preservation) and photos without a
face train with the plain loss.
"""

from __future__ import annotations

import math

import torch

from lookalike.data.crop import Fractions, Size, clipped_to_image
from lookalike.data.dataset import crop_pixel_size, fitted_fractions

# MTCNN's box runs from the brows to the chin: a quarter of its size more on every side takes in the hair, ears
# and jaw line, where likeness lies too.
FACE_MARGIN = 0.25


def face_region(face: Fractions, crop_size: Size, size: Size) -> Fractions:
    """The face's region in the training image at `size` (the crop fitted to it), as fractions of its sides:
    the face's box in the crop grown by FACE_MARGIN on every side, clipped to the image."""
    cut_left, cut_top, cut_width, cut_height = fitted_fractions(crop_size, size)
    left, top, right, bottom = face
    grow_x, grow_y = (right - left) * FACE_MARGIN, (bottom - top) * FACE_MARGIN
    return clipped_to_image(((left - grow_x - cut_left) / cut_width, (top - grow_y - cut_top) / cut_height,
                             (right + grow_x - cut_left) / cut_width, (bottom + grow_y - cut_top) / cut_height))


def loss_weights(region: Fractions, cells: tuple[int, int], background: float) -> torch.Tensor:
    """(h, w) weights over a latent grid of `cells` (h, w): 1 where a cell overlaps the region, `background`
    elsewhere. A region that touches no cell (its face cut away by the fit) gives the plain loss: all 1."""
    height, width = cells
    left, top, right, bottom = region
    rows = range(math.floor(top * height), math.ceil(bottom * height))
    columns = range(math.floor(left * width), math.ceil(right * width))
    if not rows or not columns:
        return torch.ones(height, width)
    weights = torch.full((height, width), float(background))
    weights[rows.start:rows.stop, columns.start:columns.stop] = 1.0
    return weights


def photo_weights(images, sizes: list[Size], latents, background: float) -> list[torch.Tensor | None]:
    """Each photo's loss weights over its latent grid (None: no face known, the plain loss)."""
    return [None if image.face is None else
            loss_weights(face_region(image.face, crop_pixel_size(image), size), tuple(stats.mean.shape[-2:]),
                         background)
            for image, size, stats in zip(images, sizes, latents)]


# The normalisation that leaves values as they are: weights are laid out as latents are, not shifted or scaled.
UNCHANGED = (0.0, 1.0)


def batch_weights(family, maps: list[torch.Tensor | None], latent_shape: torch.Size) -> torch.Tensor:
    """A batch's weights in the denoiser's input layout, packed or patchified as its latents are: each example's
    map over all its latent channels (None: 1 everywhere). `latent_shape`: one example's latents, (C, h, w)."""
    channels, height, width = latent_shape
    stacked = torch.stack([(torch.ones(height, width) if weights is None else weights).expand(channels, height, width)
                           for weights in maps])
    return family.model_input(stacked, UNCHANGED)[0]
