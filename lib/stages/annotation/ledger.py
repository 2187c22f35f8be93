"""The annotation ledger: an SQLite file with entries (case x round x tier), cases, rounds, events.

Every change that belongs together (a case's tier rows and its accepted status) is one
transaction, so a run killed mid-round resumes without losing or duplicating entries.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    case_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    tier TEXT NOT NULL,
    actor TEXT NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT NOT NULL,
    minutes REAL,  -- estimated by the time model; NULL for human work (not timed)
    voxels_changed INTEGER NOT NULL,
    ml_changed REAL NOT NULL,
    vertebrae_relabelled INTEGER NOT NULL,
    dice_before REAL,
    dice_after REAL,
    hard_case INTEGER NOT NULL DEFAULT 0,
    variant TEXT NOT NULL DEFAULT '',
    sent_to_expert INTEGER NOT NULL DEFAULT 0,
    model_version INTEGER NOT NULL,
    note TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (case_id, round, tier)
);
CREATE TABLE IF NOT EXISTS cases (
    case_id TEXT PRIMARY KEY,
    split TEXT NOT NULL,
    round INTEGER,
    status TEXT NOT NULL,
    mask_path TEXT,
    pre_dice REAL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    split TEXT NOT NULL,
    n_cases INTEGER NOT NULL,
    model_version INTEGER NOT NULL,
    model_path TEXT,
    next_model_version INTEGER,
    next_model_path TEXT,
    status TEXT NOT NULL,
    finished_at TEXT
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    case_id TEXT,
    round INTEGER,
    kind TEXT NOT NULL,
    message TEXT NOT NULL
);
"""


ENTRY_COLUMNS = ("case_id", "round", "tier", "actor", "started_at", "finished_at", "minutes",
                 "voxels_changed", "ml_changed", "vertebrae_relabelled", "dice_before", "dice_after",
                 "hard_case", "variant", "sent_to_expert", "model_version", "note")


def now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")


class Ledger:
    """The annotation ledger: an SQLite file with entries, cases, rounds and events.

    Every change that belongs together (a case's tier rows + its accepted status) is one
    transaction: either all of it is on disk or none of it is.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.executescript(_SCHEMA)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @contextlib.contextmanager
    def transaction(self):
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # -- cases
    def enqueue(self, case_ids: Iterable[str], splits: Iterable[str]) -> None:
        """Add cases to the queue (existing cases keep their status)."""
        with self.transaction() as c:
            c.executemany("INSERT OR IGNORE INTO cases(case_id, split, status, updated_at) VALUES (?,?, 'queued', ?)",
                          [(cid, sp, now()) for cid, sp in zip(case_ids, splits, strict=True)])

    def case_status(self, case_id: str) -> str | None:
        row = self.conn.execute("SELECT status FROM cases WHERE case_id=?", (case_id,)).fetchone()
        return row[0] if row else None

    def accepted(self, split: str | None = None) -> list[str]:
        q = "SELECT case_id FROM cases WHERE status='accepted'" + (" AND split=?" if split else "") + " ORDER BY round, case_id"
        return [r[0] for r in self.conn.execute(q, (split,) if split else ())]

    def queued(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT case_id FROM cases WHERE status!='accepted' ORDER BY case_id")]

    def record_case(self, case_id: str, round_: int, rows: Sequence[dict], mask_path: str, pre_dice: float | None) -> None:
        """Write a case's tier rows and mark it accepted, in one transaction.

        Raises:
            sqlite3.IntegrityError: if rows for this case and round already exist (never
                silently duplicated).
        """
        with self.transaction() as c:
            c.executemany(f"INSERT INTO entries({', '.join(ENTRY_COLUMNS)}) VALUES ({', '.join('?' * len(ENTRY_COLUMNS))})",
                          [tuple(r[k] for k in ENTRY_COLUMNS) for r in rows])
            c.execute("UPDATE cases SET status='accepted', round=?, mask_path=?, pre_dice=?, updated_at=? WHERE case_id=?",
                      (round_, mask_path, pre_dice, now(), case_id))

    def log_event(self, kind: str, message: str, case_id: str | None = None, round_: int | None = None) -> None:
        with self.transaction() as c:
            c.execute("INSERT INTO events(at, case_id, round, kind, message) VALUES (?,?,?,?,?)",
                      (now(), case_id, round_, kind, message))

    # -- rounds
    def round_row(self, round_: int) -> dict | None:
        cur = self.conn.execute("SELECT * FROM rounds WHERE round=?", (round_,))
        row = cur.fetchone()
        return dict(zip([d[0] for d in cur.description], row, strict=True)) if row else None

    def start_round(self, round_: int, split: str, n_cases: int, model_version: int, model_path: str | None) -> None:
        with self.transaction() as c:
            c.execute("INSERT OR IGNORE INTO rounds(round, split, n_cases, model_version, model_path, status) "
                      "VALUES (?,?,?,?,?, 'running')", (round_, split, n_cases, model_version, model_path))

    def finish_round(self, round_: int, next_version: int, next_path: str | None) -> None:
        with self.transaction() as c:
            c.execute("UPDATE rounds SET status='done', next_model_version=?, next_model_path=?, finished_at=? WHERE round=?",
                      (next_version, next_path, now(), round_))

    # -- tables
    def entries(self) -> pd.DataFrame:
        return pd.read_sql_query("SELECT * FROM entries ORDER BY round, case_id, "
                                 "CASE tier WHEN 'junior' THEN 0 WHEN 'senior_1' THEN 1 WHEN 'senior_2' THEN 2 "
                                 "WHEN 'expert' THEN 3 WHEN 'double_check' THEN 4 ELSE 5 END", self.conn)

    def cases(self) -> pd.DataFrame:
        return pd.read_sql_query("SELECT * FROM cases ORDER BY case_id", self.conn)

    def rounds(self) -> pd.DataFrame:
        return pd.read_sql_query("SELECT * FROM rounds ORDER BY round", self.conn)

    def events(self) -> pd.DataFrame:
        return pd.read_sql_query("SELECT * FROM events ORDER BY id", self.conn)
