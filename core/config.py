"""Where Binsight keeps its own data, and the user's persisted settings."""
from __future__ import annotations

import json
import os
from pathlib import Path

from core.files import atomic_write_json

SETTINGS_FILE = "settings.json"


def home() -> Path:
    """The app's own folder (demo set, caches, database, runs): $BINSIGHT_HOME or ~/.binsight."""
    path = Path(os.environ.get("BINSIGHT_HOME") or Path.home() / ".binsight").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_settings() -> dict:
    path = home() / SETTINGS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def save_settings(**changes) -> dict:
    settings = load_settings()
    settings.update(changes)
    atomic_write_json(home() / SETTINGS_FILE, settings)
    return settings


def demo_dir() -> Path:
    return home() / "demo"


def runs_dir() -> Path:
    path = home() / "runs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir() -> Path | None:
    """The dataset the user chose: $BINSIGHT_DATA, else the persisted choice, else None (use the demo)."""
    chosen = os.environ.get("BINSIGHT_DATA") or load_settings().get("data_dir")
    return Path(chosen).expanduser() if chosen else None
