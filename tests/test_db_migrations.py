"""Schema migrations: a database made before they existed upgrades without loss; a new one starts at the latest."""
import sqlite3

import pytest

from core import db
from core.data.labels import annotations
from core.jobs import queue as jobs
from core.jobs import runs

# "The v0 database": the tables exactly as the code wrote them before db.py versioned its schema (user_version 0).
V0_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
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
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs(status, id);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    job_id INTEGER,
    path TEXT NOT NULL,
    params TEXT NOT NULL DEFAULT '{}',
    metrics TEXT NOT NULL DEFAULT '{}',
    extra TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    slot TEXT NOT NULL,
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    started REAL NOT NULL,
    heartbeat REAL NOT NULL,
    job_id INTEGER
);
CREATE TABLE IF NOT EXISTS annotations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset_key TEXT NOT NULL,
    photo TEXT NOT NULL,
    annotator TEXT NOT NULL,
    created_at TEXT NOT NULL,
    old_count INTEGER,
    new_count INTEGER,
    status TEXT NOT NULL CHECK (status IN ('confirmed', 'corrected', 'unclear')),
    note TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS annotations_photo ON annotations (dataset_key, photo, id);
"""


def columns(conn, table):
    return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]


def make_v0_database(run_dir):
    path = db.db_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.executescript(V0_SCHEMA)
    conn.execute("INSERT INTO jobs (kind, params, device, status, created, started, finished, run_dir) "
                 "VALUES ('train', '{\"backbone\": \"resnet18\", \"device\": \"cpu\"}', 'cpu', 'done', 1.0, 2.0, 3.0, ?)",
                 (str(run_dir),))
    conn.execute("INSERT INTO runs (id, job_id, path, params, metrics, created) "
                 "VALUES (?, 1, ?, '{\"backbone\": \"resnet18\"}', '{\"test\": {\"accuracy\": 0.5}}', 4.0)",
                 (run_dir.name, str(run_dir)))
    conn.executemany(
        "INSERT INTO annotations (dataset_key, photo, annotator, created_at, old_count, new_count, status, note) "
        "VALUES ('demo', ?, 'alice', ?, ?, ?, ?, '')",
        [("00001.jpg", "2024-01-01T00:00:00+00:00", 2, 3, "corrected"),
         ("00002.jpg", "2024-01-01T00:00:01+00:00", 4, None, "unclear")])
    conn.commit()
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
    conn.close()


def test_a_database_from_before_migrations_upgrades_and_keeps_every_row(tmp_path):
    run_dir = tmp_path / "run-a"
    run_dir.mkdir()
    make_v0_database(run_dir)

    [job] = jobs.list_jobs()
    assert (job.id, job.kind, job.status, job.device, job.params["backbone"]) == (1, "train", "done", "cpu", "resnet18")
    assert job.user is None and job.run_dir == str(run_dir)
    run = runs.get_run("run-a")
    assert run.job_id == 1 and run.params == {"backbone": "resnet18"} and runs.final_metrics(run) == {"accuracy": 0.5}
    assert annotations.label_overrides("demo") == {"00001.jpg": 3, "00002.jpg": None}
    assert annotations.history("demo")["annotator"].tolist() == ["alice", "alice"]

    with db.connection() as conn:
        assert db.schema_version(conn) == db.LATEST_VERSION == len(db.MIGRATIONS)
        assert columns(conn, "jobs")[-3:] == ["user", "attempts", "retries"]  # migrations 2 and 3
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    # the upgraded database takes new rows in the new shape, next to the old ones
    new = jobs.submit("sleep", {"seconds": 1}, user="bob")
    assert jobs.get(new.id).user == "bob" and [j.id for j in jobs.list_jobs()] == [new.id, 1]
    saved = annotations.save_decision("demo", "00001.jpg", "bob", 4, recorded_count=2)
    assert saved.decision.old_count == 3  # the history read from the old rows goes on unbroken
    with db.connection() as conn:  # migration 4: the reviewer outcomes fit the rebuilt table, its index is back
        assert columns(conn, "annotations")[-3:] == ["queue", "undone_at", "undone_by"]
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'annotations_photo'").fetchone()
    hidden = annotations.save_decision("demo", "00001.jpg", "bob", None, recorded_count=2, outcome="hidden")
    assert (hidden.decision.status, hidden.decision.new_count, hidden.decision.id) == ("hidden", 4, 4)


def test_a_new_database_starts_at_the_latest_version_and_migrating_again_changes_nothing():
    jobs.submit("sleep", {"seconds": 1})
    with db.connection() as conn:
        assert db.schema_version(conn) == db.LATEST_VERSION
        schema = conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
        assert {"jobs", "runs", "workers", "annotations"} <= {row["name"] for row in schema}
        assert db.migrate(conn) == db.LATEST_VERSION
        assert db.migrate(conn) == db.LATEST_VERSION
        assert conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall() == schema
    assert len(jobs.list_jobs()) == 1


def test_a_failing_migration_leaves_the_database_at_its_previous_version(tmp_path, monkeypatch):
    make_v0_database(tmp_path)

    def broken(conn):
        conn.execute("ALTER TABLE jobs ADD COLUMN half_done TEXT")
        raise RuntimeError("migration bug")

    monkeypatch.setattr(db, "MIGRATIONS", db.MIGRATIONS + [broken])
    monkeypatch.setattr(db, "LATEST_VERSION", len(db.MIGRATIONS))
    with pytest.raises(RuntimeError, match="migration bug"):
        db.connect()
    conn = sqlite3.connect(db.db_path())
    assert conn.execute("PRAGMA user_version").fetchone()[0] == db.LATEST_VERSION - 1  # earlier steps stay applied
    assert "half_done" not in columns(conn, "jobs") and "user" in columns(conn, "jobs")
    conn.close()


def test_a_database_from_a_newer_binsight_is_refused_with_the_reason():
    path = db.db_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {db.LATEST_VERSION + 1}")
    conn.close()
    with pytest.raises(db.DatabaseError, match="newer"):
        jobs.list_jobs()
