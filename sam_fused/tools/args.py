"""Checks of the command line shared by ``sam-fused bench`` and ``sam-fused compare``.

The validators are argparse ``type=`` functions: a bad value ends the command with argparse's own
one-line error (``error: argument --x: ...``, exit code 2) before anything runs. The output-path
checks run right after parsing; they look at the file system and create nothing.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Callable, Iterable

# the largest value the optimizers take for a radius, an alpha or a learning rate
LARGEST = 1e30


def _int(text: str, what: str) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def int_at_least(low: int, what: str | None = None) -> Callable[[str], int]:
    """An integer >= ``low``."""
    what = what or ("a positive integer (1, 2, ...)" if low == 1 else
                    "a non-negative integer (0, 1, ...)" if low == 0 else f"an integer of at least {low}")

    def parse(text: str) -> int:
        value = _int(text, what)
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = "integer"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def _float(text: str, what: str) -> float:
    try:
        value = float(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def finite_positive_float(text: str) -> float:
    """A finite number > 0 (at most 1e30)."""
    what = f"a finite positive number (at most {LARGEST:g})"
    value = _float(text, what)
    if not 0.0 < value <= LARGEST:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def finite_non_negative_float(text: str) -> float:
    """A finite number >= 0 (at most 1e30)."""
    what = f"a finite non-negative number (at most {LARGEST:g})"
    value = _float(text, what)
    if not 0.0 <= value <= LARGEST:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def probability(text: str) -> float:
    """A fraction in [0, 1)."""
    what = "a fraction in [0, 1)"
    value = _float(text, what)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def _got(text: str, part: str) -> str:
    return f"got {text!r}" if str(text).strip() == part else f"got {text!r} ({part!r})"


def _parts(text: str, what: str) -> list[str]:
    parts = [p.strip() for p in str(text).split(",")]
    if not parts or any(not p for p in parts):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return parts


def float_list(item: Callable[[str], float], what: str) -> Callable[[str], list[float]]:
    """Comma-separated values, each checked by ``item`` (one of the validators above)."""

    def parse(text: str) -> list[float]:
        out = []
        for part in _parts(text, what):
            try:
                out.append(item(part))
            except argparse.ArgumentTypeError:
                raise argparse.ArgumentTypeError(f"expected {what}, {_got(text, part)}") from None
        return out

    parse.__name__ = "list"
    return parse


def count_list(what: str, none: bool = False) -> Callable[[str], list[int]]:
    """Comma-separated counts (positive; ``1e6`` is accepted as a whole number); ``none`` allows
    the word 'none' for an empty list."""

    def parse(text: str) -> list[int]:
        if none and str(text).strip().lower() == "none":
            return []
        out = []
        for part in _parts(text, what):
            try:
                value = float(part)
            except ValueError:
                value = float("nan")
            if not (math.isfinite(value) and value >= 1 and value == int(value)):
                raise argparse.ArgumentTypeError(f"expected {what}, {_got(text, part)}")
            out.append(int(value))
        return out

    parse.__name__ = "list"
    return parse


def choice_list(choices: Iterable[str], none: bool = False) -> Callable[[str], list[str]]:
    """Comma-separated names from ``choices``; ``none`` allows the word 'none' for an empty list."""
    choices = list(choices)
    what = "comma-separated names from " + ", ".join(choices) + (", or 'none'" if none else "")

    def parse(text: str) -> list[str]:
        if none and str(text).strip().lower() == "none":
            return []
        parts = _parts(text, what)
        bad = [p for p in parts if p not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"expected {what}, {_got(text, bad[0])}")
        return parts

    parse.__name__ = "list"
    return parse


def device(text: str) -> str:
    """A device torch accepts that exists here: ``cpu``, or ``cuda``/``cuda:N`` with such a GPU."""
    import torch

    what = "cpu, cuda or cuda:N"
    try:
        dev = torch.device(str(text).strip())
    except (RuntimeError, TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a device torch knows ({what}), got {text!r}") from None
    if dev.type == "cpu":
        return "cpu"
    if dev.type != "cuda":
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r} (only the CPU and CUDA GPUs are measured)")
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: torch sees no CUDA device here")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA device(s), cuda:0 to "
                                         f"cuda:{count - 1}")
    return str(dev)


def _existing_ancestor(path: Path) -> Path:
    for parent in path.parents:
        if parent.exists():
            return parent
    return Path(path.anchor or ".")


def _creatable(path: Path) -> str | None:
    """Why ``path`` (absent) cannot be created as a file or folder, or None."""
    anchor = _existing_ancestor(path)
    if not anchor.is_dir():
        return f"{anchor} is a file, not a folder"
    if not os.access(anchor, os.W_OK | os.X_OK):
        return f"{anchor} is not writable"
    return None


def output_file_problem(path: Path) -> str | None:
    """Why the file ``path`` cannot be written (its folder made as needed), or None. Creates nothing."""
    path = Path(path).absolute()
    if path.is_dir():
        return f"{path} is a folder; give a file name"
    if path.exists():
        return None if os.access(path, os.W_OK) else f"{path} is not writable"
    return _creatable(path)


def output_dir_problem(path: Path, files: Iterable[str] = ()) -> str | None:
    """Why the folder ``path`` (made as needed) cannot take ``files``, or None. Creates nothing."""
    path = Path(path).absolute()
    if path.exists():
        if not path.is_dir():
            return f"{path} is a file, not a folder"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"{path} is not writable"
        for name in files:
            problem = output_file_problem(path / name)
            if problem:
                return problem
        return None
    return _creatable(path)
