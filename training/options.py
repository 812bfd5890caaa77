"""Options: one dataclass per trainer <-> command-line flags, YAML and JSON files.

A trainer declares its options as a dataclass deriving from ``Options`` whose fields are made
with ``option(help, default=..., **meta)`` (``choices``, ``type`` for a field whose default is
None, any other metadata the trainer reads).  From it this module builds the argparse flags
(``add_arguments``: one ``--flag-name`` per field, booleans as ``--x/--no-x``), reads option files
(``read_options_file``: YAML or JSON), spells keys the fields' way (``mask-ratio`` ->
``mask_ratio``) and coerces values to the field's type (``Options.gather``).

An options file holds the same keys as the flags; an unknown key is an error that names it and
suggests the closest valid key (``did_you_mean``), and so is a value outside a field's
``choices`` (``Options.check_choices``).  Precedence: defaults < file < flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping, Sequence

from training.fastpath import COMPILE_CHOICES
from training.precision import PRECISIONS


def default_num_workers(cap: int = 8) -> int:
    """Data-loading workers by default: the CPUs this process may run on (as torch's DataLoader counts
    them, so it does not warn), at most ``cap``."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cap, cpus))


def option(help: str, *, default: Any, **meta: Any) -> Any:
    """A dataclass field of an options class: its flag's ``help``, its ``default`` (a dict or
    list default is copied per instance) and metadata (``choices``, ``type``, ...)."""
    info = dict(help=help, **meta)
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=info)
    return dataclasses.field(default=default, metadata=info)


