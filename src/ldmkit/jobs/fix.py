"""``ldmkit fix RUN``: diagnose a stopped or finished run, apply the automatic remedies of its
findings (``vitals.remedy``) and continue or restart it as they say; ``--dry-run`` prints the
plan and changes nothing.

Nothing of the run is deleted or rewritten by hand: a restart from a healthy checkpoint moves
the checkpoints saved after it to ``checkpoints/diverged/`` (as the NaN rollback does) and
resumes, so the logs rewind as on any resume; a restart from step 0 (a new latent scale changes
what every step trained on) is a new run beside the old one that reuses its stage 1. Every fix
is a line of the run's ``changes.jsonl``. A finding without an automatic remedy (over-fitting
needs more data, not a setting) is said as such, with the checkpoint to keep instead.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldmkit.config import Config
from ldmkit.errors import LdmkitError
from ldmkit.platform.files import check_plain_tree
from ldmkit.run.checkpoint import step_of
from ldmkit.run.context import read_run
from ldmkit.run.layout import FIX, REPAIR, RunDir, is_run
from ldmkit.training.divergence import healthy_bound
from ldmkit.training.loop import TrainResult, train
from ldmkit.training.resume import check_checkpoint
from ldmkit.vitals import metrics as vm
from ldmkit.vitals.context import Finding
from ldmkit.vitals.monitor import mode_for
from ldmkit.vitals.offline import diagnose_loaded
from ldmkit.vitals.remedy import RESTARTS, Restart
from ldmkit.vitals.rules import RULES

RESTART_WORDS = {"latest": "continue from the latest checkpoint",
                 "healthy": "go back to the newest checkpoint saved before the divergence began",
                 "start": "start again from step 0 in a new run (it reuses this run's stage 1)",
                 "none": "nothing to restart"}


@dataclass
class FixPlan:
    run_dir: Path
    applied: list[Finding] = field(default_factory=list)
    changes: dict[str, Any] = field(default_factory=dict)
    restart: Restart = "none"
    checkpoint: Path | None = None  # continued from ("latest", "healthy")
    new_run: Path | None = None  # "start"
    steps: int = 0  # train.steps of the continued or new run
    manual: list[tuple[Finding, str]] = field(default_factory=list)  # and what to keep

    @property
    def overrides(self) -> list[str]:
        values = {**self.changes, "train.steps": self.steps}
        if self.restart == "start":
            values["autoencoder.pretrained"] = str(self.run_dir)
            values["run_dir"] = str(self.new_run)
        return [f"{key}={_yaml(value)}" for key, value in values.items()]


def _yaml(value: Any) -> str:
    """A value as ``--set`` reads it (YAML: a float needs its dot, a string its quotes)."""
    if isinstance(value, float):
        return f"{value:.6e}"
    return json.dumps(value) if isinstance(value, str) else str(value)


def _sibling(run_dir: Path) -> Path:
    candidate, n = run_dir.with_name(run_dir.name + "-fixed"), 2
    while candidate.exists():
        candidate, n = run_dir.with_name(f"{run_dir.name}-fixed-{n}"), n + 1
    return candidate


def _keep_instead(run: RunDir, finding: Finding, series: dict) -> str:
    """The checkpoint to keep when nothing can be changed automatically: the newest before
    the finding was raised, or, when the held-out validation loss was lowest earlier in
    training, the one at or before that validation."""
    at, why = finding.step - 1, f"the newest saved before {finding.code} was raised at step " \
                                f"{finding.step}"
    val = [(s, v) for s, v in series.get(vm.VAL_LOSS, [])  # step 0's model is untrained
           if math.isfinite(v) and 0 < s < finding.step]
    if val:
        best_step, best = min(val, key=lambda r: r[1])
        at, why = best_step, f"at or before the lowest validation loss, {best:.4g} at step " \
                             f"{best_step}"
    ckpt = run.checkpoint_at_most(at)
    return f"keep {ckpt} ({why})" if ckpt else f"no checkpoint was saved before step {at + 1}"


def plan_fix(run_dir: str | Path, steps: int | None = None) -> FixPlan:
    """What ``ldmkit fix`` would do, with nothing written."""
    path = Path(run_dir)
    if not (path.is_dir() and is_run(path)):
        raise LdmkitError(f"'{path}' is not an ldmkit run directory; `ldmkit fix` repairs "
                          "ldmkit runs (for another trainer's log, `ldmkit diagnose` prints the "
                          "fix in its settings)")
    check_plain_tree(path)
    run = RunDir(path)
    cfg = run.load_config()
    log, ctx = read_run(path)
    diagnosis = diagnose_loaded(log, ctx)
    plan = FixPlan(path)
    for finding in diagnosis.findings:
        if finding.cleared_at is not None:
            continue  # the run recovered from it (a rollback, an earlier fix)
        remedy = finding.remedy
        if remedy is not None and remedy.automatic:
            plan.applied.append(finding)
            for key, value in remedy.changes:
                plan.changes.setdefault(key, value)
            plan.restart = max(plan.restart, remedy.restart, key=RESTARTS.index)
        elif finding.severity != "info":
            plan.manual.append((finding, _keep_instead(run, finding, log.series)))
    if plan.restart in ("latest", "healthy"):
        diverged = {rule.code for rule in RULES if rule.scenario == "diverged"}
        onset = min(f.step for f in plan.applied if f.code in diverged) \
            if plan.restart == "healthy" else None
        plan.checkpoint = run.latest_checkpoint_or_none() if onset is None \
            else run.checkpoint_at_most(healthy_bound(onset))
        if plan.checkpoint is None:
            plan.restart = "start"
    if plan.restart == "start":
        plan.new_run, plan.steps = _sibling(path), steps or cfg.train.steps
    elif plan.checkpoint is not None:
        done = step_of(plan.checkpoint)
        judged = int(ctx.thr("window")) * cfg.train.log_every  # a full window after the fix
        plan.steps = steps or max(cfg.train.steps, done + judged)
        if plan.steps <= done:
            raise LdmkitError(f"--steps {plan.steps} is not after the checkpoint it continues "
                              f"from (step {done}); pass more steps")
    return plan


def describe(plan: FixPlan) -> str:
    """The plan in words, as ``ldmkit fix`` prints it before acting."""
    lines = [f"fix of {plan.run_dir}"]
    if not plan.applied:
        lines.append("no finding has an automatic remedy: nothing to change")
    for finding in plan.applied:
        lines.append(f"  {finding.severity} {finding.code} (step {finding.step}): {finding.fix}")
    if plan.applied:
        changed = ", ".join(f"{k} = {v}" for k, v in plan.changes.items()) or "no setting"
        lines.append(f"change: {changed}; {RESTART_WORDS[plan.restart]}")
        if plan.checkpoint is not None:
            lines.append(f"from: {plan.checkpoint}, training to step {plan.steps}")
        if plan.new_run is not None:
            lines.append(f"new run: {plan.new_run}, {plan.steps} steps")
    for finding, keep in plan.manual:
        lines.append(f"  no automatic remedy for {finding.code} (step {finding.step}): "
                     f"{finding.fix}; {keep}")
    return "\n".join(lines)


def apply_fix(plan: FixPlan, by: str = FIX) -> TrainResult | None:
    """Carry out ``plan``: validate the changed config and the checkpoint, record the fix
    (``by`` whom), then resume (or start the new run). None when there is nothing to apply."""
    if not plan.applied:
        return None
    run = RunDir(plan.run_dir)
    cfg = run.load_config(plan.overrides)  # a change out of range fails here, nothing written
    record = {"fix": [f.code for f in plan.applied], "by": by, "changes": plan.changes,
              "restart": plan.restart}
    if plan.restart == "start":
        run.log_change(record | {"new_run": str(plan.new_run)})
        return train(cfg)
    assert plan.checkpoint is not None
    check_checkpoint(cfg, plan.run_dir, plan.checkpoint)
    at = step_of(plan.checkpoint)
    run.quarantine_after(at)
    run.log_change(record | {"at_step": at})
    return train(cfg, plan.run_dir, resume=True)


def repairs_made(run_dir: Path) -> int:
    """The repairs ``vitals.on_*: repair`` made to a run, from its ``changes.jsonl``."""
    return sum(record.get("by") == REPAIR for record in RunDir(run_dir).change_records())


def repair(result: TrainResult, cfg: Config) -> TrainResult:
    """While training stopped at a finding it may repair (``vitals.on_critical`` or
    ``on_warning: repair``), apply its remedies as ``ldmkit fix`` does and train on, at most
    ``vitals.max_repairs`` times a run (a restart's new run counts its old run's): a run never
    loops. Under torchrun the stop is left to the user (``ldmkit fix`` once it ended)."""
    made = 0
    while result.stopped_by is not None and mode_for(
            result.stopped_by, cfg.vitals.on_critical, cfg.vitals.on_warning) == "repair":
        if os.environ.get("WORLD_SIZE", "1") != "1":
            print(f"[vitals] not repaired under torchrun: run `ldmkit fix {result.run_dir}`")
            break
        if max(made, repairs_made(result.run_dir)) >= cfg.vitals.max_repairs:
            print(f"[vitals] not repairing {result.stopped_by.code}: vitals.max_repairs "
                  f"({cfg.vitals.max_repairs}) repairs made; the run stopped with a checkpoint")
            break
        plan = plan_fix(result.run_dir)
        if not plan.applied:
            break
        print("[vitals] repairing: " + describe(plan).replace("\n", "\n[vitals] "))
        result = apply_fix(plan, by=REPAIR) or result
        cfg, made = RunDir(result.run_dir).load_config(), made + 1
    return result
