"""VitalsMonitor: ldmkit's vital signs and diagnosis inside someone else's training loop."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldmkit import VitalsMonitor, normalize_timesteps
from ldmkit.vitals import metrics as vm
from ldmkit.vitals.logs.metrics_jsonl import read_metrics
from ldmkit.vitals.offline import diagnose_log
from ldmkit.vitals.signs import TRAIN_TAGS

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "diffusers_loop.py"


def feed(monitor: VitalsMonitor, steps: int, z_std: float, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        z = torch.randn(32, 4, 8, 8, generator=gen) * z_std
        eps = torch.randn(z.shape, generator=gen)
        eps_pred = 0.8 * eps + 0.3 * torch.randn(z.shape, generator=gen)  # a model that learned
        loss = (eps_pred - eps).pow(2).mean()
        t = torch.randint(0, 1000, (32,), generator=gen)
        monitor.observe_train_step(step, loss, eps_pred, eps, normalize_timesteps(t, 1000), z,
                                   grad_norm=torch.tensor(0.8), lr=1e-4)


def test_a_wrong_scale_in_a_foreign_loop_is_diagnosed_live(tmp_path):
    lines: list[str] = []
    with VitalsMonitor(tmp_path, latent_scale_factor=0.18215, log_every=10, echo=lines.append,
                       tensorboard=False) as monitor:
        feed(monitor, 60, z_std=0.15)
        assert [f.code for f in monitor.findings] == ["z_std_low"]
        assert monitor.scenario() == "scale_factor_bug"
    assert any("z_std_low" in line and "latent_scale_factor" in line for line in lines)
    events = [json.loads(x) for x in (tmp_path / "findings.jsonl").read_text().splitlines()]
    assert events[0]["code"] == "z_std_low" and events[0]["step"] <= 30
    tags = {r["tag"] for r in read_metrics(tmp_path / "metrics.jsonl")}
    assert {vm.LOSS, vm.GRAD_NORM, vm.LEARNING_RATE, vm.T_MEAN, vm.COS_EPS, vm.Z_STD} <= tags
    assert diagnose_log(tmp_path).scenario == "scale_factor_bug"


def test_a_healthy_foreign_loop_raises_nothing_and_logs_interval_means(tmp_path):
    with VitalsMonitor(tmp_path, log_every=10, echo=lambda _: None, tensorboard=False) as monitor:
        feed(monitor, 60, z_std=1.0)
        samples = monitor.observe_samples(60, torch.randn(16, 4, 8, 8))
        assert monitor.findings == []
    assert samples[vm.PAIRWISE_PREFIX + "mean"] == pytest.approx(2 * 16 / 15, rel=0.1)
    t_means = [r["value"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["tag"] == vm.T_MEAN]
    assert len(t_means) == 6 and all(0.4 < v < 0.6 for v in t_means)


def test_raw_integer_timesteps_are_named_not_diagnosed_as_a_biased_sampler(tmp_path):
    """A loop handing diffusers' integer timesteps (0-999) instead of t in [0, 1] would read as
    t_mean_biased with a fix for ldmkit's config; it is told what to call instead."""
    with VitalsMonitor(tmp_path, log_every=10, tensorboard=False) as monitor:
        z = torch.randn(8, 4, 4, 4)
        with pytest.raises(ValueError, match=r"0 to 999.*normalize_timesteps\(timesteps"):
            monitor.observe_train_step(1, torch.tensor(1.0), z, z, torch.tensor([0, 999] * 4), z)
        assert not monitor.findings


def test_unknown_threshold_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown threshold 'z_std_lo'"):
        VitalsMonitor(tmp_path, thresholds={"z_std_lo": 0.3})


def test_a_monitor_on_a_directory_another_writer_holds_is_refused(tmp_path):
    """While `ldmkit train` holds a run's lock, a monitor opened on it would write into the
    same metrics.jsonl: it is refused in one line, as a second CLI writer is."""
    from ldmkit.errors import LdmkitError
    from ldmkit.run.layout import RunLock

    lock = RunLock(tmp_path).acquire()
    try:
        with pytest.raises(LdmkitError, match=r"is in use by another ldmkit process \(PID"):
            VitalsMonitor(tmp_path, tensorboard=False)
        assert not (tmp_path / "metrics.jsonl").exists()
    finally:
        lock.release()
    with VitalsMonitor(tmp_path, tensorboard=False) as first:
        with pytest.raises(LdmkitError, match="in use"):
            VitalsMonitor(tmp_path, tensorboard=False)
        feed(first, 10, z_std=1.0)
    VitalsMonitor(tmp_path, tensorboard=False).close()  # released on close


@pytest.mark.slow
def test_the_diffusers_example_runs_and_its_log_is_diagnosable(tmp_path):
    out = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "50", "--batch-size", "32",
                          "--log-every", "10", "--sample-every", "20",
                          "--log-dir", str(tmp_path / "log")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "scenario:" in out.stdout
    tags = {r["tag"] for r in read_metrics(tmp_path / "log" / "metrics.jsonl")}
    assert set(TRAIN_TAGS) <= tags and vm.PAIRWISE_PREFIX + "mean" in tags
    assert diagnose_log(tmp_path / "log").scenario == "healthy"  # 5 records: judged
