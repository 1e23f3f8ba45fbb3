"""The results as JSON (--json FILE): every figure of the tables, with the rounds, the
targets and the run's meta; or --instructions' counts."""

from __future__ import annotations

import json
from pathlib import Path

from .common import say


def write_json(path: str | None, results: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(results, indent=2) + "\n")
        say(f"results written to {path}")
