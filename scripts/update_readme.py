"""Regenerate the README's methods table from the registry (tests check they match)."""

from __future__ import annotations

import re
from pathlib import Path

import perspicio.methods as methods

README = Path(__file__).resolve().parent.parent / "README.md"


def render(text: str) -> str:
    table = methods.methods_table(markdown=True)
    return re.sub(
        r"<!-- methods-table -->.*?<!-- /methods-table -->",
        lambda _: f"<!-- methods-table -->\n{table}\n<!-- /methods-table -->",
        text,
        flags=re.S,
    )


if __name__ == "__main__":
    README.write_text(render(README.read_text()))
    print(f"updated {README}")
