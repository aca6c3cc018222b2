"""Reading the JSON record beside a deep baseline's checkpoint without torch (for
``cmbbench methods info``); loading and verifying checkpoints is in :mod:`.deep_common`."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["checkpoint_summary"]


def checkpoint_summary(path: Path) -> dict:
    """What the JSON record beside a checkpoint says (no torch, nothing verified): sha256,
    recipe, training time and validation metrics; ``{}`` when there is no record."""
    meta_path = Path(path).with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {"file": str(path), "sha256": meta.get("sha256"),
            "recipe": (meta.get("recipe") or {}).get("name"),
            "command": meta.get("command"), "training_seconds": meta.get("training_seconds"),
            "datasets": {k: f"{v.get('name')} v{v.get('version')} ({len(v.get('scan_ids', []))}"
                            " scans)" for k, v in (meta.get("datasets") or {}).items()},
            "val": meta.get("val")}
