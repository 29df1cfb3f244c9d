"""Stored responses: an embedded SQLite database, so conversations survive a restart.

One table, `responses(id, created_at, data)`, `data` being a JSON document (the public response
object and the conversation items a follow-up replays). The file lives in the directory given to
the constructor (`responses.sqlite3`), in WAL mode so that readers do not wait on the writer.

Retention: every insert first deletes what is older than `max_age_s` and then all but the newest
`max_count - 1` records, so the table never holds more than `max_count` rows nor grows without
bound; reads also treat a record older than `max_age_s` as gone. One connection is shared by all
threads behind a lock; each call is one short transaction (async callers use `asyncio.to_thread`).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

DEFAULT_MAX_AGE_S = 30 * 24 * 3600.0
DEFAULT_MAX_COUNT = 10_000
FILE_NAME = "responses.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_created_at ON responses (created_at);
"""


class ResponseStore:
    """Responses by id, as JSON, with retention by age and by count."""

    def __init__(
        self,
        directory: Path,
        *,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        max_count: int = DEFAULT_MAX_COUNT,
    ) -> None:
        if max_age_s <= 0 or max_count < 1:
            raise ValueError(f"retention must be positive: {max_age_s=}, {max_count=}")
        self.max_age_s = max_age_s
        self.max_count = max_count
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / FILE_NAME
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)

    def put(self, response_id: str, data: dict[str, Any], created_at: float) -> None:
        """Insert or replace a record; an insert first prunes by age and by count."""
        text = json.dumps(data, ensure_ascii=False)
        with self._lock, self._db:
            exists = self._db.execute(
                "SELECT 1 FROM responses WHERE id = ?", (response_id,)
            ).fetchone()
            if exists is None:
                self._prune()
            self._db.execute(
                "INSERT OR REPLACE INTO responses (id, created_at, data) VALUES (?, ?, ?)",
                (response_id, created_at, text),
            )

    def get(self, response_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT data FROM responses WHERE id = ? AND created_at >= ?",
                (response_id, time.time() - self.max_age_s),
            ).fetchone()
        return None if row is None else json.loads(row[0])

    def delete(self, response_id: str) -> bool:
        with self._lock, self._db:
            cursor = self._db.execute("DELETE FROM responses WHERE id = ?", (response_id,))
        return cursor.rowcount > 0

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _prune(self) -> None:
        """Make room for one more record (the caller holds the lock, inside a transaction)."""
        self._db.execute(
            "DELETE FROM responses WHERE created_at < ?", (time.time() - self.max_age_s,)
        )
        self._db.execute(
            "DELETE FROM responses WHERE id NOT IN "
            "(SELECT id FROM responses ORDER BY created_at DESC, rowid DESC LIMIT ?)",
            (self.max_count - 1,),
        )
