"""Bounds on what ldmkit reads from users' files and echoes back in messages.

A config, a ``--set`` value or a downloaded run's ``config.yaml`` is untrusted input: YAML
aliases can make a few lines expand to billions of values ("billion laughs"), and an error
message that prints such a value, or a megabyte-long string, would exhaust memory or flood the
terminal. Everything read is bounded here; everything echoed is abbreviated.
"""

from __future__ import annotations

import reprlib
from typing import Any

from ldmkit.errors import ConfigError
from ldmkit.platform.files import count_values

MAX_CONFIG_BYTES = 1 << 20  # a config is a page of YAML; a larger file is not one
MAX_CONFIG_VALUES = 10_000  # values after expanding YAML aliases (a "billion laughs" has 1e9)
_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxlist, _BRIEF.maxdict = 2, 4, 4
_BRIEF.maxstring = _BRIEF.maxother = 60


def brief(value: Any) -> str:
    """A bounded ``repr`` for error messages: a huge or deeply nested value never floods them."""
    return _BRIEF.repr(value)


def check_size(data: Any, where: str) -> None:
    """Refuse YAML whose aliases expand past ``MAX_CONFIG_VALUES`` values, counting each use of
    an alias (PyYAML shares the objects, but printing or copying them expands them)."""
    if count_values(data, MAX_CONFIG_VALUES) > MAX_CONFIG_VALUES:
        raise ConfigError(f"{where} expands to more than {MAX_CONFIG_VALUES} values (YAML "
                          "aliases?); a config is a few dozen keys: remove the aliases")
