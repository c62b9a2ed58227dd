"""Command line: ``sam-fused bench`` and ``sam-fused compare`` (also ``python -m sam_fused ...``)."""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sam-fused", description=plain(__doc__))
    sub = parser.add_subparsers(dest="command", required=True)
    from .bench.cli import add_parser as add_bench
    from .compare import add_parser as add_compare

    add_bench(sub)
    add_compare(sub)
    args = parser.parse_args(argv)
    args.command_line = "sam-fused " + " ".join(sys.argv[1:] if argv is None else argv)  # for captions
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
