"""Count the user-mistake cases the test suite feeds each ``mae-transfer`` command.

Runs pytest (over ``tests`` or the paths given) with a small plugin that wraps
``mae_transfer.cli.main``: every call that ends with exit status 2 (a reported user error, including
argparse's) or 130 (Ctrl-C) counts as a case of its command (``detect eval``, ``pretrain`` ...),
once per test. Cases run in a subprocess (the Ctrl-C and terminal tests) are not seen by the
wrapper and are not counted. Prints a Markdown table for docs/reliability.md and the README.

    .venv/bin/python tools/error_cases.py            # the whole suite (about 5 minutes)
    .venv/bin/python tools/error_cases.py tests/detection
"""
from __future__ import annotations

import collections
import functools
import sys
from typing import Any, Sequence

import pytest

GROUPS = ("detect", "segment", "data")  # commands whose first positional word is an action


@functools.lru_cache(maxsize=1)
def known_commands() -> frozenset[str]:
    """The sub-commands ``mae-transfer --help`` lists."""
    import argparse

    from mae_transfer.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return frozenset(sub.choices)


def command_of(argv: Sequence[str]) -> str:
    """``["--debug", "detect", "eval", ...]`` -> ``"detect eval"``; a command that does not exist ->
    ``"(a mistyped command)"``."""
    words = [a for a in argv if not a.startswith("-")]
    if not words or words[0] not in known_commands():
        return "(a mistyped command)"
    if words[0] in GROUPS and len(words) > 1:
        return f"{words[0]} {words[1]}"
    return words[0]


class ErrorCases:
    """The pytest plugin: records (command, test id) for each exit status 2 / 130."""

    def __init__(self) -> None:
        self.cases: dict[str, set[str]] = collections.defaultdict(set)
        self.current = ""

    def pytest_configure(self, config: Any) -> None:
        import mae_transfer.cli as cli  # before the test modules import ``main`` from it

        original = cli.main

        def main(argv: Sequence[str] | None = None) -> int:
            args = list(argv) if argv is not None else sys.argv[1:]
            try:
                rc = original(argv)
            except SystemExit as exc:  # argparse's usage errors
                if exc.code == 2:
                    self.cases[command_of(args)].add(self.current)
                raise
            if rc in (2, 130):
                self.cases[command_of(args)].add(self.current)
            return rc

        cli.main = main

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item: Any) -> Any:
        self.current = item.nodeid
        yield


def main(paths: Sequence[str]) -> int:
    plugin = ErrorCases()
    rc = pytest.main(["-q", "-p", "no:cacheprovider", *(paths or ["tests"])], plugins=[plugin])
    total = sum(len(v) for v in plugin.cases.values())
    print("\n| command | error cases |\n|---|---|")
    for name in sorted(plugin.cases):
        print(f"| `{name}` | {len(plugin.cases[name])} |")
    print(f"| all | {total} |")
    return int(rc)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
