"""The replay buffer (ACADEMY §2): every run's decision points and their outcomes, in SQLite.

One file per academy, ``<academy_dir>/replay.sqlite``, is the record of truth the nightly
sessions learn from.  It is written in WAL mode with ``synchronous=FULL``, one transaction
per write, so a committed row survives a kill -9 or a power cut and a killed run loses at
most the write it was making.  Readers never wait for a writer (WAL); writers -- several
runs may share one academy -- wait for each other up to ``BUSY_TIMEOUT_S`` rather than fail.

Tables (nested data is strict JSON text, non-finite numbers as in ``tolaria.records``):

* ``runs``: one row per run directory (its resolved path is the run id); a resume updates it.
* ``decision_points``: ``(run_id, point_id)`` is unique; a point emitted again (a resumed run
  re-running the epochs after its checkpoint) replaces the old one and drops its outcome.
* ``outcomes``: at most one per decision point, with the reward of :mod:`.reward`.
* ``attempts``: the policy registry's history (nightly trainings, promotions, reverts).

The schema's version is ``PRAGMA user_version`` and the file is marked as ours by
``PRAGMA application_id``: a newer schema, or a database that is not a replay buffer, is
refused with one :class:`~tolaria.errors.ReplayError` line before anything in it changes.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tolaria import records
from tolaria.errors import ReplayError, ReplaySchemaError, TolariaError

REPLAY_FILE = "replay.sqlite"
REPLAY_SCHEMA = 1
#: "Tola" in ASCII: what tells our file from any other SQLite database.
APPLICATION_ID = 0x546F6C61
#: How long a write waits for another run's write.  Each write is a few rows, so a wait
#: this long means a stuck process, not a busy academy.
BUSY_TIMEOUT_S = 30.0

_SCHEMA = f"""
CREATE TABLE runs (
    run_id         TEXT PRIMARY KEY,
    task           TEXT NOT NULL,
    fingerprint    TEXT NOT NULL,
    config         TEXT NOT NULL,
    hardware       TEXT NOT NULL,
    policy         TEXT NOT NULL,
    policy_version TEXT,
    status         TEXT NOT NULL,
    metrics        TEXT,
    started        REAL NOT NULL,
    updated        REAL NOT NULL
);
CREATE INDEX runs_by_task ON runs (task);
CREATE TABLE decision_points (
    run_id         TEXT NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
    point_id       TEXT NOT NULL,
    number         INTEGER NOT NULL,
    epoch          INTEGER NOT NULL,
    attempt        INTEGER NOT NULL,
    slot           INTEGER NOT NULL,
    observation    TEXT NOT NULL,
    candidates     TEXT NOT NULL,
    chosen         INTEGER NOT NULL,
    propensity     REAL,
    policy         TEXT NOT NULL,
    policy_version TEXT,
    time           REAL NOT NULL,
    PRIMARY KEY (run_id, point_id)
);
CREATE TABLE outcomes (
    run_id   TEXT NOT NULL,
    point_id TEXT NOT NULL,
    epoch    INTEGER,
    result   TEXT NOT NULL,
    outcome  TEXT NOT NULL,
    reward   REAL NOT NULL,
    time     REAL NOT NULL,
    PRIMARY KEY (run_id, point_id),
    FOREIGN KEY (run_id, point_id) REFERENCES decision_points (run_id, point_id)
        ON DELETE CASCADE
);
CREATE TABLE attempts (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    version  TEXT NOT NULL,
    parent   TEXT,
    kind     TEXT NOT NULL,
    outcome  TEXT NOT NULL,
    detail   TEXT NOT NULL,
    started  REAL NOT NULL,
    finished REAL NOT NULL
);
PRAGMA application_id = {APPLICATION_ID};
PRAGMA user_version = {REPLAY_SCHEMA};
"""

#: The fields of a decision point (``tolaria.records.DecisionPoint``), as ``add_point`` takes them.
POINT_FIELDS = ("point_id", "epoch", "attempt", "slot", "observation", "candidates", "chosen",
                "propensity", "policy", "policy_version")
_POINT_ID = re.compile(r"p(\d+)")
_WAY_OUT = "point academy.dir elsewhere (academy.replay=false records nothing)"


class ReplayBuffer:
    """The academy's SQLite replay buffer (see the module docstring).  Every failure of the
    file -- not ours, a newer schema, a full disk, a lock held past the timeout -- is one
    :class:`~tolaria.errors.ReplayError` naming the file and what was being done."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise ReplayError(f"{self.path}: cannot open the replay buffer ({exc})") from None
        try:
            with self._failures("open the replay buffer"):
                self._check_schema()  # before WAL mode changes the file of someone else
                self._db.execute("PRAGMA journal_mode = WAL")
                self._db.execute("PRAGMA synchronous = FULL")
                self._db.execute("PRAGMA foreign_keys = ON")
            if self._check_schema() == 0:  # a new file: only then is a write lock needed
                with self._transaction("create the replay buffer"):
                    if self._check_schema() == 0:  # another run may have just made it
                        for statement in _SCHEMA.split(";"):
                            if statement.strip():
                                self._db.execute(statement)
        except BaseException:
            self._db.close()
            raise

    @classmethod
    def in_academy(cls, academy_dir: Path) -> ReplayBuffer:
        return cls(Path(academy_dir) / REPLAY_FILE)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ReplayBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- runs ----------------------------------------------------------------------------
    def begin_run(self, run_id: str, *, task: str, fingerprint: dict, config: dict,
                  hardware: dict, policy: str, policy_version: str | None) -> None:
        """The run's row, made or -- for a resumed run -- brought up to date (same row)."""
        now = time.time()
        with self._transaction(f"begin run {run_id}"):
            self._db.execute(
                "INSERT INTO runs (run_id, task, fingerprint, config, hardware, policy,"
                " policy_version, status, metrics, started, updated)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 'running', NULL, ?, ?)"
                " ON CONFLICT (run_id) DO UPDATE SET task = excluded.task,"
                " fingerprint = excluded.fingerprint, config = excluded.config,"
                " hardware = excluded.hardware, policy = excluded.policy,"
                " policy_version = excluded.policy_version, status = 'running',"
                " metrics = NULL, updated = excluded.updated",
                (run_id, task, _dump(fingerprint), _dump(config), _dump(hardware), policy,
                 policy_version, now, now),
            )

    def end_run(self, run_id: str, *, status: str, metrics: dict) -> None:
        with self._transaction(f"end run {run_id}"):
            changed = self._db.execute(
                "UPDATE runs SET status = ?, metrics = ?, updated = ? WHERE run_id = ?",
                (status, _dump(metrics), time.time(), run_id),
            ).rowcount
            if not changed:
                raise ReplayError(f"{self.path}: cannot end run {run_id}: it was never begun")

    def rewind(self, run_id: str, last_epoch: int) -> None:
        """Forget what ``run_id`` recorded after ``last_epoch``: a resumed run runs those
        epochs again (as ``RunDirectory.rewind`` does for its JSONL files)."""
        with self._transaction(f"rewind run {run_id} to epoch {last_epoch}"):
            self._db.execute("DELETE FROM outcomes WHERE run_id = ? AND epoch > ?",
                             (run_id, last_epoch))
            self._db.execute("DELETE FROM decision_points WHERE run_id = ? AND epoch > ?",
                             (run_id, last_epoch))

    def runs(self) -> list[dict]:
        rows = self._query("read runs", "SELECT * FROM runs ORDER BY started, run_id")
        for row in rows:
            for column in ("fingerprint", "config", "hardware", "metrics"):
                row[column] = _load(row[column])
        return rows

    # -- decision points and outcomes ----------------------------------------------------
    def add_point(self, run_id: str, point: dict, *, outcome: dict | None = None,
                  reward: float | None = None) -> None:
        """One decision point (``POINT_FIELDS``); one with the same id replaces it, and its
        outcome goes.  ``outcome`` and ``reward``, when the point is settled as it is made (a
        wait), are written in the same transaction: a kill never keeps one without the other."""
        try:
            row = {name: point[name] for name in POINT_FIELDS}
        except KeyError as exc:
            raise ReplayError(f"decision point of {run_id}: field {exc} is missing") from None
        point_id = row["point_id"]
        number = _POINT_ID.fullmatch(str(point_id))
        if number is None:
            raise ReplayError(f"decision point of {run_id}: id {point_id!r} is not 'p<n>'")
        row["observation"], row["candidates"] = _dump(row["observation"]), _dump(row["candidates"])
        with self._transaction(f"add decision point {point_id} of {run_id}"):
            self._db.execute("DELETE FROM outcomes WHERE run_id = ? AND point_id = ?",
                             (run_id, point_id))
            self._db.execute(
                f"INSERT OR REPLACE INTO decision_points (run_id, number, time,"
                f" {', '.join(POINT_FIELDS)}) VALUES ({', '.join('?' * (len(POINT_FIELDS) + 3))})",
                (run_id, int(number.group(1)), time.time(), *row.values()),
            )
            if outcome is not None:
                self._insert_outcome(run_id, point_id, outcome, reward)

    def add_outcome(self, run_id: str, point_id: str, outcome: dict, reward: float) -> None:
        """The outcome of a recorded decision point (``outcome["result"]``: fossilized,
        culled, wait...); a second one replaces the first."""
        with self._transaction(f"add the outcome of {point_id} of {run_id}"):
            self._insert_outcome(run_id, point_id, outcome, reward)

    def points(self, *, run_id: str | None = None, task: str | None = None) -> list[dict]:
        """Decision points with their outcome (``outcome``/``reward``: None while unknown),
        in (run id, point number) order."""
        where, arguments = [], []
        for column, value in (("p.run_id", run_id), ("r.task", task)):
            if value is not None:
                where.append(f"{column} = ?")
                arguments.append(value)
        rows = self._query(
            "read decision points",
            f"SELECT p.run_id, r.task, {', '.join(f'p.{n}' for n in POINT_FIELDS)}, p.time,"
            " o.outcome, o.reward FROM decision_points p JOIN runs r USING (run_id)"
            " LEFT JOIN outcomes o USING (run_id, point_id)"
            + (f" WHERE {' AND '.join(where)}" if where else "")
            + " ORDER BY p.run_id, p.number",
            arguments,
        )
        for row in rows:
            for column in ("observation", "candidates", "outcome"):
                row[column] = _load(row[column])
        return rows

    def size_by_task(self) -> dict[str, int]:
        """Decision points per task key (a task whose runs recorded none counts 0)."""
        rows = self._query(
            "count decision points",
            "SELECT r.task, COUNT(p.point_id) AS points FROM runs r"
            " LEFT JOIN decision_points p USING (run_id) GROUP BY r.task ORDER BY r.task",
        )
        return {row["task"]: row["points"] for row in rows}

    # -- the policy registry's history ---------------------------------------------------
    def record_attempt(self, *, version: str, parent: str | None, kind: str, outcome: str,
                       detail: dict, started: float, finished: float) -> int:
        """One attempt (``kind``: nightly, promote, revert, pretrain...); returns its id."""
        with self._transaction(f"record the {kind} attempt of {version}"):
            return self._db.execute(
                "INSERT INTO attempts (version, parent, kind, outcome, detail, started,"
                " finished) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (version, parent, kind, outcome, _dump(detail), started, finished),
            ).lastrowid

    def attempts(self, limit: int | None = None) -> list[dict]:
        """The newest ``limit`` attempts (all when None), newest first."""
        rows = self._query("read attempts", "SELECT * FROM attempts ORDER BY id DESC LIMIT ?",
                           (-1 if limit is None else limit,))
        for row in rows:
            row["detail"] = _load(row["detail"])
        return rows

    # -- helpers -------------------------------------------------------------------------
    def _insert_outcome(self, run_id: str, point_id: str, outcome: dict,
                        reward: float | None) -> None:
        if "result" not in outcome or reward is None:
            raise ReplayError(f"outcome of {run_id} {point_id}: a result and a reward are needed")
        self._db.execute(
            "INSERT OR REPLACE INTO outcomes (run_id, point_id, epoch, result, outcome, reward,"
            " time) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (run_id, point_id, outcome.get("epoch"), outcome["result"], _dump(outcome),
             float(reward), time.time()),
        )

    def _check_schema(self) -> int:
        """The file's schema version (0: empty, ours to create); a ReplayError if the file
        is another program's database or of a newer schema."""
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        application = self._db.execute("PRAGMA application_id").fetchone()[0]
        tables = self._db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]
        if application != APPLICATION_ID and (tables or version):
            raise ReplaySchemaError(f"{self.path}: not a Tolaria replay buffer (another "
                                    f"program's database); {_WAY_OUT}")
        if version > REPLAY_SCHEMA:
            raise ReplaySchemaError(
                f"{self.path}: replay buffer schema {version} is newer than this Tolaria "
                f"writes ({REPLAY_SCHEMA}); upgrade Tolaria, or {_WAY_OUT}"
            )
        return version

    @contextlib.contextmanager
    def _failures(self, what: str) -> Iterator[None]:
        """An SQLite error while doing ``what`` as one ReplayError line."""
        try:
            yield
        except sqlite3.Error as exc:
            reason = str(exc)
            if isinstance(exc, sqlite3.DatabaseError) and "not a database" in reason:
                raise ReplaySchemaError(f"{self.path}: not a Tolaria replay buffer (not an "
                                        f"SQLite database); {_WAY_OUT}") from None
            if "locked" in reason or "busy" in reason:
                reason += f": another process held it for more than {BUSY_TIMEOUT_S:g} s"
            raise ReplayError(f"{self.path}: cannot {what} ({reason})") from None

    @contextlib.contextmanager
    def _transaction(self, what: str) -> Iterator[None]:
        """One write, committed durably or not at all.  ``BEGIN IMMEDIATE`` takes the write
        lock at once: a transaction that only upgrades to writing later cannot wait for it
        (SQLite answers "busy" at once to avoid a deadlock between two such)."""
        with self._failures(what):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def _query(self, what: str, sql: str, arguments: Sequence[Any] = ()) -> list[dict]:
        with self._failures(what):
            cursor = self._db.execute(sql, arguments)
            names = [column[0] for column in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _dump(value: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> str:
    """A mapping, or a list of mappings, as strict JSON (``tolaria.records.encode`` each)."""
    if isinstance(value, Mapping):
        return records.encode(value)
    return "[" + ",".join(records.encode(item) for item in value) + "]"


def _load(text: str | None) -> Any:
    if text is None:
        return None
    try:
        data = json.loads(text)
        if isinstance(data, list):
            return [records.decode(json.dumps(item)) for item in data]
        return records.decode(text)
    except (ValueError, TolariaError) as exc:
        raise ReplayError(f"a replay buffer row does not read as JSON ({exc})") from None
