import pytest
import torch

from ldmkit.diffusion.parameterization import Parameterization
from ldmkit.diffusion.registry import OBJECTIVES
from ldmkit.diffusion.samplers import SAMPLER_NAMES, eps_denoiser, run_sampler, sample_ddim
from ldmkit.diffusion.schedule import CosineSchedule, LinearSchedule, add_noise, sample_t

SCHED = CosineSchedule()


def test_schedule_endpoints_and_variance_preservation():
    t = torch.linspace(0, 1, 101)
    alpha, sigma = SCHED.alpha_sigma(t)
    assert torch.allclose(alpha**2 + sigma**2, torch.ones_like(t), atol=1e-6)
    assert SCHED.logsnr(torch.tensor([0.0, 1.0])).tolist() == pytest.approx([10.0, -5.0])
    assert alpha[0] ** 2 == pytest.approx(torch.sigmoid(torch.tensor(10.0)).item(), abs=1e-6)
    assert sigma[-1] ** 2 == pytest.approx(torch.sigmoid(torch.tensor(5.0)).item(), abs=1e-6)
    assert alpha[0] > 0.99 and sigma[0] < 0.01 and sigma[-1] > 0.99 and alpha[-1] < 0.1
    assert (alpha[1:] < alpha[:-1]).all()
    # symmetric limits put SNR = 1 exactly at t = 0.5, as in the unclipped cosine schedule
    mid = CosineSchedule(-10.0, 10.0).alpha_sigma(torch.tensor([0.5]))[0]
    assert mid.item() ** 2 == pytest.approx(0.5, abs=1e-6)


def test_uniform_t_averages_one_half_and_logit_normal_shifts_it():
    gen = torch.Generator().manual_seed(0)
    means = torch.stack([sample_t(64, "uniform", gen).mean() for _ in range(400)])
    assert means.mean().item() == pytest.approx(0.5, abs=0.01)
    assert means.min() > 0.3 and means.max() < 0.7  # fluctuates per batch, as the guide says
    shifted = sample_t(4096, "logit_normal", gen, loc=3.0, scale=1.0)
    assert shifted.mean().item() > 0.9


def test_loss_of_zero_predictor_is_one_and_of_oracle_is_zero():
    gen = torch.Generator().manual_seed(0)
    z0 = torch.randn(64, 4, 4, 4, generator=gen)
    eps = torch.randn(64, 4, 4, 4, generator=gen)
    t = torch.rand(64, generator=gen)
    eps_loss = Parameterization("eps", SCHED).loss
    zero = eps_loss(lambda x, t: torch.zeros_like(x), z0, t, eps)
    assert zero.loss.item() == pytest.approx(1.0, abs=0.05)
    oracle = eps_loss(lambda x, t: eps, z0, t, eps)
    assert oracle.loss.item() == 0.0


def gaussian_eps_model(mean: float, std: float, schedule: CosineSchedule = SCHED):
    """Exact noise predictor for data ~ N(mean, std^2) per element."""

    def eps_model(x, t):
        alpha, sigma = schedule.alpha_sigma(t)
        a, s = alpha.view(-1, 1), sigma.view(-1, 1)
        x0 = mean + a * std**2 / (a**2 * std**2 + s**2) * (x - a * mean)
        return (x - a * x0) / s

    return eps_model


@pytest.mark.parametrize("sampler, steps", [("ddim", 50), ("ddpm", 200), ("dpmpp_2m", 20)])
def test_samplers_recover_a_known_gaussian(sampler, steps):
    # An exact denoiser has no eps error, so a near-zero terminal SNR is safe and N(0, I) is
    # the true distribution at t = 1.
    wide = CosineSchedule(-20.0, 15.0)
    denoise = eps_denoiser(gaussian_eps_model(2.0, 0.5, wide), wide)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(4000, 2, generator=gen)
    x = run_sampler(sampler, denoise, noise, wide, steps, generator=gen)
    assert x.mean().item() == pytest.approx(2.0, abs=0.03)
    assert x.std().item() == pytest.approx(0.5, abs=0.03)


def test_ddim_is_deterministic_for_a_seed_and_calls_back_every_step():
    denoise = eps_denoiser(gaussian_eps_model(0.0, 1.0), SCHED)
    seen = []

    def draw(seed):
        noise = torch.randn(8, 3, generator=torch.Generator().manual_seed(seed))
        return sample_ddim(denoise, noise, SCHED, 10, callback=lambda i, *_: seen.append(i))

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))
    assert seen[:10] == list(range(10))


def test_add_noise_matches_definition():
    z0, eps, t = torch.ones(2, 3), torch.full((2, 3), 2.0), torch.tensor([0.0, 1.0])
    alpha, sigma = SCHED.alpha_sigma(t)
    expected = alpha[:, None] * z0 + sigma[:, None] * eps
    assert torch.allclose(add_noise(SCHED, z0, t, eps), expected)


MEANS = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]])
WEIGHTS = torch.tensor([0.5, 0.3, 0.2])
MODE_STD = 0.3


def mixture_denoiser(schedule: CosineSchedule):
    """Exact E[x0 | x_t] for a 2-D mixture of isotropic Gaussians (the answer is known)."""

    def denoise(x, t):
        alpha, sigma = schedule.alpha_sigma(t)
        a, s = alpha.view(-1, 1, 1), sigma.view(-1, 1, 1)
        var = a**2 * MODE_STD**2 + s**2  # [B, 1, 1] per mode, isotropic
        diff = x[:, None, :] - a * MEANS[None]  # [B, K, 2]
        logits = WEIGHTS.log()[None] - 0.5 * (diff**2).sum(-1) / var[..., 0]  # [B, K]
        post = torch.softmax(logits, dim=1)[..., None]
        x0_k = MEANS[None] + a * MODE_STD**2 / var * diff
        return (post * x0_k).sum(1)

    return denoise


