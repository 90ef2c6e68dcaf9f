"""`lookalike resize`: a LoRA at a lower rank whose every layer changes its weight by the best approximation of the
original change at that rank (checked against the SVD of the whole change, with diffusers loading and fusing both
files), with what it keeps reported; refused for a rank that does not lower it and for adapters that are no
low-rank product."""

from __future__ import annotations

import pytest
import torch

from lookalike.errors import LookalikeError
from lookalike.models.lora import read_lora
from lookalike.models.merge import merge_loras
from lookalike.models.resize import kept_share, resize_lora
from tests.conftest import run_in_process
from tests.helpers import fused_weights, random_lora


def best_approximation(change: torch.Tensor, rank: int) -> tuple[torch.Tensor, float]:
    """The best rank-`rank` approximation of a whole weight change (its SVD, truncated), and the share of its
    squared Frobenius norm that keeps."""
    u, s, vh = torch.linalg.svd(change.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank], (s[:rank].square().sum() / s.square().sum()).item()


def test_each_layer_changes_by_the_truncated_svd_of_its_change_and_the_kept_share_is_reported(tmp_path):
    """A merge of two LoRAs (rank 4 + 2, alphas 8 and 1) lowered to rank 3: kohya's svd merge in two steps."""
    first = random_lora(tmp_path / "a.safetensors", rank=4, alpha=8, target="attention", seed=1)
    second = random_lora(tmp_path / "b.safetensors", rank=2, alpha=1, target="attention+mlp", seed=2)
    merged = merge_loras(first, second, tmp_path / "merged.safetensors", weights=(0.7, 1.3))
    resized, norms = resize_lora(merged, tmp_path / "r3.safetensors", 3)

    tensors, config, info = read_lora(resized)
    assert (config["r"], config["lora_alpha"], info["rank"], info["alpha"]) == (3, 3, "3", "3")
    assert info["resized_from"] == "merged.safetensors (rank 6)"
    assert all(t.shape[0] == 3 for k, t in tensors.items() if ".lora_A." in k)

    base, with_merged, with_resized = (fused_weights(f) for f in (None, merged, resized))
    compared = 0
    for key, weight in base.items():
        change = with_merged[key] - weight
        if change.abs().max() == 0:
            continue
        expected, share = best_approximation(change, 3)
        torch.testing.assert_close(with_resized[key] - weight, expected.float(), rtol=1e-4, atol=1e-6)
        layer = "transformer." + key.removesuffix(".weight")
        kept, whole = norms[layer]
        assert kept / whole == pytest.approx(share, rel=1e-4)
        compared += 1
    assert compared >= 10 and compared == len(norms)
    share, worst_share, worst = kept_share(norms)
    assert worst_share == min(kept / whole for kept, whole in norms.values()) and worst_share <= share < 1


def test_a_rank_that_does_not_lower_it_or_an_adapter_of_no_low_rank_product_is_refused(tmp_path):
    lora = random_lora(tmp_path / "a.safetensors", rank=4, alpha=4, target="attention", seed=1)
    with pytest.raises(LookalikeError, match="--rank: .*a.safetensors has rank 4; resize lowers it"):
        resize_lora(lora, tmp_path / "r.safetensors", 4)
    assert not (tmp_path / "r.safetensors").exists()


@pytest.mark.slow
def test_resize_from_the_command_line_takes_a_runs_best_step_and_says_what_it_keeps(tiny_config, tmp_path):
    path = tiny_config(train={"max_train_steps": 4, "learning_rate": 1e-2, "rank": 4, "sample_every": 2,
                              "sample_steps": 2})
    assert run_in_process("train", str(path)).returncode == 0
    out = tmp_path / "small.safetensors"
    result = run_in_process("resize", "default@best", "--config", str(path), "--rank", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"resize: {out} (rank 2): it keeps " in " ".join(result.stdout.split())
    assert read_lora(out)[1]["r"] == 2


def test_merge_at_a_lower_rank_is_the_exact_merge_resized_and_never_writes_over_an_input(tmp_path):
    """kohya's SVD merge in one command: `merge A B --rank N`."""
    from safetensors.torch import load_file

    first = random_lora(tmp_path / "a.safetensors", rank=4, alpha=8, target="attention", seed=1)
    second = random_lora(tmp_path / "b.safetensors", rank=2, alpha=1, target="attention", seed=2)
    out = tmp_path / "pair" / "ab.safetensors"
    result = run_in_process("merge", str(first), str(second), "--out", str(out), "--weights", "0.7,1.3",
                            "--rank", "3")
    assert result.returncode == 0, result.stderr
    assert f"merge: {out} (rank 3): it keeps " in " ".join(result.stdout.split())
    exact = merge_loras(first, second, tmp_path / "exact.safetensors", weights=(0.7, 1.3))
    expected, _ = resize_lora(exact, tmp_path / "expected.safetensors", 3)
    got, want = load_file(out), load_file(expected)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert [p.name for p in out.parent.iterdir()] == ["ab.safetensors"], "the exact merge was a temporary file"
    info = read_lora(out)[2]
    assert info["resized_from"] == "the exact merge (rank 6)"
    assert info["merged_from"] == "a.safetensors x 0.7 + b.safetensors x 1.3"

    before = first.read_bytes()
    refused = run_in_process("merge", str(first), str(second), "--out", str(first), "--rank", "3")
    assert refused.returncode == 2 and "is a LoRA being read" in refused.stderr
    assert first.read_bytes() == before
    too_high = run_in_process("merge", str(first), str(second), "--out", str(tmp_path / "c.safetensors"), "--rank", "6")
    assert too_high.returncode == 2 and "--rank: the merge of" in too_high.stderr and "has rank 6" in too_high.stderr
