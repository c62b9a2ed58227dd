"""Command line: ``sam-fused bench`` and ``sam-fused compare`` (also ``python -m sam_fused ...``)."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path


def plain(doc: str | None) -> str:
    """A module docstring as --help text: without reStructuredText's double backticks."""
    return (doc or "").replace("``", "")


def cpu_name() -> str:
    """The CPU's model name (for the records every figure carries)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def cpu_count() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load() -> float | None:
    """The 1-minute load average (None where the system has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def busy_note(load_start: float | None, load_end: float | None, cores: int) -> str | None:
    """A short mark for figures timed on a busy machine (load average above the cores at the start
    or the end of the run), or None on a quiet one."""
    loads = [v for v in (load_start, load_end) if v is not None]
    if not loads or max(loads) <= cores:
        return None
    return f"machine busy (load average up to {max(loads):.1f} on {cores} cores): timings unreliable"


def line_buffered_stdout() -> None:
    """Each line of the output reaches a pipe (``| tee``, a log) when printed, not at exit."""
    try:
        sys.stdout.reconfigure(line_buffering=True)
    except (AttributeError, ValueError, OSError):  # a stream without it (a test's capture, a closed one)
        pass


def main(argv: list[str] | None = None) -> int:
    line_buffered_stdout()
    parser = argparse.ArgumentParser(prog="sam-fused", description=plain(__doc__))
    sub = parser.add_subparsers(dest="command", required=True)
    from .bench.cli import add_parser as add_bench
    from .compare import add_parser as add_compare

    add_bench(sub)
    add_compare(sub)
    args = parser.parse_args(argv)
    # the checks that need several options or the file system: before any work, argparse's way
    args.check(args, sub.choices[args.command])
    args.command_line = "sam-fused " + " ".join(sys.argv[1:] if argv is None else argv)  # for captions
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