def did_you_mean(word: Any, candidates: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` with the candidate closest to ``word``, or ``""`` when none is close."""
    close = difflib.get_close_matches(str(word), sorted(candidates), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """Raise ``ValueError`` naming option ``name`` when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}: {value!r} is not one of {', '.join(choices)}{did_you_mean(value, choices)}")


def check_known_keys(name: str, keys: Iterable[str], known: Iterable[str], what: str) -> None:
    """Raise ``ValueError`` for the first key of the mapping option ``name`` that is not ``known``
    (``what``: what a known key is, e.g. ``an encoder option``)."""
    known = sorted(known)
    for key in keys:
        if key not in known:
            raise ValueError(f"{name}: {key!r} is not {what}{did_you_mean(key, known)} (options: {', '.join(known)})")


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
            raise ValueError(f"{where}: unknown option {key!r}{did_you_mean(name, allowed)}")
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


class Options:
    """Base of a trainer's options dataclass: defaults, types, choice and range checks, merging.

    Subclasses are ``@dataclass``es whose fields come from ``option``; ``TEXT_OPTIONS`` names
    the fields whose flag takes raw text parsed later (with its metavar, e.g. JSON).
    """

    TEXT_OPTIONS: ClassVar[Mapping[str, str]] = {}

    @classmethod
    def option_fields(cls) -> dict[str, dataclasses.Field]:
        """The fields, by name, in declaration order."""
        return {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]

    @classmethod
    def default(cls, name: str) -> Any:
        f = cls.option_fields()[name]
        return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]

    @classmethod
    def kind(cls, name: str) -> type:
        """The type a value of option ``name`` is coerced to (metadata ``type``, else the default's)."""
        return cls.option_fields()[name].metadata.get("type") or type(cls.default(name))

    @classmethod
    def coerce(cls, name: str, value: Any) -> Any:
        """A value from a file, a flag or the library, as option ``name`` takes it."""
        return coerce_value(name, value, cls.kind(name))

    @classmethod
    def gather(cls, sources: Sequence[tuple[str, Mapping[str, Any]]], allowed: Sequence[str] | None = None,
               refused: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The values of ``sources`` (``(where, mapping)``, later ones win), keys canonical and
        values coerced; an unknown key (not in ``allowed``, default: every field) is an error."""
        names = list(allowed) if allowed is not None else list(cls.option_fields())
        merged: dict[str, Any] = {}
        for where, values in sources:
            given = canonical_keys(values, where, names, refused)
            merged.update({k: cls.coerce(k, v) for k, v in given.items()})
        return merged

    @classmethod
    def sources(cls, values: Mapping[str, Any] | None, config_file: str | Path | None,
                ) -> list[tuple[str, Mapping[str, Any]]]:
        """``[(file, its mapping), ("options", values)]``, the ones given, in precedence order."""
        out: list[tuple[str, Mapping[str, Any]]] = []
        if config_file:
            out.append((str(config_file), read_options_file(config_file)))
        if values:
            out.append(("options", values))
        return out

    def check_choices(self) -> None:
        """Raise ``ValueError`` for the first option whose value is not one of its ``choices``
        (None, the recipe's default, is not checked)."""
        for name, f in self.option_fields().items():
            choices = f.metadata.get("choices")
            value = getattr(self, name)
            if choices and value is not None:
                check_choice(name, value, choices)

    def check_ranges(self, at_least_one: Iterable[str] = (), not_negative: Iterable[str] = ()) -> None:
        """Raise ``ValueError`` naming the first option below its bound (None is not checked)."""
        for name in at_least_one:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        for name in not_negative:
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative, got {value}")

    def changed(self, names: Iterable[str]) -> list[str]:
        """Those of ``names`` whose value is not the default."""
        return [n for n in names if getattr(self, n) != self.default(n)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


@dataclasses.dataclass
class RunOptions(Options):
    """The options of the run itself, the same for every trainer (``training.run`` reads them);
    a trainer's options dataclass derives from this one and adds its own."""

    precision: str = option("auto = bf16 on a GPU that has it, else fp32; fp16 uses a grad scaler",
                            default="auto", choices=PRECISIONS)
    num_workers: int = option("data-loading processes per training process (default: the CPUs this process "
                              "may use, at most 8)", default=default_num_workers())
    working_weights: bool = option("with bf16: keep bf16 working copies of the matmul weights, fp32 master weights "
                                   "and optimizer state (the same run as plain autocast, without its weight casts)",
                                   default=True)
    compile: str = option("torch.compile the training step's model: auto = on with CUDA, and on the CPU for MAE "
                          "pretraining in bf16 over 1000+ optimizer steps (where its minutes of compiling pay back); "
                          "falls back to eager with one warning when it fails", default="auto",
                          choices=COMPILE_CHOICES)
    device: str = option("auto, cpu, cuda", default="auto", choices=("auto", "cpu", "cuda"))
    dist_backend: str = option("torch.distributed backend: auto = nccl with CUDA, else gloo", default="auto")
    tensorboard: bool = option("write TensorBoard scalars", default=True)
    progress: bool = option("show a progress bar", default=True)
    auto_resume: bool = option("resume from OUTPUT/checkpoint.pth when it exists", default=True)
    max_nonfinite: int = option("stop after this many optimizer steps in a row with a non-finite loss", default=10)


_RUN_OPTIONS = [f.name for f in dataclasses.fields(RunOptions)]


def add_arguments(parser: argparse.ArgumentParser, options: type[Options], names: Sequence[str] | None = None) -> None:
    """``--config FILE`` and one flag per option (``names``, default all); flags not given stay
    absent from the namespace (SUPPRESS), so a file's value is only overridden by a typed flag.
    The help ends with the default unless it speaks of it itself (``default`` / ``recipe``).
    The trainer's own options come first, then the run's (``RunOptions``)."""
    parser.add_argument("--config", default=None, help="YAML or JSON file of options (keys are the flag names)")
    fields = options.option_fields()
    names = list(names) if names is not None else list(fields)
    for name in sorted(names, key=lambda n: n in _RUN_OPTIONS):
        meta = fields[name].metadata
        flag = "--" + name.replace("_", "-")
        default = options.default(name)
        help_text = meta["help"]
        if "default" not in help_text and "recipe" not in help_text:
            help_text = f"{help_text} (default: {json.dumps(default) if isinstance(default, dict) else default})"
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif name in options.TEXT_OPTIONS:
            parser.add_argument(flag, default=argparse.SUPPRESS, metavar=options.TEXT_OPTIONS[name], help=help_text)
        else:
            parser.add_argument(flag, type=options.kind(name), default=argparse.SUPPRESS, choices=meta.get("choices"),
                                help=help_text)


def given_flags(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The options of ``names`` that a parsed command line set (see ``add_arguments``)."""
    names = set(names)
    return {k: v for k, v in vars(args).items() if k in names}
