"""The queue's deterministic state machine, applied from the Raft log, stored in SQLite.

Everything an answer depends on comes from the log: the clock is the largest "time" the
leader stamped on an entry so far, item ids and log offsets are counters in the database, and
every query that returns several rows orders them. The applied index is written in the same
SQLite transaction as the changes of its entry (one transaction per entry, or with
autocommit=False one per `commit()`), so after a crash the database is at some applied index
and the entries after it are applied again from the Raft log.

Work topics: an item is ready (state 0), leased (1) or delayed (2, not_before in the future);
a done item is deleted (its key stays in the seen-set, which holds a 16-byte digest of each
key after a short prefix that keeps related keys together: see `_key_digest`). Each (topic,
partition key) has a row in `parts` with its counters, its limits and two derived columns
that keep claim cheap: `cand` (the key's oldest ready item id while the key may be claimed
now) and `wake` (the time the key may be claimed again while only its minimum interval holds
it back). Items without a partition key each count as a key of their own: no limits apply to them.

Client sessions: the answer of each (client, seq) is kept until the client acknowledges it
(`ack`: every seq below it is answered), for at most SESSION_IDLE seconds of log time without
a command from that client, for SESSION_LIMIT clients (the least recently used goes), and for
the last ANSWER_WINDOW seqs of a client.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import sqlite3
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ww.durable import fsync_dir
from ww.queue.commands import (
    CommandError,
    ItemFields,
    as_int,
    as_list,
    as_str,
    as_time,
    decode,
    decode_command,
    encode,
    field,
    item_fields,
    one_line,
)

__all__ = ["SESSION_IDLE", "SESSION_LIMIT", "QueueState", "QueueStateError"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 4
SESSION_IDLE = 3600.0  # seconds of log time after which an idle client session is forgotten
SESSION_LIMIT = 10_000  # client sessions remembered at most (the least recently used goes)
ANSWER_WINDOW = 10_000  # answers a session keeps: seq n acknowledges those below n - 9,999
MAX_CLAIM = 10_000  # items in one claim
MAX_READ = 10_000  # records in one read
LOG_SHIFT = 40  # a log record's rowid is topic_id << LOG_SHIFT | offset
MAX_OFFSET = 2**LOG_SHIFT - 1
CACHE_KIB = 32_768  # SQLite page cache per connection
CHECKPOINT_PAGES = 8_192  # WAL pages that trigger a checkpoint into the database file
PIECE = 128  # rows in one multi-row INSERT at most
STATEMENTS = 1024  # prepared statements cached per connection (each piece size is one)
SEEN_PREFIX = 16  # bytes of a key (not a URL) kept in front of its digest in the seen-set

READY, LEASED, DELAYED = 0, 1, 2
ITEM_MARKS = "(?, ?, ?, ?, ?, ?, ?, 0, NULL, NULL)"  # a new item row

SCHEMA = """
CREATE TABLE meta(id INTEGER PRIMARY KEY CHECK (id = 0), version INT NOT NULL,
    applied INT NOT NULL, clock REAL NOT NULL, next_item INT NOT NULL);
CREATE TABLE topics(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, kind TEXT NOT NULL,
    max_attempts INT NOT NULL, dead_letter TEXT NOT NULL,
    def_max_leased INT, def_min_interval REAL NOT NULL,
    ready INT NOT NULL, leased INT NOT NULL, delayed INT NOT NULL, done INT NOT NULL,
    dead INT NOT NULL, seen INT NOT NULL, log_first INT NOT NULL, log_next INT NOT NULL);
CREATE TABLE seen(topic INT NOT NULL, h BLOB NOT NULL, PRIMARY KEY (topic, h)) WITHOUT ROWID;
CREATE TABLE parts(id INTEGER PRIMARY KEY, topic INT NOT NULL, pkey TEXT,
    own INT NOT NULL, max_leased INT, min_interval REAL NOT NULL,
    ready INT NOT NULL, leased INT NOT NULL, last_claim REAL,
    head INT, cand INT, wake REAL);
CREATE UNIQUE INDEX parts_key ON parts(topic, pkey);
CREATE INDEX parts_cand ON parts(topic, cand) WHERE cand IS NOT NULL;
CREATE INDEX parts_wake ON parts(topic, wake) WHERE wake IS NOT NULL;
CREATE TABLE items(id INTEGER PRIMARY KEY, topic INT NOT NULL, part INT NOT NULL,
    state INT NOT NULL, payload BLOB NOT NULL, key TEXT, not_before REAL,
    attempts INT NOT NULL, consumer TEXT, deadline REAL);
