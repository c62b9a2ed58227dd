"""Command line: ``sam-fused bench`` and ``sam-fused compare`` (also ``python -m sam_fused ...``)."""

from __future__ import annotations

import argparse
import sys

from .common import plain


def line_buffered_stdout() -> None:
    """Each line of the output reaches a pipe (``| tee``, a log) when printed, not at exit."""
    try:
        sys.stdout.reconfigure(line_buffering=True)
    except (AttributeError, ValueError, OSError):  # a stream without it (a test's capture, a closed one)
        pass


class Parser(argparse.ArgumentParser):
    """argparse's parser with a refusal in one line: the argument, what it accepts, where the help
    is (argparse's own prints the whole usage first); exit code 2, as argparse's."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


def main(argv: list[str] | None = None) -> int:
    line_buffered_stdout()
    parser = Parser(prog="sam-fused", description=plain(__doc__))
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
