"""Helpers for refusing unknown option names with a suggestion (configs of every task use them)."""
from __future__ import annotations

import difflib
import inspect
from typing import Iterable


def did_you_mean(key: str, known: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``known`` to ``key``, or ``""`` when none is close."""
    close = difflib.get_close_matches(str(key), sorted(str(k) for k in known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def init_params(cls: type) -> set[str] | None:
    """Keyword names ``cls(...)`` accepts, following ``**kwargs`` up the MRO; None when open-ended."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        if klass is object:
            return names
        try:
            params = inspect.signature(klass.__init__).parameters.values()
        except (TypeError, ValueError):
            return None
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names
    return None
