"""params.yaml into frozen dataclasses: one section per stage, every key checked.

Every stage script is run from the repository root (as `dvc repro` does), so
`params.yaml` and the paths in its `paths:` section are relative to that root.
A stage's section is loaded with load_params(<its dataclass>): unknown, missing
and mistyped keys are refused with one line naming the key, its value and what
is allowed; ranges are checked in the dataclass's __post_init__ with check().

The dataclasses live in modules free of torch (download.py's, and
pipeline/<stage>_params.py for the stages that import torch), so that the
check_params stage, which checks every section before any stage runs, starts in
a tenth of a second instead of seconds (docs/speed.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from pipeline.errors import PipelineError

PARAMS_FILE = Path("params.yaml")

Auto = Literal["auto", True, False]
Device = Literal["auto", "cpu", "cuda", "mps"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
ANY_MACHINE = ("auto", "cpu")  # the Devices every machine runs: torch need not be asked


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise a PipelineError naming the key, its value and what is allowed, unless ok."""
    if not ok:
        shown = list(value) if isinstance(value, tuple) else value
        raise PipelineError(f"{PARAMS_FILE}: {key} = {shown!r} is not allowed: {allowed}")


def check(params: Any, name: str, ok: bool, allowed: str) -> None:
    """require() for field `name` of a params dataclass: `section.name = value`."""
    require(ok, f"{params.SECTION}.{name}", getattr(params, name), allowed)


_PLAIN = (bool, int, float, str)  # the plain types a param may have


def _expected(hint: Any) -> str:
    """What a value of type `hint` may be, for error messages."""
    if typing.get_origin(hint) is Literal:
        return ", ".join(str(c).lower() for c in typing.get_args(hint))
    return {bool: "true or false", int: "an integer", float: "a finite number"}.get(
        hint, "a string"
    )


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check one value against its type hint; return it converted where that is lossless."""
    origin = typing.get_origin(hint)
    union = origin in (typing.Union, types.UnionType)  # int | Literal["auto"]
    options = typing.get_args(hint) if union else (hint,)
    for option in options:  # every member of a union, whichever one matches
        if typing.get_origin(option) not in (Literal, tuple) and option not in _PLAIN:
            raise TypeError(f"{key}: params of type {option!r} are not supported")
    if union:
        for option in options:
            with contextlib.suppress(PipelineError):
                return _coerce(key, value, option)
        require(False, key, value, " or ".join(_expected(o) for o in options))
    if origin is Literal:
        choices = typing.get_args(hint)
        # compare types too: YAML's 1 must not pass for True
        ok = any(value == c and type(value) is type(c) for c in choices)
        require(ok, key, value, "one of " + _expected(hint))
        return value
    if origin is tuple:  # tuple[str, ...]
        item = typing.get_args(hint)[0]
        require(isinstance(value, list), key, value, f"a list of {item.__name__}")
        return tuple(_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value))
    if hint is bool:
        require(isinstance(value, bool), key, value, _expected(bool))
    elif hint is int:
        require(isinstance(value, int) and not isinstance(value, bool), key, value, _expected(int))
    elif hint is float:
        # `dvc exp run -S train.lr=1e-06` writes `lr: 1e-06`, which YAML 1.1 (PyYAML)
        # reads as a string: accept any string that Python parses as a number.
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        require(is_number and math.isfinite(value), key, value, _expected(float))
        return float(value)
    elif hint is str:
        require(isinstance(value, str), key, value, _expected(str))
    return value


def parse_section(cls: type, raw: Any) -> Any:
    """Build the frozen dataclass `cls` from the dict `raw`, rejecting unknown,
    missing and mistyped keys; range checks are in the dataclass's __post_init__."""
    section = cls.SECTION
    if not isinstance(raw, dict):
        raise PipelineError(f"{PARAMS_FILE}: section '{section}' is missing or not a mapping")
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1) or [
                f for f in fields if f == "".join(w[:1] for w in str(key).split("_"))
            ]  # a spelt-out abbreviation: learning_rate -> lr
            hint = f" (did you mean '{section}.{close[0]}'?)" if close else ""
            valid = ", ".join(fields)
            raise PipelineError(
                f"{PARAMS_FILE}: unknown key '{section}.{key}'{hint}; valid keys: {valid}"
            )
    missing = [name for name in fields if name not in raw]
    if missing:
        names = ", ".join(f"{section}.{m}" for m in missing)
        raise PipelineError(f"{PARAMS_FILE}: missing key(s) {names}")
    values = {name: _coerce(f"{section}.{name}", raw[name], hints[name]) for name in fields}
    return cls(**values)


def read_params_file(params_file: Path = PARAMS_FILE) -> Any:
    """The whole of params.yaml as YAML reads it."""
    try:
        with open(params_file) as f:
            return yaml.safe_load(f)
    except FileNotFoundError:
        raise PipelineError(f"{params_file} not found: run from the repository root") from None
    except yaml.YAMLError as error:
        raise PipelineError(f"{params_file} is not valid YAML: {error}") from None


def load_params(cls: type, params_file: Path = PARAMS_FILE) -> Any:
    """Read section `cls.SECTION` of params.yaml into the frozen dataclass `cls`."""
    document = read_params_file(params_file) or {}
    return parse_section(cls, document.get(cls.SECTION))


@dataclass(frozen=True)
class Paths:
    """Every file and folder the stages exchange; dvc.yaml reads the same section."""

    SECTION: ClassVar[str] = "paths"
    raw: str
    processed: str
    model: str
    checkpoints: str
    params_check: str
    train_report: str
    eval_report: str
    plots: str


def load_paths(params_file: Path = PARAMS_FILE) -> Paths:
    return load_params(Paths, params_file)
