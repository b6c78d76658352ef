"""SQLite storage under BINSIGHT_HOME in WAL mode; each module declares its own tables."""
from __future__ import annotations

import sqlite3
from pathlib import Path

from core.config import home

DB_FILE = "binsight.sqlite3"


def db_path() -> Path:
    return home() / DB_FILE


def connect(schema: str = "") -> sqlite3.Connection:
    """A new connection (one per thread/process), WAL mode, rows as sqlite3.Row; runs `schema` if given."""
    conn = sqlite3.connect(db_path(), timeout=30, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=30000")
    if schema:
        conn.executescript(schema)
    return conn
