"""``ldmkit diagnose``: the rule table replayed over any trainer's log, as a table or JSON.

Besides the findings it says what the log lets the rules judge: which trainer wrote it, the
regime it was judged in (a fine-tune's low, flat loss is not a finding), and the guide's vital
signs the log lacks, each with what it would have revealed and the lines that add it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldmkit.diffusion.parameterization import Parameterization
from ldmkit.vitals import metrics as vm
from ldmkit.vitals.diagnose import Context, Finding, coverage, scenario
from ldmkit.vitals.logs.readers import LoadedLog, read_log
from ldmkit.vitals.logs.run_config import fp16_setting, infer_regime, min_snr_gamma_of, objective_of
from ldmkit.vitals.logs.trainers import LDMKIT, Trainer, kind_of
from ldmkit.vitals.monitor import SEVERITY_RANK, replay
from ldmkit.vitals.rules import RULES
from ldmkit.vitals.signs import SIGNS

# the guide's vital signs (its metric tables), in its order
# the guide's signs that a rule reads: what a log without them cannot be judged on
GUIDE_TAGS = tuple(s.tag for s in SIGNS if s.guide and any(r.metric == s.tag for r in RULES))


@dataclass(frozen=True)
class Missing:
    tag: str
    reveals: str  # the guide's bad signs it would have shown
    codes: tuple[str, ...]  # the findings it feeds


@dataclass
class Diagnosis:
    source: str
    scenario: str
    verdict: str
    findings: list[Finding]
    latent_scale_factor: float | None
    trainer: str = LDMKIT.label
    regime: str = "pretrain"
    regime_reason: str = ""
    missing: list[Missing] = field(default_factory=list)
    hook: str = ""  # the lines that add the missing vital signs in that trainer's loop
    read_from: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what of the log was read only in part

    def worst(self) -> int:
        """Rank of the most severe finding (-1 when there is none)."""
        return max((SEVERITY_RANK[f.severity] for f in self.findings), default=-1)

    def tags_read(self, finding: Finding) -> list[str]:
        """The logged names a finding was judged on (another trainer's, or ours)."""
        return self.read_from.get(finding.metric, [finding.metric])

    def to_json(self) -> str:
        return json.dumps({
            "scenario": self.scenario, "verdict": self.verdict, "trainer": self.trainer,
            "regime": self.regime, "regime_reason": self.regime_reason,
            "findings": [{**f.to_dict(), "tags_read": self.tags_read(f)} for f in self.findings],
            "missing_vitals": [{"tag": m.tag, "reveals": m.reveals, "codes": list(m.codes)}
                               for m in self.missing],
            "hook": self.hook, "notes": self.notes}, indent=2)


def diagnose_log(path: str | Path, latent_scale_factor: float | None = None,
                 thresholds: dict[str, float] | None = None, objective: str | None = None,
                 mode: str | None = None) -> Diagnosis:
    """Read ``path`` (any format of ``vitals.formats``) and replay the rules over it under the
    guide's defaults; ``objective`` says what the loss is (flow's starts at 2) and ``mode``
    (pretrain, finetune) overrides the regime inferred. An ldmkit run with its config:
    ``ldmkit.run.context.diagnose_path``."""
    log = read_log(path, latent_scale_factor)
    return diagnose_loaded(log, Context.of(log.latent_scale_factor, thresholds), objective, mode)


def with_objective(ctx: Context, objective: str | None,
                   min_snr_gamma: float | None = None) -> Context:
    """``ctx`` with the loss units of ``objective`` (min-SNR-gamma weighted when given);
    unchanged for None and no weighting."""
    if objective is not None or min_snr_gamma is not None:
        param = Parameterization(objective or "eps", weighting="min_snr" if min_snr_gamma
                                 else "none", min_snr_gamma=min_snr_gamma or 5.0)
        ctx.loss_scale = param.untrained_loss()
        ctx.val_loss_scale = param.untrained_loss(weighted=False)
    return ctx


def foreign_context(log: LoadedLog, ctx: Context, objective: str | None = None,
                    mode: str | None = None) -> tuple[Context, str]:
    """The loss units and regime of another trainer's log: the flags first, then its saved
    config, then the log itself. Returns the context and why the regime is what it is."""
    if log.trainer is not LDMKIT:
        with_objective(ctx, objective or objective_of(log.config), min_snr_gamma_of(log.config))
    elif objective is not None:
        with_objective(ctx, objective)
    if mode is not None:
        ctx.regime = mode
        return ctx, "set with --mode"
    if ctx.fixed_points:
        return ctx, "a probe of trained checkpoints (ldmkit probe)"
    if log.trainer is LDMKIT:
        return ctx, "ldmkit trains from scratch"
    losses = [ctx.in_guide_units(vm.LOSS, v) for _, v in
              log.series.get(vm.LOSS) or log.series.get(vm.LOSS_SMOOTHED, [])]
    ctx.regime, reason = infer_regime(log.trainer, log.config, losses, int(ctx.thr("window")))
    return ctx, reason


def missing_vitals(log: LoadedLog) -> list[Missing]:
    """The guide's vital signs that ``log`` holds no per-step values of."""
    result = []
    for tag in GUIDE_TAGS:
        if log.series.get(tag) and kind_of(log.trainer, tag) == "step":
            continue
        rules = [r for r in RULES if r.metric == tag]
        reveals = "; ".join(dict.fromkeys(r.guide for r in rules))
        if tag == vm.LOSS and log.series.get(vm.LOSS_SMOOTHED):
            reveals += " (only a moving average is logged: levels are judged on it, single steps " \
                       "are not)"
        result.append(Missing(tag, reveals, tuple(r.code for r in rules)))
    return result


NONFINITE = ("loss_nonfinite", "grad_norm_nonfinite")


def in_trainer_terms(finding: Finding, trainer: Trainer, config: dict[str, Any]) -> Finding:
    """The finding with its remedy read in the trainer's own setting names; a run diverged to
    NaN while its ``config`` computes in fp16 is told to leave fp16 first (its overflow, not
    the learning rate, is the likely cause). ``diagnose`` and ``watch`` both say it so."""
    if finding.remedy is None:
        return finding
    remedy = finding.remedy.in_names_of(trainer.names)
    fix = remedy.render()
    setting = fp16_setting(config) if finding.code in NONFINITE else None
    if setting is not None:
        fix = (f"the run computes in fp16 ({setting}), whose range (at most 65504) an "
               "activation or gradient overflows: train in bf16 first (fp32 for a module that "
               f"still overflows); if it still diverges, {fix}")
    return dataclasses.replace(finding, fix=fix, remedy=remedy)


def diagnose_loaded(log: LoadedLog, ctx: Context, objective: str | None = None,
                    mode: str | None = None) -> Diagnosis:
    """The rules replayed over a log already read (``read_log``) under ``ctx``."""
    ctx, reason = foreign_context(log, ctx, objective, mode)
    findings = [in_trainer_terms(f, log.trainer, log.config) for f in replay(log.series, ctx)]
    name = scenario([f for f in findings if f.cleared_at is None], log.series, ctx)
    # a probe measures checkpoints, not a training loop: the loop's signs are not its to log
    missing = [] if ctx.fixed_points else missing_vitals(log)
    return Diagnosis(log.source, name, coverage(name, log.series), findings,
                     log.latent_scale_factor, log.trainer.label, ctx.regime, reason, missing,
                     log.trainer.hook if missing else "", log.read_from, log.notes)


def format_table(diagnosis: Diagnosis) -> str:
    """Human-readable findings, most severe first, with the fix under each; then what the log
    could not show."""
    scale = ("unknown (pass --latent-scale-factor)" if diagnosis.latent_scale_factor is None
             else f"{diagnosis.latent_scale_factor:.4g}")
    lines = [f"diagnosis of {diagnosis.source}", f"written by: {diagnosis.trainer}",
             f"regime: {diagnosis.regime} ({diagnosis.regime_reason})",
             f"latent_scale_factor: {scale}", *(f"read: {n}" for n in diagnosis.notes),
             f"scenario: {diagnosis.verdict}", ""]
    if not diagnosis.findings:
        lines.append("no findings: every vital sign logged is within the guide's healthy range")
    for f in diagnosis.findings:
        read = ", ".join(diagnosis.tags_read(f))
        lines.append(f"{f.severity.upper():8} {f.code:24} step {f.step:<8} value {f.value:.4g}"
                     f"  [{read}]")
        lines.append(f"         {f.message}")
        lines.append(f"         fix: {f.fix}")
    if diagnosis.missing:
        lines += ["", "not logged, so not judged:"]
        lines += [f"  {m.tag:34} would show: {m.reveals}" for m in diagnosis.missing]
        if diagnosis.hook:
            lines += ["", "add them in the training loop:"]
            lines += ["  " + line for line in diagnosis.hook.splitlines()]
    return "\n".join(lines)
