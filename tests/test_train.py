"""Training behaviour on tiny configs: learning, resume equality, checkpoints, CLI."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import copy_run, tiny_config
from safetensors.torch import load_file

from ldmkit.cli import main
from ldmkit.diffusion.parameterization import Parameterization
from ldmkit.errors import ConfigError
from ldmkit.models.unet import UNet
from ldmkit.run.layout import RunDir
from ldmkit.training.loop import train, train_step
from ldmkit.vitals import metrics as vm
from ldmkit.vitals.logs.metrics_jsonl import read_metrics
from ldmkit.vitals.signs import TRAIN_TAGS, StepAccumulator


def test_training_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = UNet(4, 4, 16, [1, 2], 1, [2])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(16, 4, 4, 4, generator=gen) * 0.3 + torch.linspace(-1, 1, 4).view(1, 4, 1, 1)
    t = torch.rand(16, generator=gen)
    eps = torch.randn(16, 4, 4, 4, generator=gen)
    params = list(model.parameters())
    losses = [train_step(model, params, opt, Parameterization(), z, t, eps, 1.0)[1][vm.LOSS].item()
              for _ in range(30)]
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("objective, schedule, weighting", [
    ("v", "cosine", "none"), ("x0", "cosine", "min_snr"), ("flow", "linear", "none"),
    ("eps", "cosine", "min_snr")])
def test_every_objective_trains_and_samples_end_to_end(tmp_path, objective, schedule,
                                                       weighting):
    cfg = tiny_config(diffusion={"objective": objective, "schedule": schedule,
                                 "loss_weighting": weighting},
                      train={"steps": 40, "sample_every": 100, "val_every": 20},
                      sample={"sampler": "heun" if objective == "flow" else "dpmpp_2m"})
    result = train(cfg, tmp_path / "run")
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    first, last = (next(r["value"] for r in order if r["tag"] == vm.VAL_LOSS)
                   for order in (records, reversed(records)))
    assert last < 0.9 * first  # the objective's own validation loss falls
    cos = [r["value"] for r in records if r["tag"] == vm.COS_EPS]
    assert cos[-1] > 0.3  # the noise estimate, whatever the network predicts
    eps_mse = [r["value"] for r in records if r["tag"] == vm.EPS_MSE]
    assert (objective == "eps") == (not eps_mse)  # the guide's loss beside another objective's
    assert result.grid is not None and all(math.isfinite(v) for v in result.vitals.values())


def test_nonfinite_step_is_not_applied():
    model = UNet(4, 4, 16, [1, 2], 1, [2])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    z = torch.full((2, 4, 4, 4), float("nan"))
    applied, vitals = train_step(model, list(model.parameters()), opt, Parameterization(), z, torch.rand(2),
                                 torch.randn(2, 4, 4, 4), 1.0)
    assert not applied and not torch.isfinite(vitals[vm.LOSS])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_resume_gives_the_same_weights_as_a_straight_run(tmp_path, tiny_run):
    straight = tiny_run  # tiny_config() trained without a stop
    train(tiny_config(), tmp_path / "split", stop_at=8)
    resumed = train(RunDir(tmp_path / "split").load_config(), tmp_path / "split", resume=True)
    assert straight.step == resumed.step == 12
    a = load_file(str(straight.run_dir / "checkpoints/step_0000012/weights.safetensors"))
    b = load_file(str(tmp_path / "split/checkpoints/step_0000012/weights.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    logged = {(r["step"], r["tag"]): r["value"] for r in read_metrics(straight.run_dir / "metrics.jsonl")}
    for r in read_metrics(tmp_path / "split/metrics.jsonl"):
        if r["step"] > 8 and r["tag"].startswith(("loss/", "diffusion/", "optimization/")):
            assert r["value"] == logged[(r["step"], r["tag"])]


def test_run_logs_every_vital_sign_and_writes_checkpoints_without_pickles(tiny_run):
    result = tiny_run
    run_dir = result.run_dir
    records = read_metrics(run_dir / "metrics.jsonl")
    tags = {r["tag"] for r in records}
    assert set(TRAIN_TAGS) <= tags
    for suffix in ("mean", "std", "min", "max"):
        assert vm.PAIRWISE_PREFIX + suffix in tags and vm.FINAL_PREFIX + suffix in tags
    assert {"vae/recon_mse", "vae/kl", "vae/psnr", vm.SCALE_FACTOR} <= tags
    assert sorted({r["step"] for r in records if r["tag"] == vm.LOSS}) == [4, 8, 12]
    # the z_std logged is that of the scaled latents: calibration makes it ~1
    z_std = [r["value"] for r in records if r["tag"] == vm.Z_STD]
    assert all(0.8 < v < 1.2 for v in z_std)
    lrs = {r["step"]: r["value"] for r in records if r["tag"] == vm.LEARNING_RATE}
    assert lrs[4] > lrs[12]  # cosine decay after warmup
    ckpt = run_dir / "checkpoints" / "step_0000012"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["latent_scale_factor"] == pytest.approx(result.latent_scale_factor)
    assert meta["config"]["diffusion"]["latent_scale_factor"] == pytest.approx(
        result.latent_scale_factor)
    assert not list(run_dir.rglob("*.pt")) and not list(run_dir.rglob("*.pkl"))
    assert len(list((run_dir / "samples" / "final").glob("0*.png"))) == 8
    saved = RunDir(run_dir).load_config()
    assert saved.diffusion.latent_scale_factor == pytest.approx(result.latent_scale_factor)


def test_pretrained_autoencoder_is_reused(tmp_path, tiny_run):
    first = copy_run(tiny_run.run_dir, tmp_path / "a")
    cfg = tiny_config(autoencoder={"pretrained": str(first)}, train={"steps": 4})
    train(cfg, tmp_path / "b")
    tags = {r["tag"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")}
    assert "vae/recon_mse" not in tags  # stage 1 was not retrained
    # the run is self-contained: it samples after the pretrained source is gone
    shutil.rmtree(first)
    assert main(["sample", str(tmp_path / "b"), "--num", "4", "--steps", "3",
                 "--out", str(tmp_path / "s")]) == 0


def test_cli_run_then_sample_is_deterministic(tmp_path, capsys):
    cfg_path = tmp_path / "tiny.yaml"
    import yaml
    from conftest import TINY
    cfg_path.write_text(yaml.safe_dump(TINY))
    run_dir = tmp_path / "cli-run"
    assert main(["run", str(cfg_path), "--set", f"run_dir={run_dir}"]) == 0
    out = capsys.readouterr().out
    assert "samples:" in out and "report.md" in out
    assert (run_dir / "report.md").is_file() and (run_dir / "samples/final/grid.png").is_file()
    for out_name in ("s1", "s2"):
        assert main(["sample", str(run_dir), "--num", "6", "--steps", "5", "--seed", "3",
                     "--out", str(tmp_path / out_name)]) == 0
    assert (tmp_path / "s1" / "grid.png").read_bytes() == (tmp_path / "s2" / "grid.png").read_bytes()
    # the same command again continues the run (finished: nothing to train); another config
    # is refused rather than mixed into it
    assert main(["run", str(cfg_path), "--set", f"run_dir={run_dir}"]) == 0
    assert main(["run", str(cfg_path), "--set", f"run_dir={run_dir}", "--set", "train.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "train.lr: 0.001 there, 0.5 here" in err and "--resume" in err


@pytest.mark.parametrize("argv, needle", [
    (["run", "missing.yaml"], "config file 'missing.yaml' not found"),
    (["sample", "/nonexistent-run"], "'/nonexistent-run' is not an ldmkit run directory"),
    (["train", "--resume", "/nonexistent-run"], "not an ldmkit run directory"),
])
def test_cli_errors_are_one_line_with_exit_code_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("flags, needle", [
    (["--num", "100000000000"], "--num must be >= 2 and <= 50000"),
    (["--steps", "100000000000"], "--steps must be >= 1 and <= 10000"),
    (["--seed", "99999999999999999999999"], "--seed must be >= 0 and <= 4294967295"),
    (["--eta", "nan"], "--eta must be a finite number"),
    (["--guidance", "1e30"], "--guidance must be >= 0.0 and <= 1000.0"),
    (["--guidance", "4"], "--guidance needs a conditional model"),
])
def test_sampling_flags_are_bounded_as_the_config_keys_are(tiny_run, flags, needle, capsys):
    """What a user types is checked before anything is allocated or written, by the bounds of
    the sample.* key it stands for; a flag the model cannot use is refused, not ignored."""
    before = sorted(RunDir(tiny_run.run_dir).files())
    assert main(["sample", str(tiny_run.run_dir), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert main(["eval", str(tiny_run.run_dir), "--num", "100000000000"]) == 2
    assert "--num must be" in capsys.readouterr().err
    assert sorted(RunDir(tiny_run.run_dir).files()) == before


def test_a_setting_has_one_set_of_bounds_wherever_it_is_given():
    with pytest.raises(ConfigError, match="sample.guidance_scale' must be >= 0.0 and <= 1000.0"):
        tiny_config(sample={"guidance_scale": 1e30})
    with pytest.raises(ConfigError, match="'seed' must be >= 0"):
        tiny_config(seed=-1)


def test_cli_rejects_unknown_config_key(tmp_path, capsys):
    path = Path(tmp_path) / "c.yaml"
    path.write_text("train:\n  stepz: 3\n")
    assert main(["run", str(path)]) == 2
    assert "unknown config key 'train.stepz'" in capsys.readouterr().err


def test_bf16_autocast_and_channels_last_paths_train_on_cpu(tmp_path):
    """The GPU options run the same code path on CPU: finite vitals, loss still learning."""
    cfg = tiny_config(train={"steps": 8, "precision": "bf16", "channels_last": True})
    result = train(cfg, tmp_path / "run")
    assert result.step == 8
    assert 0.0 < result.vitals[vm.LOSS] < 1.5 and result.vitals[vm.GRAD_NORM] > 0
    used = [json.loads(line) for line in RunDir(result.run_dir).fastpath.read_text().splitlines()]
    assert {(r["job"], r["precision"]) for r in used} >= {("train", "bf16")}  # not ignored


def test_update_ratio_is_the_relative_size_of_the_applied_update():
    before = [torch.tensor([3.0, 4.0]), torch.zeros(2)]
    after = [torch.tensor([3.0, 4.0]) * 1.01, torch.zeros(2)]
    assert vm.update_ratio([b.clone() for b in before], after).item() == pytest.approx(0.01)
    model = UNet(4, 4, 16, [1, 2], 1, [2])
    params = list(model.parameters())
    scratch = [torch.empty_like(p) for p in params]
    opt = torch.optim.AdamW(params, lr=1e-3)
    old = torch.cat([p.detach().flatten().clone() for p in params])
    z = torch.randn(4, 4, 4, 4)
    _, vitals = train_step(model, params, opt, Parameterization(), z, torch.rand(4),
                           torch.randn_like(z), 1.0, scratch=scratch)
    new = torch.cat([p.detach().flatten() for p in params])
    expected = (new - old).norm() / old.norm()
    assert vitals[vm.UPDATE_RATIO].item() == pytest.approx(expected.item(), rel=1e-4)


def test_interval_median_survives_a_checkpoint_between_log_steps():
    acc = StepAccumulator()
    for value in (1e-3, 5.0, 2e-3):
        acc.add({vm.UPDATE_RATIO: torch.tensor(value), vm.LOSS: torch.tensor(value)})
    resumed = StepAccumulator()
    resumed.load(*acc.state())
    out = resumed.read()
    assert out[vm.UPDATE_RATIO] == pytest.approx(2e-3)  # one outlier does not move a median
    assert out[vm.LOSS] == pytest.approx((1e-3 + 5.0 + 2e-3) / 3)


@pytest.mark.slow
def test_no_update_is_raised_when_training_has_no_effect_and_not_otherwise(tmp_path, tiny_run):
    healthy = tiny_run
    assert "no_update" not in {f.code for f in healthy.findings}
    ratios = [r["value"] for r in read_metrics(healthy.run_dir / "metrics.jsonl")
              if r["tag"] == vm.UPDATE_RATIO]
    assert len(ratios) == 3 and all(1e-5 < r < 0.1 for r in ratios)
    frozen = train(tiny_config(train={"lr": 1e-30}), tmp_path / "frozen")
    (finding,) = [f for f in frozen.findings if f.code == "no_update"]
    assert finding.severity == "critical" and frozen.scenario == "not_learning"


@pytest.mark.slow
def test_gradient_accumulation_is_the_same_step_and_resumes_exactly(tmp_path):
    """batch_size is the step's batch; grad_accum_steps splits it into micro-batches, so the
    vitals and the update are those of the whole batch (to float summation order, so fp32:
    bf16 rounds each micro-batch's products differently)."""
    def weights(run):
        return load_file(str(sorted((run / "checkpoints").glob("step_*"))[-1]
                             / "weights.safetensors"))

    cfg = tiny_config(train={"steps": 12, "sample_every": 100, "precision": "fp32"})
    train(cfg, tmp_path / "one")
    accum = tiny_config(train={"steps": 12, "sample_every": 100, "grad_accum_steps": 4,
                               "precision": "fp32"})
    train(accum, tmp_path / "four")
    one, four = weights(tmp_path / "one"), weights(tmp_path / "four")
    assert all(torch.allclose(one[k], four[k], atol=1e-4) for k in one)
    losses = [[r["value"] for r in read_metrics(tmp_path / run / "metrics.jsonl")
               if r["tag"] == vm.LOSS] for run in ("one", "four")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)
    train(accum, tmp_path / "sliced", stop_at=6)
    train(accum, tmp_path / "sliced", resume=True)
    sliced = weights(tmp_path / "sliced")
    assert all(torch.equal(four[k], sliced[k]) for k in four)
    with pytest.raises(ConfigError, match="divisible by train.grad_accum_steps"):
        tiny_config(train={"grad_accum_steps": 3})
