"""The provider recipes of config/README.md, as YAML documents the interop suites run."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

README = Path(__file__).parents[2] / "config" / "README.md"


def recipe(title: str) -> dict[str, Any]:
    """The YAML block that follows the recipe whose bold title starts with ``title``."""
    text = README.read_text()
    match = re.search(rf"^\*\*{re.escape(title)}.*?```yaml\n(.*?)```", text, re.S | re.M)
    assert match, f"no recipe titled {title!r} in {README}"
    doc: dict[str, Any] = yaml.safe_load(match.group(1))
    return doc
