-- The demo engine's schema for SQLite: flows, executions, dependency edges, leases, waitpoints and
-- signal deliveries, and the triggers that write their completions, lease history and signal
-- deliveries into the subsystem's outbox (`ff_completion_event`, installed by ff-completions) in
-- the same transaction as each state change (SQLite has no stored functions). Applied with the
-- ledger `ff_completions_demo_migrations`, after the subsystem's own migrations. Every object is
-- created only when missing: a database of an earlier version, whose migrations created them
-- all, is taken as it is.

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
    updated_at_ms   INTEGER NOT NULL,
    -- Leases: a new lease_id at each claim; lease_state is active | expired | revoked |
    -- released; a heartbeat bumps lease_renewals.
    lease_id            TEXT,
    lease_state         TEXT,
    lease_expires_at_ms INTEGER,
    lease_renewals      INTEGER NOT NULL DEFAULT 0,
    lease_revoked_by    TEXT
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

-- The expiry sweep's scan.
CREATE INDEX IF NOT EXISTS ff_execution_lease_expiry_idx ON ff_execution (lease_state, lease_expires_at_ms)
    WHERE lease_state = 'active';

-- Waitpoints: state is open | satisfied.
CREATE TABLE IF NOT EXISTS ff_waitpoint (
    execution_id  TEXT NOT NULL REFERENCES ff_execution (execution_id),
    waitpoint_id  TEXT NOT NULL,
    state         TEXT NOT NULL,
    PRIMARY KEY (execution_id, waitpoint_id)
);

-- Every signal delivery and its effect; a buffered one is consumed when its waitpoint opens.
CREATE TABLE IF NOT EXISTS ff_signal_delivery (
    delivery_id      INTEGER PRIMARY KEY AUTOINCREMENT,
    execution_id     TEXT NOT NULL REFERENCES ff_execution (execution_id),
    waitpoint_id     TEXT NOT NULL,
    signal_id        TEXT NOT NULL,
    idempotency_key  TEXT,
    source_identity  TEXT,
    effect           TEXT NOT NULL,
    consumed         INTEGER NOT NULL DEFAULT 0,
    delivered_at_ms  INTEGER NOT NULL
);

CREATE INDEX IF NOT EXISTS ff_signal_delivery_key_idx ON ff_signal_delivery (execution_id, idempotency_key);
CREATE INDEX IF NOT EXISTS ff_signal_delivery_buffered_idx ON ff_signal_delivery (execution_id, waitpoint_id)
    WHERE effect = 'buffered' AND consumed = 0;

-- Producers. A claim sets a new lease_id: `acquired`, or `reclaimed` when the previous lease
-- had expired.
CREATE TRIGGER IF NOT EXISTS ff_execution_lease_claimed_trg
AFTER UPDATE OF lease_id ON ff_execution
WHEN NEW.lease_id IS NOT NULL AND NEW.lease_id IS NOT OLD.lease_id
BEGIN
    INSERT INTO ff_completion_event
        (family, outcome, execution_id, flow_id, namespace, occurred_at_ms, partition_key, lease_id, worker)
    VALUES
        ('lease_history', CASE WHEN OLD.lease_state = 'expired' THEN 'reclaimed' ELSE 'acquired' END,
         NEW.execution_id, NEW.flow_id, NEW.namespace,
         CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER), NEW.partition_key, NEW.lease_id, NEW.worker);
END;

-- A heartbeat.
CREATE TRIGGER IF NOT EXISTS ff_execution_lease_renewed_trg
AFTER UPDATE OF lease_renewals ON ff_execution
WHEN NEW.lease_renewals > OLD.lease_renewals
BEGIN
    INSERT INTO ff_completion_event
        (family, outcome, execution_id, flow_id, namespace, occurred_at_ms, partition_key, lease_id, worker)
    VALUES
        ('lease_history', 'renewed', NEW.execution_id, NEW.flow_id, NEW.namespace,
         CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER), NEW.partition_key, NEW.lease_id, NEW.worker);
END;

-- The expiry sweep and an operator's revoke end an active lease.
CREATE TRIGGER IF NOT EXISTS ff_execution_lease_ended_trg
AFTER UPDATE OF lease_state ON ff_execution
WHEN OLD.lease_state = 'active' AND NEW.lease_state IN ('expired', 'revoked')
BEGIN
    INSERT INTO ff_completion_event
        (family, outcome, execution_id, flow_id, namespace, occurred_at_ms, partition_key, lease_id, worker, revoked_by)
    VALUES
        ('lease_history', NEW.lease_state, NEW.execution_id, NEW.flow_id, NEW.namespace,
         CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER), NEW.partition_key, OLD.lease_id, OLD.worker,
         CASE WHEN NEW.lease_state = 'revoked' THEN NEW.lease_revoked_by END);
END;

-- A signal delivery: its event, and when it satisfies an open waitpoint, the waitpoint and the
-- execution's release.
CREATE TRIGGER IF NOT EXISTS ff_signal_delivery_trg
AFTER INSERT ON ff_signal_delivery
BEGIN
    INSERT INTO ff_completion_event
        (family, outcome, execution_id, flow_id, namespace, occurred_at_ms, partition_key, signal_id, waitpoint_id,
         source_identity)
    SELECT 'signal_delivery', NEW.effect, e.execution_id, e.flow_id, e.namespace,
           CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER), e.partition_key, NEW.signal_id,
           NEW.waitpoint_id, NEW.source_identity
      FROM ff_execution e WHERE e.execution_id = NEW.execution_id;
    UPDATE ff_waitpoint SET state = 'satisfied'
     WHERE NEW.effect = 'satisfied' AND execution_id = NEW.execution_id AND waitpoint_id = NEW.waitpoint_id;
    UPDATE ff_execution SET state = 'eligible', updated_at_ms = NEW.delivered_at_ms
     WHERE NEW.effect = 'satisfied' AND execution_id = NEW.execution_id AND state = 'suspended';
END;
