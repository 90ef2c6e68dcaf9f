"""CLIP Score against torchmetrics' implementation, on the same tiny random CLIPModel built offline."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from lookalike.evaluate.clip_score import ClipScorer
from lookalike.models.clip import load_clip

TEXTS = ["a photo of a man", "a man with a beard and a white shirt.", "a man holding a trophy",
         "portrait of a man in studio lighting"]


class PooledOutputs(torch.nn.Module):
    """torchmetrics expects get_*_features to return tensors; transformers 5 returns output objects."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        return self.model.get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs):
        return self.model.get_text_features(*args, **kwargs).pooler_output


@pytest.fixture(scope="module")
def clip():
    return load_clip("tiny")


def images(count=4):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)) for _ in range(count)]


def test_clip_score_equals_torchmetrics_divided_by_100(clip):
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update, clip_score

    model, processor = clip
    pictures = images()
    ours = ClipScorer(model, processor, device=torch.device("cpu"), batch_size=3).paired(pictures, TEXTS)
    tensors = [torch.from_numpy(np.array(p)).permute(2, 0, 1) for p in pictures]
    theirs, count = _clip_score_update(tensors, TEXTS, PooledOutputs(model), processor)
    assert count == 4
    np.testing.assert_allclose(np.array(ours), theirs.detach().numpy() / 100, rtol=1e-5, atol=1e-6)

    # The public function averages and clamps at 0, and this random model's similarities are all negative:
    # mirror its text projection (a different, equally valid model) so that every similarity is positive.
    mirrored = copy.deepcopy(model)
    with torch.no_grad():
        mirrored.text_projection.weight.neg_()
    expected = ClipScorer(mirrored, processor, device=torch.device("cpu")).paired(pictures, TEXTS)
    np.testing.assert_allclose(expected, -np.array(ours), rtol=1e-5, atol=1e-6)
    assert min(expected) > 0
    mean = clip_score(tensors, TEXTS, model_name_or_path=lambda: (PooledOutputs(mirrored), processor))
    assert float(mean.detach()) / 100 == pytest.approx(np.mean(expected), rel=1e-5)


def test_all_pairs_contains_the_paired_scores(clip):
    scorer = ClipScorer(*clip, device=torch.device("cpu"))
    pictures = images()
    matrix = scorer.all_pairs(pictures, TEXTS)
    assert matrix.shape == (4, 4)
    np.testing.assert_allclose(matrix.diagonal().numpy(), scorer.paired(pictures, TEXTS), rtol=1e-5, atol=1e-6)


def test_unknown_clip_model_offline_is_a_clear_error(monkeypatch):
    """Offline as HF_HUB_OFFLINE=1 makes it: without it, this machine's blocked network takes ~45 s to fail."""
    import huggingface_hub.constants

    from lookalike.errors import LookalikeError

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(LookalikeError, match="evaluate.clip_model: cannot load 'no-such/clip-model'"):
        load_clip("no-such/clip-model")
