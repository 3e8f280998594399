"""adapters_store/ on disk: one folder per adapter (PEFT files + card.json)."""

from __future__ import annotations

import json
from pathlib import Path


def adapter_dirs(root: Path) -> dict[str, Path]:
    """name -> folder of every adapter in the store (a folder with adapter_config.json)."""
    root = Path(root)
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if (p / "adapter_config.json").is_file()}


def read_card(folder: Path) -> dict:
    """card.json of an adapter folder ({} when it has none)."""
    path = Path(folder) / "card.json"
    return json.loads(path.read_text()) if path.is_file() else {}
