-- ff-completions schema for SQLite: flows, executions, dependency edges, the completion outbox,
-- and the trigger that writes a completion in the same transaction as every terminal transition.

-- Flows: a DAG of executions under one namespace.
CREATE TABLE IF NOT EXISTS ff_flow (
    flow_id        TEXT PRIMARY KEY,
    namespace      TEXT,
    state          TEXT NOT NULL DEFAULT 'open',
    created_at_ms  INTEGER NOT NULL
);

-- Executions: state is blocked | eligible | running | success | failed | cancelled | expired | skipped.
CREATE TABLE IF NOT EXISTS ff_execution (
    execution_id    TEXT PRIMARY KEY,
    partition_key   INTEGER NOT NULL,
    flow_id         TEXT REFERENCES ff_flow (flow_id),
    namespace       TEXT,
    tags            TEXT NOT NULL DEFAULT '{}',
    state           TEXT NOT NULL,
    attempt         INTEGER NOT NULL DEFAULT 0,
    max_attempts    INTEGER NOT NULL DEFAULT 1,
    pending_parents INTEGER NOT NULL DEFAULT 0,
    worker          TEXT,
    created_at_ms   INTEGER NOT NULL,
    updated_at_ms   INTEGER NOT NULL
);

-- Claim scan: eligible executions, oldest first.
CREATE INDEX IF NOT EXISTS ff_execution_eligible_idx ON ff_execution (state, created_at_ms);
-- Flow cancellation scan.
CREATE INDEX IF NOT EXISTS ff_execution_flow_idx ON ff_execution (flow_id);

-- Dependency edges: state is pending | satisfied | failed.
CREATE TABLE IF NOT EXISTS ff_dependency (
    parent_id  TEXT NOT NULL REFERENCES ff_execution (execution_id),
    child_id   TEXT NOT NULL REFERENCES ff_execution (execution_id),
    state      TEXT NOT NULL DEFAULT 'pending',
    PRIMARY KEY (parent_id, child_id)
);

-- Reverse lookup of a child's parents.
CREATE INDEX IF NOT EXISTS ff_dependency_child_idx ON ff_dependency (child_id);

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

-- The producer: every transition into a terminal state writes its completion atomically.
CREATE TRIGGER IF NOT EXISTS ff_execution_completion_trg
AFTER UPDATE OF state ON ff_execution
WHEN NEW.state IN ('success', 'failed', 'cancelled', 'expired', 'skipped')
 AND OLD.state NOT IN ('success', 'failed', 'cancelled', 'expired', 'skipped')
BEGIN
    INSERT INTO ff_completion_event
        (execution_id, flow_id, outcome, namespace, occurred_at_ms, partition_key, tags)
    VALUES
        (NEW.execution_id, NEW.flow_id, NEW.state, NEW.namespace,
         CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER), NEW.partition_key, NEW.tags);
END;
