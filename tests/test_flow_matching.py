import math

import pytest
import torch

from lookalike.train.batches import BatchOrder
from lookalike.train.checkpoint import list_checkpoints, save_checkpoint
from lookalike.train.flow_matching import noisy_latents, sample_sigmas, shift_sigmas, velocity_target


def test_sigmas_lie_in_the_unit_interval_and_shift_moves_them_up():
    for sampling in ("uniform", "logit_normal"):
        plain = sample_sigmas(10_000, sampling, torch.Generator().manual_seed(0))
        shifted = sample_sigmas(10_000, sampling, torch.Generator().manual_seed(0), shift=3.0)
        assert 0 < plain.min() and plain.max() <= 1
        assert torch.all(shifted >= plain) and shifted.mean() > plain.mean() + 0.1
    uniform = sample_sigmas(100_000, "uniform", torch.Generator().manual_seed(0))
    assert abs(uniform.mean().item() - 0.5) < 0.01
    # u = sigmoid(N(1, 1)) indexes the levels noisiest first, as the reference scripts do: sigma is about 1 - u.
    logit = sample_sigmas(100_000, "logit_normal", torch.Generator().manual_seed(0), logit_mean=1.0)
    assert abs(torch.logit(logit.clamp(max=0.9995)).mean().item() + 1.0) < 0.02


def test_mode_sampling_has_the_sd3_papers_quantiles():
    """u = f(U) = 1 - U - s (cos²(pi U / 2) - 1 + U) falls as U rises, so the q-quantile of u is f(1 - q); the level
    it picks, noisiest first, is about 1 - u, whose q-quantile is 1 - f(q)."""
    def f(u: float, s: float) -> float:
        return 1 - u - s * (math.cos(math.pi * u / 2) ** 2 - 1 + u)

    for scale in (1.29, 0.0, -0.5):
        sigmas = sample_sigmas(200_000, "mode", torch.Generator().manual_seed(0), mode_scale=scale)
        assert 0 <= sigmas.min() and sigmas.max() <= 1
        for q in (0.1, 0.25, 0.5, 0.75, 0.9):
            assert torch.quantile(sigmas, q).item() == pytest.approx(1 - f(q, scale), abs=5e-3), (scale, q)
    middle = sample_sigmas(100_000, "mode", torch.Generator().manual_seed(0), mode_scale=1.29)
    assert ((middle > 0.25) & (middle < 0.75)).float().mean() > 0.6, "heavier in the middle than uniform's 0.5"


@pytest.mark.parametrize("scheme, weight", [
    ("sigma_sqrt", lambda sigma: sigma ** -2),
    ("cosmap", lambda sigma: 2 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2))),
])
def test_loss_weighting_scales_each_examples_loss_by_its_noise_level(scheme, weight):
    from lookalike.config import TrainConfig
    from lookalike.train.objectives import FlowMatching

    generator = torch.Generator().manual_seed(0)
    prediction, x0, noise = (torch.randn(3, 4, 6, generator=generator) for _ in range(3))
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    errors = ((prediction - (noise - x0)) ** 2).mean(dim=(1, 2))
    expected = torch.stack([errors[i] * weight(sigmas[i].item()) for i in range(3)]).mean()
    ours = FlowMatching().loss(prediction, x0, noise, sigmas, TrainConfig(loss_weighting=scheme))
    torch.testing.assert_close(ours, expected)


def test_the_preconditioned_loss_is_the_velocity_loss_weighted_by_sigma_squared():
    """SD3's objective (its script's --precondition_outputs): x_t - sigma v against x0 differs from the velocity
    target by sigma (v* - v), so each example's loss is its velocity error times sigma², with and without a
    loss weighting; sigma_sqrt's sigma^-2 then cancels it."""
    from lookalike.config import TrainConfig
    from lookalike.train.objectives import FlowMatching

    generator = torch.Generator().manual_seed(0)
    prediction, x0, noise = (torch.randn(3, 4, 6, generator=generator) for _ in range(3))
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    errors = ((prediction - (noise - x0)) ** 2).mean(dim=(1, 2))
    preconditioned = FlowMatching(preconditioned=True)
    torch.testing.assert_close(preconditioned.loss(prediction, x0, noise, sigmas, TrainConfig()),
                               (errors * sigmas ** 2).mean())
    weighted = TrainConfig(loss_weighting="sigma_sqrt")
    torch.testing.assert_close(preconditioned.loss(prediction, x0, noise, sigmas, weighted), errors.mean())


def test_shift_matches_the_flux_schedulers_own_sigmas():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # shifts its sigmas as it starts
    unshifted = torch.linspace(1, 1000, 1000).flip(0) / 1000
    torch.testing.assert_close(shift_sigmas(unshifted, 3.0), scheduler.sigmas)
    # The reference scripts' draw: u uniform, the scheduler's level at index u x 1000.
    ours = sample_sigmas(3, "uniform", torch.Generator().manual_seed(0), shift=3.0)
    u = torch.rand(3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours, scheduler.sigmas[(u * 1000).long()])


def test_velocity_moves_from_data_to_noise():
    x0, noise = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    sigmas = torch.tensor([0.2, 0.7])
    xt = noisy_latents(x0, noise, sigmas)
    # Following the velocity for the remaining (1 - sigma) reaches pure noise.
    torch.testing.assert_close(xt + (1 - sigmas.view(-1, 1, 1)) * velocity_target(x0, noise), noise)


def test_batch_order_visits_every_example_each_epoch_and_restores():
    order = BatchOrder(size=5, batch_size=2)
    generator = torch.Generator().manual_seed(0)
    first_epoch = order.next(generator) + order.next(generator) + order.next(generator)[:1]
    assert sorted(first_epoch) == [0, 1, 2, 3, 4]
    state, generator_state = order.state_dict(), generator.get_state()
    expected = [order.next(generator) for _ in range(4)]
    restored = BatchOrder(size=5, batch_size=2)
    restored.load_state_dict(state)
    generator.set_state(generator_state)
    assert [restored.next(generator) for _ in range(4)] == expected


def test_checkpoints_keep_the_newest_and_ignore_unfinished(tmp_path):
    lora = {"transformer.a.lora_A.weight": torch.ones(2, 2)}
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, lora, {"step": step}, keep=2)
    (tmp_path / ".step-000040.abc.tmp").mkdir()  # what a kill in the middle of a save leaves
    (tmp_path / "step-000050").mkdir()  # a folder without its files
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000020", "step-000030"]
