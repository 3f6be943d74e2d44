"""Print one of README.md's two fenced commands ('main' or 'test'), found between its markers.

.ci/run executes README's test command through this, and tests/test_readme.py checks both are there,
so README's promise and what CI runs are one text.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_command(name: str, text: str | None = None) -> str:
    text = README.read_text() if text is None else text
    match = re.search(rf"<!-- readme:{name} -->\s*```(?:bash|sh)?\n(.*?)\n```", text, re.S)
    if match is None:
        raise SystemExit(f"README.md has no <!-- readme:{name} --> command block")
    lines = [ln for ln in match.group(1).splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return " ".join(ln.rstrip("\\").strip() for ln in lines)


if __name__ == "__main__":
    print(readme_command(sys.argv[1] if len(sys.argv) > 1 else "test"))
