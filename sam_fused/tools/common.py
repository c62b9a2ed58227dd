"""What the tools share: the machine's description for the records every figure carries, the load
that marks a busy run, and ``--help`` text from docstrings. Imported by the subcommands, importing
none of them (no circle between the tools' modules)."""

from __future__ import annotations

import os
import platform
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
