"""``ldmkit.integrations.accelerate`` in a real, tiny diffusers + accelerate training loop on CPU."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("accelerate")
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import ProjectConfiguration  # noqa: E402
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from ldmkit.integrations.accelerate import AccelerateVitals  # noqa: E402
from ldmkit.vitals import metrics as vm  # noqa: E402
from ldmkit.vitals.logs.readers import read_log  # noqa: E402
from ldmkit.vitals.offline import diagnose_log  # noqa: E402


class _Main:
    is_main_process = True
    logging_dir = None

    def __init__(self) -> None:
        self.logged: list[tuple[int, dict]] = []

    def log(self, values: dict, step: int) -> None:
        self.logged.append((step, values))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_a_perfect_prediction_implies_the_true_noise(tmp_path, prediction_type):
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    vitals = AccelerateVitals(_Main(), scheduler, log_dir=tmp_path)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(8, 4, 6, 6, generator=gen), torch.randn(8, 4, 6, 6, generator=gen)
    timesteps = torch.randint(0, 1000, (8,), generator=gen)
    x_t = scheduler.add_noise(x0, noise, timesteps)
    target = {"epsilon": noise, "v_prediction": scheduler.get_velocity(x0, noise, timesteps),
              "sample": x0}[prediction_type]
    eps, t = vitals.eps_estimate(target, timesteps, x_t)
    assert torch.allclose(eps, noise, atol=1e-3 if prediction_type == "sample" else 1e-5)
    assert torch.allclose(t, timesteps / 999)


def test_the_hook_takes_its_log_directory_as_the_cli_writers_do(tmp_path):
    from ldmkit.errors import LdmkitError
    from ldmkit.run.layout import RunLock

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    lock = RunLock(tmp_path).acquire()
    with pytest.raises(LdmkitError, match="is in use by another ldmkit process"):
        AccelerateVitals(_Main(), scheduler, log_dir=tmp_path)
    lock.release()
    vitals = AccelerateVitals(_Main(), scheduler, log_dir=tmp_path)
    with pytest.raises(LdmkitError, match="in use"):
        RunLock(tmp_path).acquire()
    vitals.close()
    RunLock(tmp_path).acquire().release()


def test_timesteps_outside_the_schedule_and_a_plain_config_are_handled(tmp_path):
    """Negative timesteps would index the schedule from its end; a scheduler whose config is a
    plain object (no .get) is read by attribute."""
    from types import SimpleNamespace

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    vitals = AccelerateVitals(_Main(), scheduler, log_dir=tmp_path)
    x = torch.randn(4, 2, 3, 3)
    with pytest.raises(ValueError, match="timesteps must be the scheduler's, 0 to 999; got -1"):
        vitals.eps_estimate(x, torch.tensor([-1, 5, 6, 7]), x)
    vitals.close()
    plain = SimpleNamespace(config=SimpleNamespace(prediction_type="epsilon",
                                                   num_train_timesteps=1000),
                            alphas_cumprod=scheduler.alphas_cumprod)
    other = AccelerateVitals(_Main(), plain, log_dir=tmp_path)
    eps, t = other.eps_estimate(x, torch.tensor([0, 5, 6, 999]), x)
    assert torch.equal(eps, x) and float(t.max()) == 1.0
    other.close()
    with pytest.raises(ValueError, match="has no .config"):
        AccelerateVitals(_Main(), object(), log_dir=tmp_path)


def test_flow_matching_needs_and_uses_the_sigmas(tmp_path):
    scheduler = FlowMatchEulerDiscreteScheduler()
    vitals = AccelerateVitals(_Main(), scheduler, log_dir=tmp_path)
    x0, noise, sigmas = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3), torch.rand(4)
    s = sigmas.view(-1, 1, 1, 1)
    eps, t = vitals.eps_estimate(noise - x0, sigmas * 1000, (1 - s) * x0 + s * noise, sigmas)
    assert torch.allclose(eps, noise, atol=1e-5) and torch.equal(t, sigmas)
    with pytest.raises(ValueError, match="sigmas"):
        vitals.eps_estimate(noise - x0, sigmas * 1000, (1 - s) * x0 + s * noise)


def digits_latents() -> torch.Tensor:
    x = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1
    return x / x.std()  # unit-variance stand-ins for latents, 1 x 8 x 8


def train(tmp_path, steps: int, latent_gain: float = 1.0, on_critical: str = "warn"):
    """diffusers' unconditional training loop, shrunk: UNet2DModel, DDPMScheduler (v), AdamW,
    accelerate with its TensorBoard tracker; the vitals hook is the only ldmkit code."""
    torch.manual_seed(0)
    accelerator = Accelerator(log_with="tensorboard", project_config=ProjectConfiguration(
        project_dir=str(tmp_path), logging_dir=str(tmp_path / "logs")))
    accelerator.init_trackers("train_unconditional", config={"ddpm_num_steps": 1000,
                                                             "prediction_type": "v_prediction"})
    model = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                        block_out_channels=(16, 32), norm_num_groups=8,
                        down_block_types=("DownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "UpBlock2D"))
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    data, lines = digits_latents() * latent_gain, []
    vitals = AccelerateVitals(accelerator, noise_scheduler, latent_scale_factor=1.0, log_every=10,
                              on_critical=on_critical, echo=lines.append)
    for step in range(1, steps + 1):
        latents = data[torch.randint(len(data), (32,))]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (32,))
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        model_output = model(noisy_latents, timesteps).sample
        loss = F.mse_loss(model_output, noise_scheduler.get_velocity(latents, noise, timesteps))
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        accelerator.log({"loss": loss.item(), "lr": 1e-3, "step": step}, step=step)
        vitals.observe(step, loss, model_output, noise, timesteps, latents,
                       noisy_latents=noisy_latents, grad_norm=grad_norm, lr=1e-3)
        if vitals.should_stop:
            break
    accelerator.end_training()
    return vitals, lines, step


@pytest.mark.slow
def test_a_diffusers_accelerate_loop_logs_the_vitals_through_its_tracker(tmp_path):
    vitals, lines, _ = train(tmp_path, steps=60)
    log = read_log(tmp_path / "logs")
    for tag in (vm.COS_EPS, vm.T_MEAN, vm.Z_STD, vm.GRAD_NORM, vm.LOSS, vm.LEARNING_RATE):
        assert [s for s, _ in log.series[tag]] == [10, 20, 30, 40, 50, 60], tag
    assert abs(log.series[vm.Z_STD][-1][1] - 1.0) < 0.1
    cos = [v for _, v in log.series[vm.COS_EPS]]
    assert 0 < cos[0] < cos[-1] <= 1  # v-prediction turned into a noise estimate that improves
    assert log.series[vm.SCALE_FACTOR] == [(0, 1.0)]
    diagnosis = diagnose_log(tmp_path / "logs")
    assert diagnosis.trainer == "diffusers train_unconditional.py"
    assert {m.tag for m in diagnosis.missing}.isdisjoint({vm.COS_EPS, vm.Z_STD, vm.T_MEAN})
    assert vitals.findings == [] and lines == []


@pytest.mark.slow
def test_squashed_latents_are_caught_live_and_stop_the_loop(tmp_path):
    vitals, lines, step = train(tmp_path, steps=60, latent_gain=0.1, on_critical="stop")
    # the window's median: a majority of the first records, so the third log interval
    assert step == 30 and vitals.should_stop
    assert [f.code for f in vitals.findings] == ["z_std_low"]
    assert len(lines) == 1 and "z_std_low" in lines[0]
    events = [json.loads(x) for x in (tmp_path / "logs" / "findings.jsonl").read_text()
              .splitlines()]
    assert [e["code"] for e in events] == ["z_std_low"]
