-- Durable groups: processes subscribing under one group name share the completions of the flow
-- partitions through fenced leases, and the group's acknowledged position per partition lives
-- here (see src/backends/groups.rs for the rules; src/backends/sqlite/groups.rs keeps them, each
-- operation in one BEGIN IMMEDIATE transaction, with SQLite's clock in epoch milliseconds).
-- Positions are (major, hi, lo) compared as a row: (0, 0, event_id) on SQLite.

-- A group.
CREATE TABLE IF NOT EXISTS ff_completion_group (
    group_name     TEXT PRIMARY KEY,
    created_at_ms  INTEGER NOT NULL
) WITHOUT ROWID;

-- A group's members and when each one's membership lapses without another heartbeat.
CREATE TABLE IF NOT EXISTS ff_completion_group_member (
    group_name     TEXT NOT NULL REFERENCES ff_completion_group (group_name) ON DELETE CASCADE,
    member         TEXT NOT NULL,
    expires_at_ms  INTEGER NOT NULL,
    PRIMARY KEY (group_name, member)
) WITHOUT ROWID;

-- One lease per flow partition of a group: its holder (NULL: free) until expires_at_ms, the
-- fencing token and the acknowledged position.
CREATE TABLE IF NOT EXISTS ff_completion_group_partition (
    group_name     TEXT NOT NULL REFERENCES ff_completion_group (group_name) ON DELETE CASCADE,
    partition      INTEGER NOT NULL,
    owner          TEXT,
    token          INTEGER NOT NULL DEFAULT 0,
    expires_at_ms  INTEGER,
    acked_major    INTEGER NOT NULL,
    acked_hi       INTEGER NOT NULL,
    acked_lo       INTEGER NOT NULL,
    PRIMARY KEY (group_name, partition)
) WITHOUT ROWID;
