"""Evaluate the rule table (``ldmkit.vitals.rules``) on logged series: findings and a scenario.

Series are ``{tag: [(step, value), ...]}`` sorted by step. Train metrics are judged over a
window of the last ``window`` records with medians or means, so one noisy point neither raises
nor hides a finding; "stays" rules wait for ``min_steps`` optimizer steps. Sampling metrics are
judged on the latest sampling, each of which already aggregates a whole batch of samples. The
predicates are in ``ldmkit.vitals.checks``.
"""

from __future__ import annotations

import math

from ldmkit.vitals import metrics as vm
from ldmkit.vitals.checks import CHECKS, samples_judgeable
from ldmkit.vitals.context import Context, Finding, Series, Verdict
from ldmkit.vitals.remedy import remedy_of, render
from ldmkit.vitals.rules import ALWAYS, EVENTS, RULES
from ldmkit.vitals.signs import QUALITY_TAGS

__all__ = ["Context", "Finding", "Series", "coverage", "evaluate", "event_finding", "retry_lr",
           "scenario"]

def _fix_fields(verdict: Verdict, series: Series, ctx: Context) -> dict:
    """Numbers the fixes quote and the remedies set: learning rates to retry with, the scale
    factor to use (``new_scale``, when the run's scale is known)."""
    lrs = [v for _, v in series.get(vm.LEARNING_RATE, []) if math.isfinite(v)]
    # the peak rate in effect: the configured one times what rollbacks and repairs made of it
    scales = series.get(vm.LR_SCALE) or [(0, 1.0)]
    lr = ctx.lr * scales[-1][1] if ctx.lr is not None else (max(lrs) if lrs else float("nan"))
    scale, z = ctx.latent_scale_factor, verdict.value
    new_scale = float("nan")
    if not (math.isfinite(z) and z > 0):
        scale_fix = "set $diffusion.latent_scale_factor to null so ldmkit calibrates it"
    elif scale:
        new_scale = scale / z
        scale_fix = (f"set $diffusion.latent_scale_factor = {new_scale:.4g} "
                     f"(now {scale:.4g}; current / z_std), or null to calibrate from data")
    else:
        scale_fix = (f"multiply $diffusion.latent_scale_factor by {1 / z:.3g} (1 / z_std), "
                     "or set it to null so ldmkit calibrates it from the data")
    return {"lr": lr, "lr_retry": retry_lr(lr), "lr_up": lr * 10, "scale_fix": scale_fix,
            "new_scale": new_scale}


STABLE_LR = 1e-3  # AdamW's step is ~lr per weight; LDM backbones train at 1e-4 to 1e-3


def retry_lr(lr: float) -> float:
    """The learning rate to retry a diverged run with: a tenth, and never above ``STABLE_LR``,
    so that the advice after a wildly wrong rate (1e6) is one that trains."""
    return min(lr / 10, STABLE_LR) if math.isfinite(lr) else STABLE_LR


def evaluate(series: Series, ctx: Context) -> list[Finding]:
    """Findings active at the end of ``series``, most severe first."""
    findings = []
    for rule in RULES:
        if rule.pretrain_only and ctx.regime == "finetune":
            continue
        if rule.about_samples and not samples_judgeable(rule, series, ctx):
            continue
        metric, judged = rule.metric, series
        if rule.fallback and not series.get(metric) and series.get(rule.fallback):
            metric, judged = rule.fallback, {**series, metric: series[rule.fallback]}
        verdict = CHECKS[rule.check](rule, judged, ctx)
        if verdict is None:
            continue
        severity = "critical" if verdict.level in (rule.critical, ALWAYS) else "warning"
        fields = {"value": verdict.value, "step": verdict.step,
                  "thr": ctx.thresholds.get(verdict.level, float("nan")),
                  **_fix_fields(verdict, series, ctx), **verdict.fields}
        remedy = remedy_of(rule.remedy, rule.fix.format(**fields), fields)
        findings.append(Finding(rule.code, severity, metric, verdict.step, verdict.value,
                                rule.message.format(**fields), remedy.render(), remedy))
    return sorted(findings, key=lambda f: f.severity != "critical")


def event_finding(code: str, step: int, value: float, **fields: float) -> Finding:
    """A finding of ``rules.EVENTS``: something the trainer did about a bad step."""
    event = EVENTS[code]
    values = {"value": value, "step": step, **fields}
    fix = event.fix.format(**values)
    remedy = remedy_of(event.remedy, fix, values) if event.remedy.changes else None
    return Finding(code, event.severity, event.metric, step, value,
                   event.message.format(**values), render(fix), remedy)


def scenario(findings: list[Finding], series: Series, ctx: Context) -> str:
    """The guide's scenarios: healthy (A), scale_factor_bug (B), mode_collapse (C), or another."""
    serious = {f.code for f in findings if f.severity in ("warning", "critical")}
    for rule in RULES:  # root causes first
        if rule.code in serious:
            return rule.scenario
    if any(f.code in EVENTS and f.severity == "critical" for f in findings):
        return "diverged"
    # a training loss needs a window of records; a probe's checkpoints are judged one by one
    if not ctx.fixed_points and \
            len(series.get(vm.LOSS) or series.get(vm.LOSS_SMOOTHED, [])) < int(ctx.thr("window")):
        return "too_early"
    return "healthy"




def coverage(scenario_name: str, series: Series) -> str:
    """What a verdict covers, in words: the vital signs judge training dynamics, not whether
    the samples look like the data, so "healthy" says so until an ``eval/*`` figure exists."""
    if scenario_name != "healthy":
        return scenario_name
    measured = [t for t in QUALITY_TAGS if series.get(t)]
    if not measured:
        return "healthy dynamics; sample quality not measured (`ldmkit eval RUN`)"
    figures = ", ".join(f"{t.split('/')[1]} {series[t][-1][1]:.3g}" for t in measured)
    return f"healthy dynamics; sample quality measured at step {series[measured[0]][-1][0]} " \
           f"({figures})"
