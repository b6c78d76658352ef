"""Where Binsight keeps its own data, and the user's persisted settings."""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from core.files import atomic_write_json

SETTINGS_FILE = "settings.json"
log = logging.getLogger(__name__)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _class_range(value) -> bool:
    if not isinstance(value, dict):
        return False
    lo, hi = value.get("lo", 1), value.get("hi", 5)
    return _whole(lo) and _whole(hi) and 0 <= lo <= hi <= 1000 and isinstance(value.get("top_bucket", False), bool)


def _share(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1


def _plain_values(value) -> bool:
    return isinstance(value, dict) and all(v is None or isinstance(v, (str, int, float, bool)) for v in value.values())


# What each setting must look like; a hand-edited or damaged value is ignored (its default applies), not a crash.
SETTING_CHECKS = {
    "class_range": lambda v: v is None or _class_range(v),
    "low_confidence_thresholds": lambda v: isinstance(v, dict) and all(_share(t) for t in v.values()),
    "data_dir": lambda v: v is None or (isinstance(v, str) and "\0" not in v),
    "current_run": lambda v: v is None or isinstance(v, str),
    "balance_pool_lists": lambda v: isinstance(v, str),
    "balance_pool_folder": lambda v: isinstance(v, str),
    "cache_caps_mb": lambda v: v is None or _plain_values(v),
    "s3": lambda v: v is None or _plain_values(v),
}


def home() -> Path:
    """The app's own folder (demo set, caches, database, runs): $BINSIGHT_HOME or ~/.binsight."""
    path = Path(os.environ.get("BINSIGHT_HOME") or Path.home() / ".binsight").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _read_settings() -> dict | None:
    """settings.json as a dict: {} when there is none, None when it is there but unusable."""
    try:
        settings = json.loads((home() / SETTINGS_FILE).read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError):
        return None
    return settings if isinstance(settings, dict) else None


def load_settings() -> dict:
    """The persisted settings; values that are not what their setting takes are left out (their defaults apply)."""
    settings = _read_settings()
    if settings is None:
        log.warning("%s is not a JSON object of settings; the defaults apply", home() / SETTINGS_FILE)
        return {}
    wrong = [key for key, check in SETTING_CHECKS.items() if key in settings and not check(settings[key])]
    if wrong:
        log.warning("%s: ignoring %s (not a usable value)", home() / SETTINGS_FILE, ", ".join(wrong))
    return {key: value for key, value in settings.items() if key not in wrong}


def save_settings(**changes) -> dict:
    path = home() / SETTINGS_FILE
    settings = _read_settings()
    if settings is None:  # an unusable file is kept aside for the user, not overwritten
        os.replace(path, path.with_name(SETTINGS_FILE + ".unreadable"))
        settings = {}
    settings.update(changes)
    atomic_write_json(path, settings)
    return {key: value for key, value in settings.items()
            if key not in SETTING_CHECKS or SETTING_CHECKS[key](value)}


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
