import itertools

import pytest
import torch

from ldmkit.vitals import metrics as vm
from ldmkit.vitals.signs import StepAccumulator


def brute_force_pairwise(x: torch.Tensor) -> list[float]:
    flat = x.flatten(1).double()
    return [(flat[i] - flat[j]).pow(2).mean().item()
            for i, j in itertools.combinations(range(len(flat)), 2)]


def test_pairwise_mse_of_identical_latents_is_zero():
    z = torch.randn(1, 4, 8, 8).repeat(10, 1, 1, 1) * 3 + 5
    stats = vm.pairwise_mse_stats(z)
    for key in ("mean", "std", "min", "max"):
        assert stats[vm.PAIRWISE_PREFIX + key] == pytest.approx(0.0, abs=1e-9)


def test_pairwise_mse_matches_hand_computation():
    # Three 2-element samples; per-pair MSE (mean over elements): ab=1, ac=4, bc=1.
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])
    stats = vm.pairwise_mse_stats(x)
    assert stats[vm.PAIRWISE_PREFIX + "mean"] == pytest.approx(2.0)
    assert stats[vm.PAIRWISE_PREFIX + "min"] == pytest.approx(1.0)
    assert stats[vm.PAIRWISE_PREFIX + "max"] == pytest.approx(4.0)
    assert stats[vm.PAIRWISE_PREFIX + "std"] == pytest.approx(torch.tensor([1.0, 4.0, 1.0]).std(
        unbiased=False).item())


@pytest.mark.parametrize("chunk", [1, 3, 7, 256])
def test_pairwise_mse_chunked_equals_brute_force(chunk):
    x = torch.randn(23, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    values = torch.tensor(brute_force_pairwise(x), dtype=torch.float64)
    stats = vm.pairwise_mse_stats(x, chunk=chunk)
    assert stats[vm.PAIRWISE_PREFIX + "mean"] == pytest.approx(values.mean().item(), rel=1e-9)
    assert stats[vm.PAIRWISE_PREFIX + "std"] == pytest.approx(values.std(unbiased=False).item(),
                                                              rel=1e-6)
    assert stats[vm.PAIRWISE_PREFIX + "min"] == pytest.approx(values.min().item(), rel=1e-9)
    assert stats[vm.PAIRWISE_PREFIX + "max"] == pytest.approx(values.max().item(), rel=1e-9)


def test_pairwise_mse_of_independent_unit_gaussians_is_about_two():
    x = torch.randn(200, 256, generator=torch.Generator().manual_seed(1))
    assert vm.pairwise_mse_stats(x)[vm.PAIRWISE_PREFIX + "mean"] == pytest.approx(2.0, rel=0.02)


def test_pairwise_needs_two_samples():
    with pytest.raises(ValueError):
        vm.pairwise_mse_stats(torch.zeros(1, 3))


def test_cos_eps_is_one_with_itself_minus_one_with_negation_zero_when_orthogonal():
    eps = torch.randn(16, 4, 8, 8)
    assert vm.cos_eps_mean(eps, eps).item() == pytest.approx(1.0, abs=1e-6)
    assert vm.cos_eps_mean(-eps, eps).item() == pytest.approx(-1.0, abs=1e-6)
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[0.0, 3.0], [0.0, 1.0]])
    assert vm.cos_eps_mean(a, b).item() == pytest.approx(0.5)  # cosines 0 and 1


def test_z_std_of_scaled_latents():
    raw = torch.tensor([1.0, 3.0, 5.0, 7.0])  # sample std sqrt(20/3)
    scale = 0.5
    assert vm.latent_std(scale * raw).item() == pytest.approx(scale * (20 / 3) ** 0.5)


def test_final_latent_stats():
    z = torch.tensor([[-4.0, 0.0], [2.0, 6.0]])
    stats = vm.final_latent_stats(z)
    assert stats[vm.FINAL_PREFIX + "mean"] == pytest.approx(1.0)
    assert stats[vm.FINAL_PREFIX + "std"] == pytest.approx(z.std().item())
    assert stats[vm.FINAL_PREFIX + "min"] == -4.0
    assert stats[vm.FINAL_PREFIX + "max"] == 6.0


def test_accumulator_gives_interval_means_and_resets():
    acc = StepAccumulator()
    acc.add({"a": torch.tensor(1.0)})
    acc.add({"a": torch.tensor(3.0)})
    assert acc.read() == {"a": 2.0}
    assert acc.read() == {}
