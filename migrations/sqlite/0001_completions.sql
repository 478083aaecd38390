-- ff-completions schema for SQLite: the completion outbox and the retention boundary. Producers
-- (the host's, or the demo engine's triggers) insert into the outbox in the transaction of the
-- state change. Applied with the ledger `ff_completions_migrations`; a database migrated by an
-- earlier version (ledger `_sqlx_migrations`, whose migrations also created the demo engine's
-- tables) has these objects already and is recorded as migrated without running them again.

-- The completion outbox; AUTOINCREMENT ids are in commit order (one writer at a time).
CREATE TABLE IF NOT EXISTS ff_completion_event (
    event_id        INTEGER PRIMARY KEY AUTOINCREMENT,
    execution_id    TEXT,
    flow_id         TEXT,
    outcome         TEXT,
    namespace       TEXT,
    instance_tag    TEXT,
    occurred_at_ms  INTEGER,
    partition_key   INTEGER,
    tags            TEXT
);

-- The highest event_id ever trimmed; cursors below it have expired.
CREATE TABLE IF NOT EXISTS ff_completion_retention (
    id                INTEGER PRIMARY KEY CHECK (id = 1),
    trimmed_event_id  INTEGER NOT NULL
);