def test_dpm_solver_pp_2m_beats_ddim_on_a_known_gaussian_mixture():
    wide = CosineSchedule(-20.0, 15.0)
    denoise = mixture_denoiser(wide)
    noise = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0))
    exact = run_sampler("ddim", denoise, noise, wide, 2000)  # the probability-flow ODE, converged
    err = {(name, k): (run_sampler(name, denoise, noise, wide, k) - exact).norm(dim=1).mean().item()
           for name in ("ddim", "dpmpp_2m") for k in (10, 20, 50)}
    # measured: DDIM 0.138 / 0.072 / 0.029, DPM-Solver++(2M) 0.086 / 0.021 / 0.005
    assert err[("dpmpp_2m", 10)] < 0.75 * err[("ddim", 10)]
    assert err[("dpmpp_2m", 20)] < 0.5 * err[("ddim", 20)]
    assert err[("dpmpp_2m", 20)] < err[("ddim", 50)]
    # and its 20-step samples have the mixture's weights and mode widths
    x = run_sampler("dpmpp_2m", denoise, noise, wide, 20)
    mode = torch.cdist(x, MEANS).argmin(1)
    shares = torch.bincount(mode, minlength=3).float() / len(x)
    assert torch.allclose(shares, WEIGHTS, atol=0.03)
    for k in range(3):
        assert (x[mode == k] - MEANS[k]).std().item() == pytest.approx(MODE_STD, rel=0.15)


def schedule_for(objective: str):
    """N(0, I) is the marginal at t = 1 to within 0.7 % (alpha(1) = 0.0067). Heun's trapezoid
    is unstable at much lower logsnr_min on a uniform t grid (sigma / alpha = 22026 at -20)."""
    return LinearSchedule() if objective == "flow" else CosineSchedule(-10.0, 15.0)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_objective_turns_its_target_into_the_true_x0_and_eps(objective):
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(64, 4, 4, 4, generator=gen), torch.randn(64, 4, 4, 4, generator=gen)
    t = torch.rand(64, generator=gen).clamp(0.02, 0.98)
    param = Parameterization(objective, schedule_for(objective))
    target = param.target(x0, eps, t)
    out = param.loss(lambda x, tt: target, x0, t, eps)  # an oracle network
    assert out.loss.item() == pytest.approx(0.0, abs=1e-10)
    alpha, sigma = (v.view(-1, 1, 1, 1) for v in param.schedule.alpha_sigma(t))
    pred = param.predict(lambda x, tt: target, alpha * x0 + sigma * eps, t)
    assert torch.allclose(pred.x0, x0, atol=1e-4) and torch.allclose(pred.eps, eps, atol=1e-4)
    assert torch.equal(out.eps_pred, pred.eps)


def test_min_snr_weights_count_each_sample_as_min_snr_gamma_in_x0_units():
    t = torch.tensor([0.05, 0.5, 0.95])
    for objective in OBJECTIVES:
        param = Parameterization(objective, schedule_for(objective), "min_snr", 5.0)
        snr = param.schedule.logsnr(t).exp()
        factor = {"eps": snr, "v": snr + 1, "x0": torch.ones(3), "flow": 1 / t.double() ** 2}
        expected = snr.clamp(max=5.0) / factor[objective]
        assert torch.allclose(param.weight(t).double(), expected.double(), rtol=1e-5)
    assert Parameterization().weight(t) is None  # none: the plain mean, today's loss


def gaussian_net(objective: str, mean: float, std: float):
    """The exact network of each objective for data ~ N(mean, std^2) per element."""
    param = Parameterization(objective, schedule_for(objective))

    def net(x, t):
        a, s = (v.view(-1, 1) for v in param.schedule.alpha_sigma(t))
        x0 = mean + a * std**2 / (a**2 * std**2 + s**2) * (x - a * mean)
        eps = (x - a * x0) / s
        return param.target(x0, eps, t)

    return param, net


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_every_sampler_recovers_a_known_gaussian_for_every_objective(objective, sampler):
    param, net = gaussian_net(objective, 2.0, 0.5)
    steps = {"ddpm": 200, "ddim": 50, "dpmpp_2m": 20, "euler": 50, "heun": 20}[sampler]
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(4000, 2, generator=gen)
    x = run_sampler(sampler, param.denoiser(net), noise, param.schedule, steps, generator=gen)
    assert torch.isfinite(x).all()
    assert x.mean().item() == pytest.approx(2.0, abs=0.03)
    assert x.std().item() == pytest.approx(0.5, abs=0.03)


def test_heun_is_second_order():
    """Halving the step size divides Heun's error by ~4 and Euler's by ~2 (Karras et al.)."""
    param, net = gaussian_net("eps", 2.0, 0.5)
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    exact = run_sampler("heun", param.denoiser(net), noise, param.schedule, 400)

    def error(name, steps):
        x = run_sampler(name, param.denoiser(net), noise, param.schedule, steps)
        return (x - exact).abs().mean().item()

    assert error("heun", 8) / error("heun", 16) > 3.0
    assert 1.5 < error("euler", 8) / error("euler", 16) < 3.0
