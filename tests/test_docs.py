"""Every Python block of the docs (docs/**/*.md and README.md) runs: the blocks of one page in
order, in one namespace (a page reads as one session), on the CPU. A block that cannot run here
(a GPU, torchrun, a DeepSpeed launcher, a package the test environment lacks) is marked ```text."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("**/*.md"))
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks(page: Path) -> list[str]:
    return BLOCK.findall(page.read_text())


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_page_runs(page):
    namespace: dict = {"__name__": "__docs__"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, code in enumerate(blocks(page)):
            exec(compile(code, f"{page.name} block {i}", "exec"), namespace)


HELP = re.compile(r"^```text\n\$ sam-fused (.*?)--help\n(.*?)^```", re.S | re.M)


def test_cli_page_shows_the_commands_own_help(monkeypatch, capsys):
    """docs/cli.md quotes `sam-fused [bench|compare] --help` as the code prints it at 100 columns."""
    from sam_fused.tools.cli import main

    monkeypatch.setenv("COLUMNS", "100")
    quoted = HELP.findall((ROOT / "docs" / "cli.md").read_text())
    assert [cmd.strip() for cmd, _ in quoted] == ["", "bench", "compare"]
    for cmd, text in quoted:
        with pytest.raises(SystemExit):
            main(cmd.split() + ["--help"])
        assert capsys.readouterr().out == text, f"docs/cli.md: `sam-fused {cmd}--help` differs from the code's"