CREATE INDEX items_ready ON items(part, id) WHERE state = 0;
CREATE INDEX items_leased ON items(deadline, id) WHERE state = 1;
CREATE INDEX items_delayed ON items(not_before, id) WHERE state = 2;
CREATE TABLE records(rid INTEGER PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE cursors(topic INT NOT NULL, consumer TEXT NOT NULL, offset INT NOT NULL,
    PRIMARY KEY (topic, consumer)) WITHOUT ROWID;
CREATE TABLE sessions(client TEXT PRIMARY KEY, ack INT NOT NULL, last REAL NOT NULL,
    touched INT NOT NULL) WITHOUT ROWID;
CREATE INDEX sessions_touched ON sessions(touched);
CREATE TABLE answers(client TEXT NOT NULL, seq INT NOT NULL, answer BLOB NOT NULL,
    PRIMARY KEY (client, seq)) WITHOUT ROWID;
"""
TABLES = {  # table -> ORDER BY of its canonical dump
    "meta": "id",
    "topics": "id",
    "seen": "topic, h",
    "parts": "id",
    "items": "id",
    "records": "rid",
    "cursors": "topic, consumer",
    "sessions": "client",
    "answers": "client, seq",
}
TOPIC_COLS = (
    "id, name, kind, max_attempts, dead_letter, def_max_leased, def_min_interval, ready, leased, "
    "delayed, done, dead, seen, log_first, log_next"
)
PART_COLS = (
    "id, topic, pkey, own, max_leased, min_interval, ready, leased, last_claim, head, cand, wake"
)


class QueueStateError(Exception):
    """The database cannot be used (damaged, or not a queue database); one line."""


@dataclass(slots=True)
class _Topic:
    id: int
    name: str
    kind: str
    max_attempts: int
    dead_letter: str
    def_max_leased: int | None
    def_min_interval: float
    ready: int
    leased: int
    delayed: int
    done: int
    dead: int
    seen: int
    log_first: int
    log_next: int


@dataclass(slots=True)
class _Part:
    id: int
    topic: int
    pkey: str | None
    own: int
    max_leased: int | None
    min_interval: float
    ready: int
    leased: int
    last_claim: float | None
    head: int | None
    cand: int | None
    wake: float | None


class _Refused(Exception):
    """A well-formed command that cannot be carried out; its answer is `self.answer`."""

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.answer: dict[str, Any] = {"error": message, **extra}


class QueueState:
    """The queue's state in one SQLite database at `path` (created if missing)."""

    def __init__(
        self,
        path: Path | str,
        *,
        autocommit: bool = True,
        check: bool = True,
        autocheckpoint: bool = True,
    ) -> None:
        """With autocheckpoint=False the WAL is never copied into the database file by a
        commit; call `checkpoint()` (from another thread, say) instead."""
        self.path = Path(path)
        self._autocommit = autocommit
        self._autocheckpoint = autocheckpoint
        self._conn = self._open(self.path, check)
        if not autocheckpoint:
            self._conn.execute("PRAGMA wal_autocheckpoint=0")
        self._load_meta()
        # The topics (a small table) stay cached between entries; what was last written of
        # each is kept to write only changes. Part rows are cached while one entry applies,
        # except each topic's part of items without a partition key, which stays cached too.
        self._topics: dict[str, _Topic] = {}
        self._topics_by_id: dict[int, _Topic] = {}
        self._topic_rows: dict[int, tuple[Any, ...]] = {}
        self._parts: dict[int, _Part] = {}
        self._part_rows: dict[int, tuple[Any, ...]] = {}  # the rows as loaded or last written
        self._loose: dict[int, _Part] = {}  # topic id -> its part without a partition key

    # -- opening -----------------------------------------------------------------------------

    @staticmethod
    def _open(path: Path, check: bool) -> sqlite3.Connection:
        def damaged(why: str) -> QueueStateError:
            return QueueStateError(
                f"{path}: not a usable queue database ({why}); move it away and let the replica "
                "catch up from the Raft log or a snapshot"
            )

        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, cached_statements=STATEMENTS
            )
            conn.execute("PRAGMA journal_mode=WAL").fetchone()
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            conn.execute(f"PRAGMA wal_autocheckpoint={CHECKPOINT_PAGES}")
            conn.execute(f"PRAGMA journal_size_limit={CHECKPOINT_PAGES * 4096}")
            conn.execute("PRAGMA temp_store=MEMORY")
            names = {
                r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type='table'")
            }
            if not names:
                conn.executescript(
                    f"BEGIN; {SCHEMA} INSERT INTO meta VALUES (0, {SCHEMA_VERSION}, 0, 0.0, 1); "
                    "COMMIT;"
                )
            elif not set(TABLES) <= names:
                raise damaged("it lacks the queue's tables")
            else:
                row = conn.execute("SELECT version FROM meta WHERE id = 0").fetchone()
                if row is None or row[0] != SCHEMA_VERSION:
                    raise damaged(f"schema version {row and row[0]}, expected {SCHEMA_VERSION}")
                if check:
                    result = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
                    if result != "ok":
                        raise damaged(one_line(result))
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            raise damaged(one_line(exc)) from None
        except QueueStateError:
            if conn is not None:
                conn.close()
            raise
        return conn

    def _load_meta(self) -> None:
        row = self._conn.execute("SELECT applied, clock, next_item FROM meta").fetchone()
        self._applied: int = row[0]
        self._clock: float = row[1]
        self._next_item: int = row[2]
        self._meta_dirty = False  # whether the three differ from the meta row
        self._unknown_due()

    def _unknown_due(self) -> None:
        # Lower bounds of the next time something falls due (a delayed item, a lease, an idle
        # session): housekeeping skips its queries until the clock reaches them.
        self._due_ready = self._due_lease = self._due_session = -math.inf

    @property
    def applied_index(self) -> int:
        return self._applied

    @property
    def clock(self) -> float:
        """The log clock: the largest time stamped on an applied entry."""
        return self._clock

    def close(self) -> None:
        self.commit()
        self._conn.close()

    # -- apply -------------------------------------------------------------------------------

    def apply(self, index: int, data: bytes) -> dict[str, Any]:
        """Apply the committed entry at `index`; its answer. Bad input gives {"error": ...}."""
        if index <= self._applied:
            return {"error": f"entry {index} is already applied (applied index {self._applied})"}
        conn = self._conn
        if not conn.in_transaction:
            conn.execute("BEGIN")
        try:
            self._applied = index
            self._meta_dirty = True
            answer = self._apply(data)
            if self._autocommit:
                self.commit()
        except BaseException as exc:
            # Only a failing database gets here: forget everything not yet committed.
            self._forget_topics()
            self._forget_parts()
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._load_meta()
            if isinstance(exc, sqlite3.Error):
                raise QueueStateError(
                    f"{self.path}: the database failed applying entry {index}: {one_line(exc)}"
                ) from exc
            raise
        return answer

    def commit(self) -> None:
        """Make the entries applied so far durable (with autocommit=False; else a no-op)."""
        if self._conn.in_transaction:
            self._write_meta()
            self._conn.execute("COMMIT")

    def _write_meta(self) -> None:
        """Write the applied index, clock and item counter: once per transaction, in it."""
        if self._meta_dirty:
            self._conn.execute(
                "UPDATE meta SET applied = ?, clock = ?, next_item = ?",
                (self._applied, self._clock, self._next_item),
            )
            self._meta_dirty = False

    def _apply(self, data: bytes) -> dict[str, Any]:
        try:
            cmd = decode_command(data)
        except CommandError as exc:
            return {"error": str(exc)}
        self._clock = max(self._clock, cmd["time"])
        self._housekeeping()
        self._flush()
        client, seq, ack = cmd["client"], cmd["seq"], cmd["ack"]
        if client:
            known = self._session_answer(client, seq, ack)
            if known is not None:
                return known
        self._conn.execute("SAVEPOINT op")
        saved_next = self._next_item
        try:
            answer = self._execute(cmd)
            self._flush()
        except Exception as exc:
            self._conn.execute("ROLLBACK TO op")
            self._forget_topics()
            self._forget_parts()
            self._next_item = saved_next
            if isinstance(exc, _Refused):
                answer = exc.answer
            elif isinstance(exc, CommandError):
                answer = {"error": str(exc)}
            elif isinstance(exc, sqlite3.OperationalError | sqlite3.DatabaseError) and not (
                isinstance(exc, sqlite3.IntegrityError)
            ):
                raise  # the database failed, not the command: stop rather than diverge
            else:
                answer = {"error": f"{cmd['op']}: bad command ({one_line(exc)})"}
        self._conn.execute("RELEASE op")
        if client:
            self._conn.execute(
                "INSERT INTO answers VALUES (?, ?, ?)", (client, seq, encode(answer))
            )
        return answer

    def _execute(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd["op"]
        if op == "put":
            topic = self._topic(as_str(field(cmd, "topic"), "topic"), "work")
            added, dups = self._put(topic, self._items(field(cmd, "items")))
            return {"added": added, "duplicates": dups}
        if op == "claim":
            return self._claim(cmd)
        if op == "complete":
            return self._complete(cmd)
        if op == "release":
            return self._release(cmd)
        if op == "append":
            topic = self._topic(as_str(field(cmd, "topic"), "topic"), "log")
            return {"first": self._append(topic, self._records(field(cmd, "records")))}
        if op == "create":
            return self._create(cmd)
        if op == "limit":
            return self._limit(cmd)
        if op == "cursor":
            return self._cursor(cmd)
        if op == "trim":
            return self._trim(cmd)
        return {}  # tick: the housekeeping already ran

    # -- sessions ----------------------------------------------------------------------------

    def _session_answer(self, client: str, seq: int, ack: int) -> dict[str, Any] | None:
        """The remembered answer of (client, seq), an error for a forgotten one, or None to
        execute it. Updates the session (creating it, evicting the least recently used)."""
        conn = self._conn
        row = conn.execute(
            "SELECT s.ack, a.answer FROM sessions s LEFT JOIN answers a "
            "ON a.client = s.client AND a.seq = ? WHERE s.client = ?",
            (seq, client),
        ).fetchone()
        if row is None:
            ack = max(ack, seq - ANSWER_WINDOW + 1)
            (count,) = conn.execute("SELECT COUNT(*) FROM sessions").fetchone()
            if count >= SESSION_LIMIT:
                self._drop_sessions(
                    conn.execute(
                        "SELECT client FROM sessions ORDER BY touched LIMIT ?",
                        (count - SESSION_LIMIT + 1,),
                    ).fetchall()
                )
            conn.execute(
                "INSERT INTO sessions VALUES (?, ?, ?, ?)",
                (client, ack, self._clock, self._applied),
            )
            self._due_session = min(self._due_session, self._clock)
            old_ack = 0
        else:
            old_ack = row[0]
            ack = max(old_ack, ack, seq - ANSWER_WINDOW + 1)
            conn.execute(
                "UPDATE sessions SET ack = ?, last = ?, touched = ? WHERE client = ?",
                (ack, self._clock, self._applied, client),
            )
        if ack > old_ack:
            conn.execute("DELETE FROM answers WHERE client = ? AND seq < ?", (client, ack))
        if row is not None and row[1] is not None:
            return decode(row[1])
        if seq < ack:
            return {"error": f"duplicate request {client}/{seq}: already answered and acknowledged"}
        return None

    def _drop_sessions(self, clients: Iterable[tuple[str]]) -> None:
        for (client,) in clients:
            self._conn.execute("DELETE FROM answers WHERE client = ?", (client,))
            self._conn.execute("DELETE FROM sessions WHERE client = ?", (client,))

    # -- time --------------------------------------------------------------------------------

    def _housekeeping(self) -> None:
        """What the clock brings: delayed items become ready, expired leases return or go to
        the dead-letter topic, idle sessions are forgotten."""
        conn, now = self._conn, self._clock
        if self._due_ready <= now:
            due = conn.execute(
                "SELECT id, topic, part FROM items WHERE state = 2 AND not_before <= ? "
                "ORDER BY not_before, id",
                (now,),
            ).fetchall()
            for item_id, topic_id, part_id in due:
                topic = self._topic_by_id(topic_id)
                topic.delayed -= 1
                self._make_ready(topic, self._part(part_id), item_id)
            (nxt,) = conn.execute("SELECT MIN(not_before) FROM items WHERE state = 2").fetchone()
            self._due_ready = math.inf if nxt is None else nxt
        if self._due_lease <= now:
            expired = conn.execute(
                "SELECT id, topic, part, attempts FROM items WHERE state = 1 AND deadline <= ? "
                "ORDER BY deadline, id",
                (now,),
            ).fetchall()
            for item_id, topic_id, part_id, attempts in expired:
                topic = self._topic_by_id(topic_id)
                part = self._part(part_id)
                topic.leased -= 1
                part.leased -= 1
                if attempts >= topic.max_attempts:
                    topic.dead += 1
                    self._dead_letter(topic, part, item_id)
                else:
                    self._make_ready(topic, part, item_id)  # keeps its consumer: see _owned
                self._refresh(part)
            (nxt,) = conn.execute("SELECT MIN(deadline) FROM items WHERE state = 1").fetchone()
            self._due_lease = math.inf if nxt is None else nxt
        if self._due_session < now - SESSION_IDLE:
            stale = conn.execute(
                "SELECT client FROM sessions WHERE last < ? ORDER BY touched",
                (now - SESSION_IDLE,),
            ).fetchall()
            self._drop_sessions(stale)
            row = conn.execute("SELECT last FROM sessions ORDER BY touched LIMIT 1").fetchone()
            self._due_session = math.inf if row is None else row[0]

    def _make_ready(self, topic: _Topic, part: _Part, item_id: int) -> None:
        self._conn.execute("UPDATE items SET state = 0 WHERE id = ?", (item_id,))
        self._count_ready(topic, part, item_id)

    def _count_ready(self, topic: _Topic, part: _Part, item_id: int) -> None:
        """Count `item_id` as ready in `topic` and `part` (its row already says so)."""
        topic.ready += 1
        part.ready += 1
        if part.head is None or item_id < part.head:
            part.head = item_id
        self._refresh(part)

    def _dead_letter(self, topic: _Topic, part: _Part, item_id: int) -> None:
        dead = self._topic(topic.dead_letter, "work")
        if dead.kind == "log":  # a log topic as the dead-letter topic keeps the payloads
            (payload,) = self._conn.execute(
                "DELETE FROM items WHERE id = ? RETURNING payload", (item_id,)
            ).fetchone()
            self._append(dead, [payload])
            return
        dpart = self._part_for(dead, part.pkey)
        self._conn.execute(
            "UPDATE items SET topic = ?, part = ?, attempts = 0, consumer = NULL, "
            "deadline = NULL, not_before = NULL WHERE id = ?",
            (dead.id, dpart.id, item_id),
        )
        self._make_ready(dead, dpart, item_id)

    # -- work topics -------------------------------------------------------------------------

    def _items(self, value: Any) -> list[ItemFields]:
        return [item_fields(m) for m in as_list(value, "items")]

    def _put(self, topic: _Topic, items: list[ItemFields]) -> tuple[int, int]:
        """Add the items whose key is new to the topic (payload, key, partition, not_before)."""
        if topic.kind != "work":
            raise _Refused(f"put: topic {topic.name!r} is a log topic; put needs a work topic")
        conn, now = self._conn, self._clock
        digests = {key: _key_digest(key) for _, key, _, _ in items if key is not None}
        # One pass over the seen-set per key: insert the digests (sorted: neighbours in the
        # index touch fewer pages) and learn from RETURNING which ones were new.
        new: set[bytes] = set()
        tid = topic.id
        for chunk in _pieces(sorted(set(digests.values()))):
            new.update(
                h
                for (h,) in conn.execute(
                    _values_sql("INSERT OR IGNORE INTO seen VALUES ", "(?, ?)", len(chunk))
                    + " RETURNING h",
                    [v for h in chunk for v in (tid, h)],
                )
            )
        topic.seen += len(new)
        fresh: list[ItemFields] = []
        for item in items:
            if item[1] is not None:
                h = digests[item[1]]
                if h not in new:
                    continue  # seen before, or earlier in this batch
                new.discard(h)
            fresh.append(item)
        dups = len(items) - len(fresh)
        parts = self._parts_for(topic, [item[2] for item in fresh])
        rows: list[tuple[Any, ...]] = []
        heads: dict[str | None, list[int]] = {}  # partition -> [ready count, min ready id]
        next_id = self._next_item
        for payload, key, partition, not_before in fresh:
            if not_before is not None and not_before > now:
                rows.append((next_id, tid, parts[partition].id, DELAYED, payload, key, not_before))
                topic.delayed += 1
                self._due_ready = min(self._due_ready, not_before)
            else:
                rows.append((next_id, tid, parts[partition].id, READY, payload, key, not_before))
                head = heads.get(partition)
                if head is None:
                    heads[partition] = [1, next_id]
                else:
                    head[0] += 1
            next_id += 1
        for chunk in _pieces(rows):
            conn.execute(
                _values_sql("INSERT INTO items VALUES ", ITEM_MARKS, len(chunk)),
                [v for row in chunk for v in row],
            )
        added = next_id - self._next_item
        self._next_item = next_id
        for pkey, (count, first) in heads.items():
            part = parts[pkey]
            part.ready += count
            topic.ready += count
            if part.head is None or first < part.head:
                part.head = first
            self._refresh(part)
        return added, dups

    def _claim(self, cmd: dict[str, Any]) -> dict[str, Any]:
        name = as_str(field(cmd, "topic"), "topic")
        consumer = as_str(field(cmd, "consumer"), "consumer")
        max_items = as_int(field(cmd, "max_items"), "max_items", 1, MAX_CLAIM)
        lease = as_time(field(cmd, "lease"), "lease", 0.0)
        if lease <= 0:
            raise CommandError("lease must be > 0 seconds")
        topic = self._find_topic(name)
        if topic is None:
            return {"items": []}
        if topic.kind != "work":
            raise _Refused(f"claim: topic {name!r} is a log topic; claim needs a work topic")
        conn, now = self._conn, self._clock
        deadline = now + lease
        self._due_lease = min(self._due_lease, deadline)
        woken = conn.execute(
            "SELECT id FROM parts WHERE topic = ? AND wake <= ? ORDER BY wake, id",
            (topic.id, now),
        ).fetchall()
        for (part_id,) in woken:
            self._refresh(self._part(part_id))
        self._flush_parts()
        # Keys are claimed in rounds, one item per eligible key per round, oldest first; the
        # first round takes the max_items oldest, so only the keys it saw can appear later.
        keys = [
            self._cached_part(row)
            for row in conn.execute(
                f"SELECT {PART_COLS} FROM parts WHERE topic = ? AND cand IS NOT NULL "
                "ORDER BY cand LIMIT ?",
                (topic.id, max_items),
            ).fetchall()
        ]
        loose = self._find_part(topic, None)
        loose_ids: list[int] = []
        if loose is not None and loose.head is not None:
            loose_ids = [
                i
                for (i,) in conn.execute(
                    "SELECT id FROM items WHERE part = ? AND state = 0 ORDER BY id LIMIT ?",
                    (loose.id, max_items),
                )
            ]
        taken_loose = 0
        stale: dict[int, _Part] = {}  # parts whose head was claimed
        out: list[dict[str, Any]] = []
        while len(out) < max_items:
            want = max_items - len(out)
            turn: list[tuple[int, _Part]] = [(p.cand, p) for p in keys if p.cand is not None]
            if loose is not None:
                turn += [(i, loose) for i in loose_ids[taken_loose : taken_loose + want]]
            turn.sort(key=_first)
            del turn[want:]
            if not turn:
                break
            ids = [item_id for item_id, _ in turn]
            claimed = {
                row[0]: row[1:]
                for row in conn.execute(
                    "UPDATE items SET state = 1, attempts = attempts + 1, consumer = ?, "
                    f"deadline = ? WHERE id IN ({_marks(ids)}) "
                    "RETURNING id, payload, key, attempts",
                    (consumer, deadline, *ids),
                )
            }
            for item_id, part in turn:
                payload, item_key, attempts = claimed[item_id]
                out.append(
                    {
                        "id": item_id,
                        "payload": payload,
                        "key": item_key,
                        "partition": part.pkey,
                        "attempts": attempts,
                    }
                )
                topic.ready -= 1
                topic.leased += 1
                part.ready -= 1
                part.leased += 1
                if part is loose:
                    taken_loose += 1
                else:
                    part.last_claim = now
                stale[part.id] = part
                part.head = part.cand = None
            if len(out) < max_items:
                again = [p for p in stale.values() if p is not loose and self._claimable(p)]
                self._find_heads(again)
                for p in again:
                    del stale[p.id]
        self._find_heads(list(stale.values()))
        return {"items": out}

    def _claimable(self, part: _Part) -> bool:
        """Whether `part` may be claimed again within the same claim (after its head went)."""
        k, d = self._limits(part)
        now = self._clock
        return part.ready > 0 and now + d <= now and (k is None or part.leased < k)

    def _find_heads(self, parts: list[_Part]) -> None:
        """Look up the oldest ready item of each part (their heads are unknown)."""
        busy = [p for p in parts if p.ready > 0]
        for chunk in _chunks([p.id for p in busy]):
            heads: dict[int, int] = dict(
                self._conn.execute(
                    "SELECT p.id, (SELECT i.id FROM items i WHERE i.part = p.id AND i.state = 0 "
                    f"ORDER BY i.id LIMIT 1) FROM parts p WHERE p.id IN ({_marks(chunk)})",
                    chunk,
                ).fetchall()
            )
            for p in busy:
                if p.id in heads:
                    p.head = heads[p.id]
        for p in parts:
            if p.ready == 0:
                p.head = None
            self._refresh(p)

    def _owned(self, consumer: str, ids: list[int]) -> list[tuple[int, int, int, int]]:
        """(id, topic, part, state) of each item if all are held by `consumer`; else refused.

        An item is held while leased to the consumer, and also after its lease expired as
        long as nobody claimed it again (it is ready, and its consumer is still recorded)."""
        if len(set(ids)) != len(ids):
            raise CommandError("ids must not repeat")
        found: dict[int, tuple[int, int, int, str | None]] = {}
        for chunk in _pieces(ids):
            for row in self._conn.execute(
                _values_sql(
                    "SELECT id, topic, part, state, consumer FROM items WHERE id IN (",
                    "?",
                    len(chunk),
                    ")",
                ),
                chunk,
            ):
                found[row[0]] = row[1:]
        rows, lost = [], []
        for item_id in ids:
            got = found.get(item_id)
            if got is None or got[2] == DELAYED or got[3] != consumer:
                lost.append(item_id)
            else:
                rows.append((item_id, got[0], got[1], got[2]))
        if lost:
            raise _Refused(
                f"{len(lost)} of {len(ids)} items are not held by {consumer!r} (done, unknown, "
                "or claimed again after the lease expired); nothing was changed",
                lost=lost,
            )
        return rows

    def _take(self, rows: list[tuple[int, int, int, int]]) -> None:
        """Detach owned items from the counters (they are about to be deleted or re-queued)."""
        for item_id, topic_id, part_id, state in rows:
            topic, part = self._topic_by_id(topic_id), self._part(part_id)
            if state == LEASED:
                topic.leased -= 1
                part.leased -= 1
                self._refresh(part)
            else:
                topic.ready -= 1
                part.ready -= 1
                self._conn.execute("UPDATE items SET state = 3 WHERE id = ?", (item_id,))
                self._removed_ready(part, item_id)

    def _ids(self, cmd: dict[str, Any]) -> list[int]:
        return [as_int(i, "id", 1) for i in as_list(field(cmd, "ids"), "ids")]

    def _complete(self, cmd: dict[str, Any]) -> dict[str, Any]:
        consumer = as_str(field(cmd, "consumer"), "consumer")
        ids = self._ids(cmd)
        appends = cmd.get("append") or {}
        puts = cmd.get("put") or {}
        if not isinstance(appends, dict) or not isinstance(puts, dict):
            raise CommandError("complete: append and put must be maps of topic to a list")
        rows = self._owned(consumer, ids)
        self._take(rows)
        for chunk in _pieces([r[0] for r in rows]):
            self._conn.execute(
                _values_sql("DELETE FROM items WHERE id IN (", "?", len(chunk), ")"), chunk
            )
        for _, topic_id, _, _ in rows:
            self._topic_by_id(topic_id).done += 1
        appended: dict[str, int] = {}
        for name in sorted(appends, key=_name_order):
            records = self._records(appends[name])
            topic = self._topic(as_str(name, "append topic"), "log")
            appended[name] = self._append(topic, records)
        added = dups = 0
        for name in sorted(puts, key=_name_order):
            items = self._items(puts[name])
            topic = self._topic(as_str(name, "put topic"), "work")
            a, d = self._put(topic, items)
            added, dups = added + a, dups + d
        return {"done": len(rows), "appended": appended, "added": added, "duplicates": dups}

    def _release(self, cmd: dict[str, Any]) -> dict[str, Any]:
        consumer = as_str(field(cmd, "consumer"), "consumer")
        ids = self._ids(cmd)
        delay = as_time(cmd.get("delay", 0.0), "delay", 0.0)
        rows = self._owned(consumer, ids)
        self._take(rows)
        if delay > 0:
            not_before = self._clock + delay
            head = "UPDATE items SET state = 2, not_before = ?, consumer = NULL, deadline = NULL "
        else:
            not_before = None
            head = "UPDATE items SET state = 0, not_before = ?, consumer = NULL, deadline = NULL "
        for chunk in _pieces([r[0] for r in rows]):
            self._conn.execute(
                _values_sql(head + "WHERE id IN (", "?", len(chunk), ")"), (not_before, *chunk)
            )
        for item_id, topic_id, part_id, _ in rows:
            topic = self._topic_by_id(topic_id)
            if not_before is not None:
                topic.delayed += 1
                self._due_ready = min(self._due_ready, not_before)
            else:
                self._count_ready(topic, self._part(part_id), item_id)
        return {"released": len(rows)}

    def _limit(self, cmd: dict[str, Any]) -> dict[str, Any]:
        topic = self._topic(as_str(field(cmd, "topic"), "topic"), "work")
        if topic.kind != "work":
            raise _Refused(f"limit: topic {topic.name!r} is a log topic; limits need a work topic")
        pkey = cmd.get("partition")
        if pkey is not None:
            pkey = as_str(pkey, "partition", empty=True)
        k = cmd.get("max_leased")
        if k is not None:
            k = as_int(k, "max_leased", 1)
        d = as_time(cmd.get("min_interval", 0.0), "min_interval", 0.0)
        if pkey is None:
            topic.def_max_leased, topic.def_min_interval = k, d
            for (part_id,) in self._conn.execute(
                "SELECT id FROM parts WHERE topic = ? AND own = 0 ORDER BY id", (topic.id,)
            ).fetchall():
                self._refresh(self._part(part_id))
        else:
            part = self._part_for(topic, pkey)
            part.own, part.max_leased, part.min_interval = 1, k, d
            self._refresh(part)
        return {}

    def _removed_ready(self, part: _Part, item_id: int, *, recompute: bool = False) -> None:
        """`item_id` left the ready state of `part` (its row already says so)."""
        if recompute or part.head == item_id:
            row = self._conn.execute(
                "SELECT id FROM items WHERE part = ? AND state = 0 ORDER BY id LIMIT 1",
                (part.id,),
            ).fetchone()
            part.head = None if row is None else row[0]
        self._refresh(part)

    def _limits(self, part: _Part) -> tuple[int | None, float]:
        if part.pkey is None:
            return None, 0.0
        if part.own:
            return part.max_leased, part.min_interval
        topic = self._topic_by_id(part.topic)
        return topic.def_max_leased, topic.def_min_interval

    def _refresh(self, part: _Part) -> None:
        """Recompute the derived cand/wake of a partitioned key."""
        if part.pkey is None:
            return
        k, d = self._limits(part)
        part.cand = part.wake = None
        if part.head is None or (k is not None and part.leased >= k):
            return
        at = -math.inf if part.last_claim is None else part.last_claim + d
        if at <= self._clock:
            part.cand = part.head
        else:
            part.wake = at

    # -- log topics --------------------------------------------------------------------------

    def _records(self, value: Any) -> list[bytes]:
        records = as_list(value, "records")
        for r in records:
            if not isinstance(r, bytes):
                raise CommandError(f"records must be bytes, got {type(r).__name__}")
        return records

    def _append(self, topic: _Topic, records: list[bytes]) -> int:
        if topic.kind != "log":
            raise _Refused(
                f"append: topic {topic.name!r} is a work topic; append needs a log topic"
            )
        first = topic.log_next
        if first + len(records) > MAX_OFFSET:
            raise _Refused(f"append: log topic {topic.name!r} is full")
        base = topic.id << LOG_SHIFT
        self._conn.executemany(
            "INSERT INTO records VALUES (?, ?)",
            [(base + first + i, r) for i, r in enumerate(records)],
        )
        topic.log_next = first + len(records)
        return first

    def _cursor(self, cmd: dict[str, Any]) -> dict[str, Any]:
        topic = self._log_topic(cmd)
        consumer = as_str(field(cmd, "consumer"), "consumer")
        offset = as_int(field(cmd, "offset"), "offset", 0, MAX_OFFSET)
        self._conn.execute(
            "INSERT OR REPLACE INTO cursors VALUES (?, ?, ?)", (topic.id, consumer, offset)
        )
        return {}

    def _trim(self, cmd: dict[str, Any]) -> dict[str, Any]:
        topic = self._log_topic(cmd)
        offset = min(as_int(field(cmd, "offset"), "offset", 0, MAX_OFFSET), topic.log_next)
        if offset <= topic.log_first:
            return {"trimmed": 0}
        base = topic.id << LOG_SHIFT
        self._conn.execute(
            "DELETE FROM records WHERE rid >= ? AND rid < ?",
            (base + topic.log_first, base + offset),
        )
        trimmed = offset - topic.log_first
        topic.log_first = offset
        return {"trimmed": trimmed}

    def _log_topic(self, cmd: dict[str, Any]) -> _Topic:
        name = as_str(field(cmd, "topic"), "topic")
        topic = self._find_topic(name)
        if topic is None:
            raise _Refused(f"{cmd['op']}: unknown topic {name!r}")
        if topic.kind != "log":
            raise _Refused(f"{cmd['op']}: topic {name!r} is a work topic, not a log topic")
        return topic

    # -- topics ------------------------------------------------------------------------------

    def _create(self, cmd: dict[str, Any]) -> dict[str, Any]:
        name = as_str(field(cmd, "topic"), "topic")
        kind = cmd.get("kind", "work")
        if kind not in ("work", "log"):
            raise CommandError(f"create: kind must be 'work' or 'log', got {kind!r}")
        max_attempts = as_int(cmd.get("max_attempts", 5), "max_attempts", 1, 1_000_000)
        dead_letter = cmd.get("dead_letter")
        if dead_letter is not None:
            dead_letter = as_str(dead_letter, "dead_letter")
            if dead_letter == name:
                raise CommandError("create: a topic cannot be its own dead-letter topic")
        topic = self._find_topic(name)
        if topic is not None:
            if topic.kind != kind:
                raise _Refused(f"create: topic {name!r} exists as a {topic.kind} topic")
            return {"created": False}
        self._new_topic(name, kind, max_attempts, dead_letter)
        return {"created": True}

    def _find_topic(self, name: str) -> _Topic | None:
        """The topic called `name` (cached while this entry is applied), or None."""
        topic = self._topics.get(name)
        if topic is None:
            row = self._conn.execute(
                f"SELECT {TOPIC_COLS} FROM topics WHERE name = ?", (name,)
            ).fetchone()
            if row is not None:
                topic = self._cache_topic(row)
        return topic

    def _cache_topic(self, row: tuple[Any, ...]) -> _Topic:
        topic = self._topics[row[1]] = self._topics_by_id[row[0]] = _Topic(*row)
        self._topic_rows[row[0]] = row
        return topic

    def _forget_topics(self) -> None:
        self._topics.clear()
        self._topics_by_id.clear()
        self._topic_rows.clear()

    def _topic(self, name: str, kind: str) -> _Topic:
        """The topic called `name`, created as a `kind` topic if it is new."""
        topic = self._find_topic(name)
        return self._new_topic(name, kind, 5, None) if topic is None else topic

    def _new_topic(self, name: str, kind: str, max_attempts: int, dead: str | None) -> _Topic:
        (next_id,) = self._conn.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM topics").fetchone()
        if next_id >= 2 ** (63 - LOG_SHIFT):
            raise _Refused("too many topics")
        topic = _Topic(
            next_id, name, kind, max_attempts, dead or f"{name}.dead", None, 0.0,
            0, 0, 0, 0, 0, 0, 0, 0,
        )  # fmt: skip
        row = _topic_row(topic)
        self._conn.execute(f"INSERT INTO topics ({TOPIC_COLS}) VALUES ({','.join('?' * 15)})", row)
        self._cache_topic(row)
        return self._topics[name]

    def _topic_by_id(self, topic_id: int) -> _Topic:
        topic = self._topics_by_id.get(topic_id)
        if topic is None:
            row = self._conn.execute(
                f"SELECT {TOPIC_COLS} FROM topics WHERE id = ?", (topic_id,)
            ).fetchone()
            topic = self._cache_topic(row)
        return topic

    def _part(self, part_id: int) -> _Part:
        part = self._parts.get(part_id)
        if part is None:
            row = self._conn.execute(
                f"SELECT {PART_COLS} FROM parts WHERE id = ?", (part_id,)
            ).fetchone()
            part = self._cached_part(row)
        return part

    def _cached_part(self, row: tuple[Any, ...]) -> _Part:
        part = self._parts.get(row[0])
        if part is None:
            part = self._parts[row[0]] = _Part(*row)
            self._part_rows[row[0]] = row
            if part.pkey is None:
                self._loose[part.topic] = part
        return part

    def _forget_parts(self) -> None:
        self._parts.clear()
        self._part_rows.clear()
        self._loose.clear()

    def _parts_for(self, topic: _Topic, pkeys: list[str | None]) -> dict[str | None, _Part]:
        """The parts of these partition keys, created (in order of appearance) if new."""
        wanted = list(dict.fromkeys(pkeys))
        found: dict[str | None, _Part] = {}
        named = [k for k in wanted if k is not None]
        for chunk in _chunks(named):
            for row in self._conn.execute(
                f"SELECT {PART_COLS} FROM parts WHERE topic = ? AND pkey IN ({_marks(chunk)})",
                (topic.id, *chunk),
            ):
                found[row[2]] = self._cached_part(row)
        for pkey in wanted:
            if pkey not in found:
                found[pkey] = self._part_for(topic, pkey)
        return found

    def _find_part(self, topic: _Topic, pkey: str | None) -> _Part | None:
        if pkey is None and topic.id in self._loose:
            return self._loose[topic.id]
        row = self._conn.execute(
            f"SELECT {PART_COLS} FROM parts WHERE topic = ? AND pkey IS ?", (topic.id, pkey)
        ).fetchone()
        return None if row is None else self._cached_part(row)

    def _part_for(self, topic: _Topic, pkey: str | None) -> _Part:
        part = self._find_part(topic, pkey)
        if part is not None:
            return part
        (part_id,) = self._conn.execute(
            "INSERT INTO parts (topic, pkey, own, min_interval, ready, leased) "
            "VALUES (?, ?, 0, 0.0, 0, 0) RETURNING id",
            (topic.id, pkey),
        ).fetchone()
        return self._cached_part(
            (part_id, topic.id, pkey, 0, None, 0.0, 0, 0, None, None, None, None)
        )

    def _flush_parts(self) -> None:
        """Write the changed part rows; the indexed cand/wake only where they changed."""
        counters, derived = [], []
        for part_id, p in self._parts.items():
            old = self._part_rows[part_id]
            if (p.own, p.max_leased, p.min_interval, p.ready, p.leased, p.last_claim, p.head) != (
                old[3:10]
            ):
                counters.append(
                    (p.own, p.max_leased, p.min_interval, p.ready, p.leased, p.last_claim,
                     p.head, p.id)
                )  # fmt: skip
            if (p.cand, p.wake) != old[10:12]:
                derived.append((p.cand, p.wake, p.id))
        if counters:
            self._conn.executemany(
                "UPDATE parts SET own = ?, max_leased = ?, min_interval = ?, ready = ?, "
                "leased = ?, last_claim = ?, head = ? WHERE id = ?",
                counters,
            )
        if derived:
            self._conn.executemany("UPDATE parts SET cand = ?, wake = ? WHERE id = ?", derived)
        self._parts = {p.id: p for p in self._loose.values()}
        self._part_rows = {p.id: _part_row(p) for p in self._loose.values()}

    def _flush(self) -> None:
        """Write the rows changed while applying this entry."""
        self._flush_parts()
        changed = []
        for t in self._topics.values():
            row = _topic_row(t)
            if row != self._topic_rows[t.id]:
                changed.append((*row[5:], t.id))
                self._topic_rows[t.id] = row
        if changed:
            self._conn.executemany(
                "UPDATE topics SET def_max_leased = ?, def_min_interval = ?, ready = ?, "
                "leased = ?, delayed = ?, done = ?, dead = ?, seen = ?, log_first = ?, "
                "log_next = ? WHERE id = ?",
                changed,
            )

    # -- queries -----------------------------------------------------------------------------

    def query(self, request: Any) -> dict[str, Any]:
        """Answer a read-only query map; a bad one answers {"error": ...}."""
        try:
            if not isinstance(request, dict):
                raise CommandError(f"a query must be a map, got {type(request).__name__}")
            op = request.get("op")
            if op == "topics":
                names = self._conn.execute("SELECT name FROM topics ORDER BY name").fetchall()
                return {"topics": [n for (n,) in names]}
            if op not in ("read", "cursor_get", "stats"):
                raise CommandError(
                    f"unknown query {op!r}; expected one of cursor_get, read, stats, topics"
                )
            name = as_str(field(request, "topic"), "topic")
            row = self._conn.execute(
                f"SELECT {TOPIC_COLS} FROM topics WHERE name = ?", (name,)
            ).fetchone()
            topic = None if row is None else _Topic(*row)
            if op == "cursor_get":
                consumer = as_str(field(request, "consumer"), "consumer")
                if topic is None:
                    return {"offset": 0}
                got = self._conn.execute(
                    "SELECT offset FROM cursors WHERE topic = ? AND consumer = ?",
                    (topic.id, consumer),
                ).fetchone()
                return {"offset": 0 if got is None else got[0]}
            if topic is None:
                raise CommandError(f"{op}: unknown topic {name!r}")
            if op == "read":
                return self._read(topic, request)
            return self._stats(topic)
        except CommandError as exc:
            return {"error": str(exc)}
        except sqlite3.OperationalError:
            raise
        except Exception as exc:
            return {"error": f"bad query ({one_line(exc)})"}

    def _read(self, topic: _Topic, request: dict[str, Any]) -> dict[str, Any]:
        if topic.kind != "log":
            raise CommandError(f"read: topic {topic.name!r} is a work topic, not a log topic")
        offset = max(as_int(field(request, "offset"), "offset", 0, MAX_OFFSET), topic.log_first)
        n = as_int(field(request, "n"), "n", 0, MAX_READ)
        base = topic.id << LOG_SHIFT
        rows = self._conn.execute(
            "SELECT rid, data FROM records WHERE rid >= ? AND rid < ? ORDER BY rid LIMIT ?",
            (base + offset, base + topic.log_next, n),
        ).fetchall()
        records = [[rid - base, data] for rid, data in rows]
        nxt = records[-1][0] + 1 if records else offset
        return {"records": records, "next": nxt, "first": topic.log_first}

    def _stats(self, topic: _Topic) -> dict[str, Any]:
        busiest = []
        for pkey, ready, leased, last, own, d in self._conn.execute(
            "SELECT pkey, ready, leased, last_claim, own, min_interval FROM parts "
            "WHERE topic = ? AND pkey IS NOT NULL AND ready + leased > 0 "
            "ORDER BY ready + leased DESC, pkey LIMIT 10",
            (topic.id,),
        ):
            interval = d if own else topic.def_min_interval
            busiest.append([pkey, ready, leased, 0.0 if last is None else last + interval])
        return {
            "kind": topic.kind,
            "ready": topic.ready,
            "leased": topic.leased,
            "delayed": topic.delayed,
            "done": topic.done,
            "dead": topic.dead,
            "seen": topic.seen,
            "appended": topic.log_next,
            "first": topic.log_first,
            "partitions": busiest,
        }

    # -- snapshots ---------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """A consistent copy of the whole database (as of the last applied entry)."""
        self.commit()
        return bytes(self._conn.serialize())

    def snapshot_to(self, dest: Path | str) -> None:
        """Write a consistent copy of the database to the file `dest` without holding it in
        memory (SQLite's backup API; for snapshots sent in chunks)."""
        self.commit()
        target = sqlite3.connect(dest)
        try:
            self._conn.backup(target)
        finally:
            target.close()

    def copy_to(self, dest: Path | str) -> None:
        """Write a copy of the last committed state to the file `dest` through a connection of
        its own (SQLite's backup API reads one consistent state and releases the GIL): safe in
        another thread while entries apply, and never holds the database in memory."""
        source = sqlite3.connect(self.path, check_same_thread=False)
        try:
            target = sqlite3.connect(dest)
            try:
                source.backup(target)
            finally:
                target.close()
        finally:
            source.close()

    def sync(self) -> None:
        """Commit, and make everything committed durable now (fsync the WAL, which holds every
        commit since the last complete checkpoint; a checkpoint fsyncs the database file),
        rather than at the next checkpoint as synchronous=NORMAL would."""
        self.commit()
        try:
            fd = os.open(f"{self.path}-wal", os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def checkpoint(self) -> None:
        """Copy the committed WAL into the database file through a connection of its own (a
        passive checkpoint: it never blocks the writer, so it may run in another thread)."""
        conn = sqlite3.connect(self.path, check_same_thread=False)
        try:
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA journal_size_limit={CHECKPOINT_PAGES * 4096}")
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        finally:
            conn.close()

    def restore(self, data: bytes) -> None:
        """Replace the database with a snapshot's, atomically; a damaged snapshot raises
        QueueStateError and keeps the current state."""
        if not isinstance(data, bytes | bytearray | memoryview) or bytes(data[:16]) != (
            b"SQLite format 3\x00"
        ):
            raise QueueStateError("queue snapshot is not an SQLite database; state kept")
        tmp = self._restore_path()
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self._install(tmp)

    def restore_from(self, src: Path | str) -> None:
        """Like restore, from a snapshot file (which is copied, not moved)."""
        tmp = self._restore_path()
        try:
            with open(src, "rb") as f, open(tmp, "wb") as out:
                while chunk := f.read(1 << 20):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:
            _remove_db(tmp)
            raise QueueStateError(
                f"queue snapshot {src} unreadable ({one_line(exc)}); state kept"
            ) from None
        self._install(tmp)

    def _restore_path(self) -> Path:
        tmp = self.path.with_name(self.path.name + ".restore")
        _remove_db(tmp)
        return tmp

    def _install(self, tmp: Path) -> None:
        """Check the database file `tmp` and put it in place of the current one."""
        try:
            self._open(tmp, True).close()
        except QueueStateError as exc:
            _remove_db(tmp)
            raise QueueStateError(f"queue snapshot refused, state kept: {exc}") from None
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")
        self._conn.close()  # the last connection checkpoints and removes the WAL
        for suffix in ("-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)
        self._conn = self._open(self.path, False)
        if not self._autocheckpoint:
            self._conn.execute("PRAGMA wal_autocheckpoint=0")
        self._load_meta()
        self._forget_topics()
        self._forget_parts()
        logger.info("%s: restored a snapshot at applied index %d", self.path, self._applied)

    def digest(self) -> bytes:
        """A hash of every row of every table in key order: equal on replicas at the same
        applied index."""
        self._write_meta()
        h = hashlib.blake2b(digest_size=32)
        for table, order in TABLES.items():
            h.update(table.encode())
            for row in self._conn.execute(f"SELECT * FROM {table} ORDER BY {order}"):
                h.update(encode({"r": list(row)}))
        return h.digest()


_PLACE = struct.Struct(">II").pack  # a URL's place in the seen-set: two CRC-32s


def _key_digest(key: str) -> bytes:
    """What the seen-set stores of a key: where it sits in the index, then 16 bytes of BLAKE2b
    of the whole key (a false duplicate needs a 128-bit collision; at most 32 bytes a key).

    Where it sits: for a URL (a key with "://"), the CRC-32 of its scheme and host and that of
    its directory (the URL up to its last "/" but a trailing one); for any other key, its
    first SEEN_PREFIX bytes. So the keys a batch puts together (the links of a page, which
    mostly share its host and often its directory; numbered keys) share leaf pages of the
    index rather than each landing on a random one, which a commit would write and a large
    seen-set would have to read."""
    b = key.encode("utf-8", "surrogatepass")
    digest = hashlib.blake2b(b, digest_size=16).digest()
    scheme = b.find(b"://")
    if scheme < 0:
        return b[:SEEN_PREFIX] + digest
    end = b.find(b"/", scheme + 3)
    origin = b if end < 0 else b[:end]
    cut = b.rfind(b"/", end, len(b) - 1) if end >= 0 else -1
    directory = b[:cut] if cut > end else origin
    return _PLACE(zlib.crc32(origin), zlib.crc32(directory)) + digest


def _pieces(values: list[Any]) -> Iterable[list[Any]]:
    """`values` in pieces of at most PIECE: a statement over a piece has at most PIECE
    texts, which the connection's statement cache (STATEMENTS) keeps prepared."""
    for i in range(0, len(values), PIECE):
        yield values[i : i + PIECE]


@functools.cache
def _values_sql(head: str, marks: str, n: int, tail: str = "") -> str:
    """`head`, `n` copies of `marks` (a row of an INSERT, or `?` in a list), `tail`."""
    return head + ",".join([marks] * n) + tail


def _chunks(values: list[Any], size: int = 500) -> Iterable[list[Any]]:
    for i in range(0, len(values), size):
        yield values[i : i + size]


def _marks(values: list[Any]) -> str:
    return ",".join("?" * len(values))


def _first(pair: tuple[int, Any]) -> int:
    return pair[0]


def _name_order(name: Any) -> tuple[str, str]:
    return (type(name).__name__, str(name))


def _part_row(p: _Part) -> tuple[Any, ...]:
    return (
        p.id, p.topic, p.pkey, p.own, p.max_leased, p.min_interval, p.ready, p.leased,
        p.last_claim, p.head, p.cand, p.wake,
    )  # fmt: skip


def _topic_row(t: _Topic) -> tuple[Any, ...]:
    return (
        t.id, t.name, t.kind, t.max_attempts, t.dead_letter, t.def_max_leased,
        t.def_min_interval, t.ready, t.leased, t.delayed, t.done, t.dead, t.seen, t.log_first,
        t.log_next,
    )  # fmt: skip


def _remove_db(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
