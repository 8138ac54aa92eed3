"""What a finding's fix changes, as data: the config changes, where training restarts from,
and the text a person reads, rendered in ldmkit's setting names or another trainer's.

A rule's fix text names settings as ``$train.lr`` (``SettingText``) and quotes numbers as
``{lr_retry:.3g}``; its ``RemedySpec`` says which numbers become which config values. The
finding then carries a ``Remedy`` that ``ldmkit fix`` applies without reading prose, and
whose text is rendered for whoever reads it: ldmkit's ``train.lr``, kohya's ``--learning_rate``,
ltx-trainer's ``optimization.learning_rate`` (``trainers.Trainer.settings``).
"""

from __future__ import annotations

import dataclasses
import math
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

# where training goes on after the changes: from the latest checkpoint; from the newest
# checkpoint saved before the finding began; from step 0 in a new run (what every step trained
# on changes, as the latent scale does); or nowhere (a person has to act)
Restart = Literal["latest", "healthy", "start", "none"]
RESTARTS: tuple[Restart, ...] = ("none", "latest", "healthy", "start")  # least to most undone


class SettingText(string.Template):
    """A fix's text, naming settings as ``$section.key`` (a sentence's full stop after it is
    not part of the name)."""

    idpattern = r"[a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*"


class _Names(dict):
    def __missing__(self, key: str) -> str:
        return key


def render(text: str, names: Mapping[str, str] | None = None) -> str:
    """``text`` with its ``$setting`` names as ``names`` gives them (ldmkit's own else)."""
    return SettingText(text).safe_substitute(_Names(names or {}))


@dataclass(frozen=True)
class RemedySpec:
    """A rule's remedy: ``changes`` maps a config key to the fix field holding its new value
    (a number the rule computes, as ``lr_retry``) or to a fixed value (``=uniform``)."""

    changes: tuple[tuple[str, str], ...] = ()
    restart: Restart = "none"
    automatic: bool = False  # safe to apply with no person (ldmkit fix)


@dataclass(frozen=True)
class Remedy:
    changes: tuple[tuple[str, Any], ...]  # ldmkit's config key, its new value
    restart: Restart
    automatic: bool
    text: str  # the fix, ``$setting`` names unrendered
    names: tuple[tuple[str, str], ...] = ()  # whose setting names it is read in (ldmkit's: ())

    def in_names_of(self, names: Mapping[str, str]) -> Remedy:
        """The same remedy, read in another trainer's setting names."""
        return dataclasses.replace(self, names=tuple(names.items()))

    def render(self) -> str:
        return render(self.text, dict(self.names))

    def to_dict(self) -> dict[str, Any]:
        names = dict(self.names)
        return {"changes": [{"key": key, "setting": names.get(key, key), "value": value}
                            for key, value in self.changes],
                "restart": self.restart, "automatic": self.automatic}


def remedy_of(spec: RemedySpec, text: str, fields: Mapping[str, Any]) -> Remedy:
    """The remedy a finding carries; not automatic when a value it needs is not known (a
    learning rate of a log that has none, the scale of a run with no scale factor)."""
    changes = []
    for key, source in spec.changes:
        value = _literal(source[1:]) if source.startswith("=") else fields.get(source)
        if value is None or isinstance(value, float) and not (math.isfinite(value) and value > 0):
            return Remedy((), "none", False, text)
        changes.append((key, float(f"{value:.4g}") if isinstance(value, float) else value))
    return Remedy(tuple(changes), spec.restart, spec.automatic and bool(changes), text)


def _literal(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        return text
