"""SQLite storage under BINSIGHT_HOME in WAL mode: every table, its versioned migrations, and connection helpers."""
from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path

from filelock import FileLock

from core.config import home
from core.errors import BinsightError

DB_FILE = "binsight.sqlite3"

# Migration N (1-based) brings the schema from version N-1 to N: a sequence of SQL statements, or a function of the
# connection. Each runs in its own transaction that also sets PRAGMA user_version = N. Append only; never edit one
# that has shipped. Version 0 is a database made before migrations existed: its tables are exactly migration 1's,
# hence IF NOT EXISTS there.
Migration = Sequence[str] | Callable[[sqlite3.Connection], None]

MIGRATIONS: list[Migration] = [
    # 1: the job queue, the runs registry, the worker rows, and the annotators' decisions.
    (
        """CREATE TABLE IF NOT EXISTS jobs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            kind TEXT NOT NULL,
            params TEXT NOT NULL,
            device TEXT NOT NULL DEFAULT 'auto',
            status TEXT NOT NULL DEFAULT 'queued',
            progress TEXT NOT NULL DEFAULT '{}',
            pid INTEGER,
            host TEXT,
            worker TEXT,
            slot TEXT,
            created REAL NOT NULL,
            started REAL,
            finished REAL,
            heartbeat REAL,
            log_path TEXT,
            run_dir TEXT,
            error TEXT,
            cancel_requested INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs(status, id)",
        """CREATE TABLE IF NOT EXISTS runs (
            id TEXT PRIMARY KEY,
            job_id INTEGER,
            path TEXT NOT NULL,
            params TEXT NOT NULL DEFAULT '{}',
            metrics TEXT NOT NULL DEFAULT '{}',
            extra TEXT NOT NULL DEFAULT '{}',
            created REAL NOT NULL
        )""",
        """CREATE TABLE IF NOT EXISTS workers (
            id TEXT PRIMARY KEY,
            slot TEXT NOT NULL,
            pid INTEGER NOT NULL,
            host TEXT NOT NULL,
            started REAL NOT NULL,
            heartbeat REAL NOT NULL,
            job_id INTEGER
        )""",
        """CREATE TABLE IF NOT EXISTS annotations (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            dataset_key TEXT NOT NULL,
            photo TEXT NOT NULL,
            annotator TEXT NOT NULL,
            created_at TEXT NOT NULL,
            old_count INTEGER,
            new_count INTEGER,
            status TEXT NOT NULL CHECK (status IN ('confirmed', 'corrected', 'unclear')),
            note TEXT NOT NULL DEFAULT ''
        )""",
        "CREATE INDEX IF NOT EXISTS annotations_photo ON annotations (dataset_key, photo, id)",
    ),
    # 2: who launched a job (NULL for jobs queued before).
    ("ALTER TABLE jobs ADD COLUMN user TEXT",),
    # 3: a job whose worker died is requeued: how many times it was started, and how many requeues it may have
    # (NULL for jobs queued before: the current BINSIGHT_JOB_RETRIES applies).
    ("ALTER TABLE jobs ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0",
     "ALTER TABLE jobs ADD COLUMN retries INTEGER"),
    # 4: reviewer outcomes (the record is right but the items are hidden; the model is wrong), the queue a decision
    # was made from, and undo as a mark on the undone decision (it no longer counts) instead of a new decision.
    lambda conn: _annotations_v4(conn),
]
LATEST_VERSION = len(MIGRATIONS)


def _annotations_v4(conn: sqlite3.Connection) -> None:
    """SQLite cannot widen a CHECK: the annotations table is rebuilt with the new statuses and columns, rows kept."""
    conn.execute("""CREATE TABLE annotations_v4 (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        dataset_key TEXT NOT NULL,
        photo TEXT NOT NULL,
        annotator TEXT NOT NULL,
        created_at TEXT NOT NULL,
        old_count INTEGER,
        new_count INTEGER,
        status TEXT NOT NULL CHECK (status IN ('confirmed', 'corrected', 'unclear', 'hidden', 'model_wrong')),
        note TEXT NOT NULL DEFAULT '',
        queue TEXT NOT NULL DEFAULT '',
        undone_at TEXT,
        undone_by TEXT
    )""")
    conn.execute("INSERT INTO annotations_v4 (id, dataset_key, photo, annotator, created_at, old_count, new_count, "
                 "status, note) SELECT id, dataset_key, photo, annotator, created_at, old_count, new_count, status, "
                 "note FROM annotations")
    conn.execute("DROP TABLE annotations")
    conn.execute("ALTER TABLE annotations_v4 RENAME TO annotations")
    conn.execute("CREATE INDEX annotations_photo ON annotations (dataset_key, photo, id)")

_migrated: set[str] = set()  # database files this process has brought up to date
_migrated_lock = threading.Lock()


class DatabaseError(BinsightError):
    """A database this version of Binsight cannot use; the message says why."""


def db_path() -> Path:
    return home() / DB_FILE


def _open(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout=30000")
    if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
        # Switching to WAL needs the database to itself and SQLite does not wait for that ("database is locked"),
        # so processes opening a new database take turns; once set, WAL is a property of the file.
        with FileLock(f"{path}.lock", timeout=60):
            conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def connect() -> sqlite3.Connection:
    """A new connection (one per thread/process) to an up-to-date database, rows as sqlite3.Row; the caller closes it.

    Autocommit mode: each statement commits on its own unless the caller begins a transaction (see transaction()).
    """
    path = db_path()
    conn = _open(path)
    key = str(path.resolve())
    if key not in _migrated:
        with _migrated_lock:
            if key not in _migrated:
                try:
                    migrate(conn)
                except BaseException:
                    conn.close()
                    raise
                _migrated.add(key)
    return conn


def connection():
    """`with db.connection() as conn:` a connection, closed at the end (each statement commits on its own)."""
    return closing(connect())


@contextmanager
def transaction() -> Iterator[sqlite3.Connection]:
    """`with db.transaction() as conn:` one write transaction, taken up front (BEGIN IMMEDIATE) so check-then-update
    steps cannot interleave with another process's; committed at the end, rolled back on any exception."""
    with connection() as conn:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


def schema_version(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchone()[0]


def migrate(conn: sqlite3.Connection) -> int:
    """Apply the migrations this database lacks, one transaction each; returns the version reached.

    Safe with several processes: each step re-reads the version under BEGIN IMMEDIATE, so a step another process
    has just applied is skipped. Running it on an up-to-date database changes nothing.
    """
    while (version := schema_version(conn)) < LATEST_VERSION:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = schema_version(conn)
            if version < LATEST_VERSION:
                step = MIGRATIONS[version]
                if callable(step):
                    step(conn)
                else:
                    for statement in step:
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    if version > LATEST_VERSION:
        raise DatabaseError(f"{db_path()} has schema version {version}, newer than this Binsight knows "
                            f"({LATEST_VERSION}): it was written by a newer version; update Binsight to use it.")
    return version
