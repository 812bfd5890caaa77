"""Options: a dataclass <-> command-line flags, YAML and JSON files.

An options file holds the same keys as the flags (``mask_ratio`` or ``mask-ratio``); an unknown
key is an error that names it and suggests the closest valid key.  Precedence: defaults < file <
flags.
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Mapping, Sequence


def read_options_file(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML (``.yaml``/``.yml``) or JSON options file holds, keys not yet checked.

    Raises:
        ValueError: there is no such file, or it does not hold a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such config file")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text) or {}
    else:
        values = json.loads(text)
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values")
    return values


def canonical_keys(values: Mapping[str, Any], where: str, allowed: Sequence[str],
                   refused: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``values`` with option names as the fields spell them (``mask-ratio`` -> ``mask_ratio``).

    Args:
        where: what the values come from, for the error (a file, ``options``).
        allowed: the option names accepted.
        refused: names that are not accepted here, with the reason (``is <reason>``).
    Raises:
        ValueError: a name is not allowed; it says why, or suggests the closest allowed name.
    """
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in allowed:
            if refused and name in refused:
                raise ValueError(f"{where}: {key!r} is {refused[name]}")
            close = difflib.get_close_matches(name, list(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{where}: unknown option {key!r}{hint}")
        out[name] = value
    return out


def coerce_value(name: str, value: Any, kind: type) -> Any:
    """A value from JSON/YAML or a flag as option ``name`` of type ``kind`` takes it.

    ``bool`` takes only true / false; ``int`` and ``float`` take numbers and numeric strings (an
    ``int`` option refuses 2.5); ``str`` takes anything as its text; ``dict`` takes a mapping or
    its JSON text.  Raises ``ValueError`` naming the option otherwise.
    """
    if value is None:
        return None
    if kind is dict and isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name}: not valid JSON ({exc})") from None
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name}: expected true or false, got {value!r}")
    if kind in (int, float):
        try:
            coerced = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: expected a number, got {value!r}") from None
        if kind is int and coerced != value and not isinstance(value, str):
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        return coerced
    return str(value) if kind is str else value
