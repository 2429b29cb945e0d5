"""Numbered schema migrations of the memory store.

Each migration is a function ``mNNN_description(conn)``; ``MIGRATIONS`` lists them in
order. ``migrate(conn)`` applies the ones the file lacks, each in its own
``BEGIN IMMEDIATE`` transaction together with the new version number, which lives in
``PRAGMA user_version`` (part of the database header, so it commits atomically with
the migration). A file whose version is above the newest migration here was written
by a newer mnemoproxy: it is refused, never downgraded.

Never edit a released migration; add a new one.

Schema notes (m001):
- ``owner`` on scopes is a hash of the proxy key that created the scope ("" when no
  keys are configured); (owner, name) is unique.
- ``messages.seq`` orders a scope's transcript and only grows; undone messages keep
  their seq (state 'undone'), so the transcript's history is never rewritten.
- ``memories_fts`` (FTS5, contentless) holds exactly the *active* memories, kept so
  by triggers; its rowid is ``(scope_id << 40) + memory_id`` (memory ids stay below
  2**40 and scope ids below 2**23, far beyond any real store).
- ``embeddings`` holds each memory's unit float32 vector; ``vector_packs`` the sign
  bits of the active ones, per scope, for the coarse KNN scan (see
  ``proxy.memory.vectors``). Neither depends on the embedding dimension.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from proxy.memory.db import (
    APPLICATION_ID,
    Connection,
    StoreError,
    StoreTooNew,
    sqlite_driver,
)
from proxy.memory.records import MEMORY_ID_FLOOR

Migration = Callable[[Connection], None]


def m001_initial(conn: Connection) -> None:
    """Scopes, transcript, memories (+ sources, FTS5, float vectors), summaries,
    style, jobs and the request log."""
    _execute_script(
        conn,
        """
        CREATE TABLE meta (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL
        ) WITHOUT ROWID;

        -- AUTOINCREMENT: a deleted scope's id is never handed to a new scope (maybe
        -- another owner's), so a stale id held anywhere can never reach new data.
        CREATE TABLE scopes (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            owner TEXT NOT NULL,
            name TEXT NOT NULL,
            label TEXT,
            created_at REAL NOT NULL,
            last_seen REAL NOT NULL,
            settings TEXT NOT NULL DEFAULT '{}',
            UNIQUE (owner, name)
        );

        CREATE TABLE messages (
            id INTEGER PRIMARY KEY,
            scope_id INTEGER NOT NULL REFERENCES scopes (id) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            role TEXT NOT NULL,
            speaker TEXT,
            content TEXT NOT NULL DEFAULT '',
            raw TEXT NOT NULL DEFAULT '{}',
            fingerprint TEXT NOT NULL,
            seen_at REAL NOT NULL,
            state TEXT NOT NULL DEFAULT 'active'
                CHECK (state IN ('active', 'undone', 'partial')),
            request_id TEXT,
            undone_at REAL,
            UNIQUE (scope_id, seq)
        );
        -- The active transcript of a scope, in order (queries repeat this WHERE).
        CREATE INDEX messages_live ON messages (scope_id, seq) WHERE state != 'undone';
        CREATE INDEX messages_fingerprint ON messages (scope_id, fingerprint);

        CREATE TABLE memories (
            id INTEGER PRIMARY KEY,
            scope_id INTEGER NOT NULL REFERENCES scopes (id) ON DELETE CASCADE,
            kind TEXT NOT NULL CHECK (kind IN ('turn', 'fact', 'summary', 'insight', 'note')),
            text TEXT NOT NULL,
            importance REAL NOT NULL DEFAULT 0.5,
            at REAL NOT NULL,
            created_at REAL NOT NULL,
            state TEXT NOT NULL DEFAULT 'active'
                CHECK (state IN ('active', 'retracted', 'superseded')),
            superseded_by INTEGER REFERENCES memories (id) ON DELETE SET NULL,
            pinned INTEGER NOT NULL DEFAULT 0,
            speaker TEXT,
            role TEXT,
            embedded INTEGER NOT NULL DEFAULT 0,
            meta TEXT NOT NULL DEFAULT '{}'
        );
        CREATE INDEX memories_scope ON memories (scope_id, state, kind);
        CREATE INDEX memories_unembedded ON memories (id)
            WHERE embedded = 0 AND state = 'active';
        CREATE INDEX memories_superseded_by ON memories (superseded_by)
            WHERE superseded_by IS NOT NULL;

        CREATE TABLE memory_sources (
            memory_id INTEGER NOT NULL REFERENCES memories (id) ON DELETE CASCADE,
            message_id INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
            PRIMARY KEY (memory_id, message_id)
        ) WITHOUT ROWID;
        CREATE INDEX memory_sources_message ON memory_sources (message_id);

        -- Vectors. ``embeddings`` holds each memory's unit float32 vector (exact
        -- re-scoring); ``vector_packs`` holds the sign bits of the active ones, packed
        -- per scope in blobs of up to PACK_SIZE entries for a fast scan (vectors.py).
        CREATE TABLE embeddings (
            memory_id INTEGER PRIMARY KEY REFERENCES memories (id) ON DELETE CASCADE,
            vector BLOB NOT NULL,
            pack INTEGER,
            slot INTEGER
        );
        CREATE INDEX embeddings_pack ON embeddings (pack) WHERE pack IS NOT NULL;

        -- AUTOINCREMENT: a pack id is never reused, so (id, version) names one content
        -- for the readers' caches; every rewrite of a pack bumps its version.
        CREATE TABLE vector_packs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            scope_id INTEGER NOT NULL REFERENCES scopes (id) ON DELETE CASCADE,
            version INTEGER NOT NULL DEFAULT 0,
            ids BLOB NOT NULL,
            bits BLOB NOT NULL,
            dirty INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX vector_packs_scope ON vector_packs (scope_id);
        CREATE INDEX vector_packs_dirty ON vector_packs (id) WHERE dirty = 1;

        -- A pack entry goes stale when its memory loses its vector or leaves 'active':
        -- the pack is marked dirty (searches mask it, compaction rewrites it).
        CREATE TRIGGER embeddings_stale AFTER DELETE ON embeddings
        WHEN old.pack IS NOT NULL
        BEGIN
            -- "AND dirty = 0": rewriting a pack row (blobs and all) once is enough.
            UPDATE vector_packs SET dirty = 1 WHERE id = old.pack AND dirty = 0;
        END;
        CREATE TRIGGER memories_deactivated AFTER UPDATE OF state ON memories
        WHEN old.state = 'active' AND new.state != 'active'
        BEGIN
            UPDATE vector_packs SET dirty = 1
            WHERE id = (SELECT pack FROM embeddings WHERE memory_id = new.id) AND dirty = 0;
        END;
        -- Back to 'active' (rare; no API does it today): embed it again.
        CREATE TRIGGER memories_reactivated AFTER UPDATE OF state ON memories
        WHEN new.state = 'active' AND old.state != 'active'
        BEGIN
            DELETE FROM embeddings WHERE memory_id = new.id;
            UPDATE memories SET embedded = 0 WHERE id = new.id;
        END;

        -- Keyword search. Contentless FTS5 over the *active* memories, kept so by
        -- triggers. Its rowid is (scope_id << 40) + memory id, so that a search is
        -- confined to a scope by a rowid range, which FTS5 applies inside its scan
        -- (a scope column in the MATCH would cost a count of the whole scope).
        CREATE VIRTUAL TABLE memories_fts USING fts5 (
            text,
            content = '',
            tokenize = 'porter unicode61 remove_diacritics 2'
        );
        CREATE VIRTUAL TABLE memories_fts_vocab USING fts5vocab (memories_fts, 'row');

        CREATE TRIGGER memories_fts_insert AFTER INSERT ON memories
        WHEN new.state = 'active'
        BEGIN
            INSERT INTO memories_fts (rowid, text) VALUES ((new.scope_id << 40) + new.id, new.text);
        END;
        CREATE TRIGGER memories_fts_delete AFTER DELETE ON memories
        WHEN old.state = 'active'
        BEGIN
            INSERT INTO memories_fts (memories_fts, rowid, text)
            VALUES ('delete', (old.scope_id << 40) + old.id, old.text);
        END;
        -- One trigger, so that the old row always leaves the index before the new
        -- one enters (separate triggers fire in an order SQLite does not promise).
        CREATE TRIGGER memories_fts_update AFTER UPDATE OF state, text, scope_id ON memories
        WHEN old.state = 'active' OR new.state = 'active'
        BEGIN
            INSERT INTO memories_fts (memories_fts, rowid, text)
            SELECT 'delete', (old.scope_id << 40) + old.id, old.text WHERE old.state = 'active';
            INSERT INTO memories_fts (rowid, text)
            SELECT (new.scope_id << 40) + new.id, new.text WHERE new.state = 'active';
        END;

        CREATE TABLE summaries (
            id INTEGER PRIMARY KEY,
            scope_id INTEGER NOT NULL REFERENCES scopes (id) ON DELETE CASCADE,
            text TEXT NOT NULL,
            created_at REAL NOT NULL,
            covers_until_seq INTEGER NOT NULL,
            state TEXT NOT NULL DEFAULT 'active'
                CHECK (state IN ('active', 'archived', 'retracted')),
            meta TEXT NOT NULL DEFAULT '{}'
        );
        CREATE INDEX summaries_scope ON summaries (scope_id, state, id);
        -- At most one active summary per scope.
        CREATE UNIQUE INDEX summaries_one_active ON summaries (scope_id) WHERE state = 'active';

        CREATE TABLE style (
            scope_id INTEGER PRIMARY KEY REFERENCES scopes (id) ON DELETE CASCADE,
            text TEXT NOT NULL,
            message_id INTEGER REFERENCES messages (id) ON DELETE SET NULL,
            source TEXT NOT NULL CHECK (source IN ('auto', 'manual')),
            enabled INTEGER NOT NULL DEFAULT 1,
            updated_at REAL NOT NULL
        );
        CREATE INDEX style_message ON style (message_id) WHERE message_id IS NOT NULL;

        CREATE TABLE jobs (
            id INTEGER PRIMARY KEY,
            scope_id INTEGER REFERENCES scopes (id) ON DELETE CASCADE,
            kind TEXT NOT NULL,
            payload TEXT NOT NULL DEFAULT '{}',
            state TEXT NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'running', 'done', 'failed')),
            attempts INTEGER NOT NULL DEFAULT 0,
            run_after REAL NOT NULL,
            last_error TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        );
        CREATE INDEX jobs_claim ON jobs (state, run_after, id);
        CREATE INDEX jobs_scope ON jobs (scope_id) WHERE scope_id IS NOT NULL;

        CREATE TABLE requests (
            id TEXT PRIMARY KEY,
            scope_id INTEGER REFERENCES scopes (id) ON DELETE CASCADE,
            created_at REAL NOT NULL,
            detail TEXT NOT NULL DEFAULT '{}'
        );
        CREATE INDEX requests_scope ON requests (scope_id, created_at);
        CREATE INDEX requests_created ON requests (created_at);
        """,
    )


def m002_chat_threads(conn: Connection) -> None:
    """Messages belong to a chat (`thread`) within their scope: one scope can hold several
    chats with the same character, and undo must never reach from one into another."""
    _execute_script(
        conn,
        """
        ALTER TABLE messages ADD COLUMN thread INTEGER NOT NULL DEFAULT 0;
        CREATE INDEX messages_by_thread ON messages (scope_id, thread, seq);
        """,
    )


def m003_pinned_index(conn: Connection) -> None:
    """Pinned memories by scope: every chat request reads them, and without this index
    finding them meant scanning the scope (~20 ms at 100k memories, bench/memory.py)."""
    _execute_script(
        conn,
        """
        CREATE INDEX memories_pinned ON memories (scope_id, id) WHERE pinned = 1;
        """,
    )


def m004_memory_ids_not_reused(conn: Connection) -> None:
    """Remember the highest memory id ever deleted (`records.insert_memories` numbers
    new memories above it): SQLite hands out the largest id + 1, so deleting the newest
    memory gave its id to the next one, and a retried DELETE removed that one."""
    _execute_script(
        conn,
        f"""
        CREATE TRIGGER memories_deleted_top AFTER DELETE ON memories
        WHEN old.id > coalesce((SELECT max(id) FROM memories), 0)
        BEGIN
            INSERT INTO meta (key, value) VALUES ('{MEMORY_ID_FLOOR}', old.id)
            ON CONFLICT (key) DO UPDATE SET value = max(CAST(value AS INTEGER), old.id);
        END;
        """,
    )


def m005_memory_changes(conn: Connection) -> None:
    """Log which memories changed (`recall_rows`): the readers keep the rows that recall
    ranks in memory, and drop those the log names. Inserts are not logged (a new id was
    never cached), nor `embedded`/`meta` updates (recall does not read them). The log
    keeps its last ~8k entries; a cache further behind starts over."""
    _execute_script(
        conn,
        """
        CREATE TABLE memory_changes (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            memory_id INTEGER NOT NULL
        );
        CREATE TRIGGER memory_changes_update
        AFTER UPDATE OF scope_id, kind, text, importance, at, state, pinned, speaker, role
        ON memories
        BEGIN
            INSERT INTO memory_changes (memory_id) VALUES (old.id);
        END;
        CREATE TRIGGER memory_changes_delete AFTER DELETE ON memories
        BEGIN
            INSERT INTO memory_changes (memory_id) VALUES (old.id);
        END;
        CREATE TRIGGER memory_changes_sources AFTER DELETE ON memory_sources
        BEGIN
            INSERT INTO memory_changes (memory_id) VALUES (old.memory_id);
        END;
        CREATE TRIGGER memory_changes_pruned AFTER INSERT ON memory_changes
        WHEN new.seq % 1024 = 0
        BEGIN
            DELETE FROM memory_changes WHERE seq <= new.seq - 8192;
        END;
        """,
    )


def m006_private_messages(conn: Connection) -> None:
    """Mark messages of an `X-Memory-Write: off` exchange `private`: they are stored
    without their text (content '', raw '{}'), only for the transcript to recognise them
    when the app sends them again, and nothing reads them for memory (before this, such
    an exchange left no trace and the next request stored it as new messages)."""
    _execute_script(
        conn,
        """
        ALTER TABLE messages ADD COLUMN private INTEGER NOT NULL DEFAULT 0;
        """,
    )


def m007_scope_aliases(conn: Connection) -> None:
    """The names a scope had before it was renamed: a chat that names its scope itself
    (Open WebUI's chat id, the automatic name of a character) keeps sending the old
    name, and must still reach the scope rather than start an empty one."""
    _execute_script(
        conn,
        """
        CREATE TABLE scope_aliases (
            owner TEXT NOT NULL,
            name TEXT NOT NULL,
            scope_id INTEGER NOT NULL REFERENCES scopes (id) ON DELETE CASCADE,
            PRIMARY KEY (owner, name)
        ) WITHOUT ROWID;
        CREATE INDEX scope_aliases_scope ON scope_aliases (scope_id);
        """,
    )


MIGRATIONS: tuple[Migration, ...] = (
    m001_initial,
    m002_chat_threads,
    m003_pinned_index,
    m004_memory_ids_not_reused,
    m005_memory_changes,
    m006_private_messages,
    m007_scope_aliases,
)


def _execute_script(conn: Connection, script: str) -> None:
    """Run ``script`` statement by statement inside the caller's transaction.

    ``executescript`` would COMMIT the open transaction first, which would make a
    failed migration half-applied; splitting on complete statements keeps it atomic.
    """
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite_driver().complete_statement(pending):
            if pending.strip():
                conn.execute(pending)
            pending = ""
    if pending.strip():
        raise ValueError(f"incomplete SQL statement in migration: {pending.strip()[:80]}")


def migration_number(migration: Migration) -> int:
    """The number of a migration, from its name: ``m001_initial`` -> 1."""
    return int(migration.__name__[1:4])


def latest_version() -> int:
    """The schema version this code writes."""
    return migration_number(MIGRATIONS[-1])


def schema_version(conn: Connection) -> int:
    """The schema version recorded in the file (0 for a new file)."""
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: Connection, path: Path | str = "<store>") -> int:
    """Bring the file up to the latest schema; return the version it is at.

    Raises StoreTooNew for a file written by a newer mnemoproxy, StoreError for a
    SQLite file that belongs to another application. ``conn`` must be in autocommit
    mode (no transaction open).
    """
    numbers = [migration_number(m) for m in MIGRATIONS]
    if numbers != sorted(set(numbers)):
        raise RuntimeError(f"migrations are not numbered in order: {numbers}")
    for migration, number in zip(MIGRATIONS, numbers, strict=True):
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Checked inside the write lock: another process may have migrated.
            current = _checked_version(conn, path)
            if current >= number:
                conn.execute("ROLLBACK")
                continue
            migration(conn)
            conn.execute(f"PRAGMA user_version = {number}")
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    return _checked_version(conn, path)


def _checked_version(conn: Connection, path: Path | str) -> int:
    version = schema_version(conn)
    app_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
    if app_id not in (0, APPLICATION_ID):
        raise StoreError(f"{path} is a SQLite database of another application, not a memory store")
    if app_id == 0 and version == 0:
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if tables:
            raise StoreError(
                f"{path} is a SQLite database with other tables, not a memory store; "
                "refusing to add ours to it"
            )
    latest = latest_version()
    if version > latest:
        raise StoreTooNew(
            f"the memory store {path} has schema version {version}, written by a newer "
            f"mnemoproxy; this version understands up to {latest}. Upgrade mnemoproxy "
            "(downgrading the file is not supported)."
        )
    return version
