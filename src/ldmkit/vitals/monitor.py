"""Findings over time: live during training, and replayed over a finished log.

Both walk the log in step order and evaluate the rule table on what was known at each step, so
a finding's ``step`` is when it was first raised, and offline diagnosis says what live diagnosis
would have said.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
from pathlib import Path

from ldmkit.platform.files import open_append
from ldmkit.vitals.diagnose import Context, Finding, Series, evaluate
from ldmkit.vitals.logs.metrics_jsonl import FINDINGS_FILE

TAIL = 64  # records per tag a rule may look back on; keeps each evaluation O(tags * TAIL)
SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}


def _tail(series: Series) -> Series:
    return {tag: recs[-TAIL:] for tag, recs in series.items()}


class FindingTracker:
    """Keeps the active findings; reports what was raised, escalated or cleared at each step."""

    def __init__(self) -> None:
        self.active: dict[str, Finding] = {}
        self.history: list[Finding] = []  # every finding when first raised or escalated

    def update(self, current: list[Finding], step: int) -> tuple[list[Finding], list[Finding]]:
        raised = []
        now = {f.code: f for f in current}
        for code, finding in now.items():
            old = self.active.get(code)
            if old is None or SEVERITY_RANK[finding.severity] > SEVERITY_RANK[old.severity]:
                first = finding if old is None else dataclasses.replace(finding, step=old.step)
                self.active[code] = first
                raised.append(first)
                self.history.append(first)
        cleared = [self.active.pop(code) for code in list(self.active) if code not in now]
        return raised, cleared


def replay(series: Series, ctx: Context, max_points: int = 2000) -> list[Finding]:
    """Findings of a finished log: those active at its end, then criticals raised and cleared.

    Evaluated at up to ``max_points`` steps spread over the log (every logged step if fewer).
    """
    ctx.learn(series)
    steps = sorted({s for recs in series.values() for s, _ in recs})
    if len(steps) > max_points:
        stride = len(steps) / max_points
        steps = sorted({steps[int(i * stride)] for i in range(max_points)} | {steps[-1]})
    keys = {tag: [s for s, _ in recs] for tag, recs in series.items()}
    tracker = FindingTracker()
    cleared_critical: dict[str, tuple[Finding, int]] = {}
    for step in steps:
        prefix = {}
        for tag, recs in series.items():
            end = bisect.bisect_right(keys[tag], step)
            prefix[tag] = recs[max(0, end - TAIL):end]
        _, cleared = tracker.update(evaluate(prefix, ctx), step)
        for finding in cleared:
            if finding.severity == "critical":
                cleared_critical[finding.code] = (finding, step)
    result = sorted(tracker.active.values(), key=lambda f: -SEVERITY_RANK[f.severity])
    for code, (finding, step) in cleared_critical.items():
        if code not in tracker.active:
            result.append(dataclasses.replace(
                finding, message=f"{finding.message} (cleared by step {step})", cleared_at=step))
    return result


def mode_for(finding: Finding, on_critical: str, on_warning: str) -> str:
    """What training does at ``finding``: ``stop`` (a critical one under ``on_critical:
    stop``), ``repair`` (under ``on_critical`` / ``on_warning: repair``, one whose remedy can be
    applied automatically), else ``warn``: it is announced and training goes on."""
    mode = {"critical": on_critical, "warning": on_warning}.get(finding.severity)
    repairable = finding.remedy is not None and finding.remedy.automatic
    return "stop" if mode == "stop" else "repair" if mode == "repair" and repairable else "warn"


class LiveMonitor:
    """Observer of a MetricLogger: evaluates the rules after each logged step during training.

    New and escalated findings are printed once and appended to ``findings.jsonl`` as
    ``raised``; a finding that no longer holds is printed and recorded as ``cleared``. With
    ``on_critical='stop'`` a critical finding sets ``stop_finding`` for the loop to act on; under
    ``repair``, a finding the job can repair does (``mode_for``).
    """

    def __init__(self, run_dir: Path, ctx: Context, on_critical: str = "warn",
                 echo=print, on_warning: str = "warn") -> None:
        self.ctx = ctx
        self.on_critical, self.on_warning = on_critical, on_warning
        self.series: Series = {}
        self.tracker = FindingTracker()
        self.path = Path(run_dir) / FINDINGS_FILE
        self.echo = echo
        self.stop_finding: Finding | None = None
        self.text_sink = None  # callable(step, tag, text), e.g. TensorBoard add_text

    def prime(self, series: Series) -> None:
        """Start from an earlier part of the run (resume) without re-announcing its findings."""
        self.series = {tag: list(recs) for tag, recs in series.items()}
        self.ctx.learn(series)
        self.tracker, self.stop_finding = FindingTracker(), None
        self.tracker.update(evaluate(_tail(self.series), self.ctx), 0)

    def observe(self, step: int, values: dict[str, float]) -> None:
        self.ctx.learn(values)
        for tag, value in values.items():
            self.series.setdefault(tag, []).append((int(step), float(value)))
        raised, cleared = self.tracker.update(evaluate(_tail(self.series), self.ctx), step)
        for finding in raised:
            self.record(finding, step)
            if self.mode_for(finding) != "warn":
                self.stop_finding = self.stop_finding or finding
        for finding in cleared:
            self._record({"event": "cleared", "at_step": int(step), "code": finding.code,
                          "severity": finding.severity, "metric": finding.metric},
                         f"[vitals] cleared {finding.code} at step {step}")

    def mode_for(self, finding: Finding) -> str:
        return mode_for(finding, self.on_critical, self.on_warning)

    def record(self, finding: Finding, at_step: int) -> None:
        """Announce and record a finding the trainer raised itself (``rules.EVENTS``)."""
        line = (f"[vitals] {finding.severity.upper()} {finding.code} (step {finding.step}): "
                f"{finding.message}. Fix: {finding.fix}")
        self._record({"event": "raised", "at_step": int(at_step), **finding.to_dict()}, line)

    def _record(self, event: dict, line: str) -> None:
        self.echo(line)
        with open_append(self.path) as fh:
            fh.write(json.dumps(event) + "\n")
        if self.text_sink is not None:
            self.text_sink(event["at_step"], "vitals/findings", line)

    def active(self) -> list[Finding]:
        return list(self.tracker.active.values())
