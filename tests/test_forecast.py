"""The divergence forecast (vitals/forecast.py) on synthetic series, and the one definition of
an abnormal step that the divergence guard and the rule ``grad_norm_exploding`` share."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
from conftest import tiny_config

from ldmkit.run.layout import RunDir
from ldmkit.training.loop import train
from ldmkit.vitals.context import Context
from ldmkit.vitals.diagnose import evaluate
from ldmkit.vitals.forecast import Forecaster, abnormal_step, exploding
from ldmkit.vitals.logs.metrics_jsonl import json_objects, read_metrics
from ldmkit.vitals.tags import (
    ATTN_LOGIT,
    DIVERGENCE_RISK,
    GRAD_NORM,
    LR_SCALE,
    NONFINITE_STEPS,
)


def test_an_abnormal_step_is_unapplied_or_past_the_limit_nan_included():
    assert not abnormal_step(True, 99.9, 100.0)
    assert abnormal_step(True, 100.1, 100.0) and abnormal_step(True, math.nan, 100.0)
    assert abnormal_step(False, 0.5, 100.0)
    assert exploding(math.inf, 100.0) and not exploding(100.0, 100.0)


def test_the_rule_judges_a_gradient_norm_as_the_guard_does():
    ctx = Context.of(None)
    for value, fires in ((100.0, False), (100.5, True), (250.0, True), (99.0, False)):
        series = {GRAD_NORM: [(step, value) for step in range(10, 60, 10)]}
        codes = {f.code for f in evaluate(series, ctx)}
        assert ("grad_norm_exploding" in codes) == fires == exploding(value, 100.0)


def _healthy(steps: int, seed: int) -> list[tuple[float, float, float | None]]:
    """A run that learns: the loss and gradient norm fall with noise and spikes, the update
    ratio of a well-set Adam (1e-3) measured every 6th step."""
    rng = random.Random(seed)
    rows = []
    for step in range(steps):
        decay = 0.3 + 0.7 * math.exp(-step / 80)
        spike = 4.0 if rng.random() < 0.02 else 1.0
        rows.append((decay * math.exp(rng.gauss(0, 0.25)),
                     0.5 * decay * spike * math.exp(rng.gauss(0, 0.4)),
                     1e-3 * math.exp(rng.gauss(0, 0.3)) if step % 6 == 0 else None))
    return rows


def _diverging(steps: int, start: int, rate: float) -> list[tuple[float, float, float | None]]:
    """Healthy until ``start``; then the gradient norm and the loss grow by ``rate`` a step
    while the updates reach a few percent of the weights (a learning rate too high)."""
    rows = _healthy(start, 1)
    g, loss = rows[-1][1], rows[-1][0]
    for i in range(steps - start):
        g, loss = g * math.exp(rate), loss * math.exp(rate / 2)
        rows.append((loss, g, 0.03 if i % 6 == 0 else None))
    return rows


def _first_warning(rows) -> int | None:
    forecaster = Forecaster()
    for step, (loss, g, ratio) in enumerate(rows, 1):
        if not exploding(g, forecaster.limit):
            forecaster.update(loss, g, ratio)
            if forecaster.warning_due():
                return step
    return None


def test_healthy_runs_are_never_warned():
    assert all(_first_warning(_healthy(600, seed)) is None for seed in range(20))


def test_a_divergence_is_warned_ahead_with_the_steps_it_will_take():
    rows = _diverging(400, 200, 0.1)
    reached = next(i for i, (_, g, _) in enumerate(rows, 1) if exploding(g, 100.0))
    warned = _first_warning(rows)
    assert warned is not None and reached - warned >= 10, (warned, reached)
    forecaster = Forecaster()
    for loss, g, ratio in rows[:warned]:
        forecast = forecaster.update(loss, g, ratio)
    assert forecast.risk >= forecaster.threshold
    assert forecast.steps_ahead is not None
    assert 0.3 < forecast.steps_ahead / (reached - warned) < 3


def test_a_forecaster_restored_from_its_state_forecasts_as_the_original():
    rows = _diverging(300, 150, 0.08)
    original, resumed = Forecaster(), Forecaster()
    for loss, g, ratio in rows[:170]:
        original.update(loss, g, ratio)
    resumed.load(original.state())
    for loss, g, ratio in rows[170:260]:
        a, b = original.update(loss, g, ratio), resumed.update(loss, g, ratio)
        assert a == b and original.warning_due() == resumed.warning_due()


# a learning rate that ramps to 5 over the run, no clipping: non-finite from step 14 when
# nothing intervenes (the guide's "learning rate too high"), every 4 steps logged
RAMP = {"steps": 32, "lr": 5.0, "warmup_steps": 40, "grad_clip": 1e9, "sample_every": 1000}


def _series(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    return [(r["step"], r["value"]) for r in read_metrics(RunDir(run_dir).metrics)
            if r.get("tag") == tag]


def _raised(run_dir: Path) -> list[dict]:
    path = RunDir(run_dir).findings  # none: nothing was ever raised
    return [e for e in json_objects(path) if e["event"] == "raised"] if path.is_file() else []


def test_a_learning_rate_ramp_is_warned_two_log_intervals_before_it_diverges(tmp_path):
    cfg = tiny_config(train=RAMP, vitals={"on_warning": "repair", "max_repairs": 0})
    result = train(cfg, tmp_path / "run")
    raised = _raised(tmp_path / "run")
    ahead = next(e for e in raised if e["code"] == "divergence_ahead")
    first_bad = min(e["step"] for e in raised if e["code"].startswith("nonfinite_"))
    assert first_bad - ahead["step"] >= 2 * cfg.train.log_every, (ahead, first_bad)
    assert ahead["remedy"]["changes"] == [{"key": "train.lr", "setting": "train.lr",
                                           "value": 0.001}] and "train.lr" in ahead["fix"]
    # vitals.max_repairs = 0: warned, never repaired
    assert not RunDir(tmp_path / "run").changes.exists() and result.scenario == "diverged"
    assert _series(tmp_path / "run", DIVERGENCE_RISK)[0][1] >= 0.5


def test_repair_lowers_the_learning_rate_before_any_step_is_lost(tmp_path):
    cfg = tiny_config(train=RAMP, vitals={"on_warning": "repair"})
    result = train(cfg, tmp_path / "run")
    run_dir = tmp_path / "run"
    assert _series(run_dir, NONFINITE_STEPS)[-1][1] == 0
    assert result.scenario == "healthy" and result.step == RAMP["steps"]
    (change,) = RunDir(run_dir).change_records()
    assert change["by"] == "vitals repair" and change["changes"] == {"train.lr": 0.001}
    assert change["restart"] == "latest" and change["at_step"] == 5
    assert _series(run_dir, LR_SCALE)[-1][1] == pytest.approx(0.001 / 5.0)
    assert _series(run_dir, DIVERGENCE_RISK)[-1][1] < 0.1


def test_the_run_the_suite_shares_logs_its_risk_and_attention_and_is_never_warned(tiny_run):
    """(Every longer healthy run of the suite is checked for any warning, this one included:
    test_faults.assert_healthy.)"""
    assert not [e for e in _raised(tiny_run.run_dir) if e["code"] == "divergence_ahead"]
    assert max(v for _, v in _series(tiny_run.run_dir, DIVERGENCE_RISK)) < 0.5
    assert all(v > 0 for _, v in _series(tiny_run.run_dir, ATTN_LOGIT))
