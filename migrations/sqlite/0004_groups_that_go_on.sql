-- Durable groups that never stall, die or repeat (see src/backends/groups.rs for the rules, and
-- src/backends/sqlite/groups.rs, which keeps them): the incarnation of each member and of each
-- partition's holder, the unacknowledged count a heartbeat records, the attempts of the event
-- a partition's consumers refuse now, and the parked events.

-- The process that holds the member id now.
ALTER TABLE ff_completion_group_member ADD COLUMN incarnation TEXT;

-- The holder's incarnation (a newer one raises the token), its unacknowledged events, and the
-- refused event's position, attempts and last reason.
ALTER TABLE ff_completion_group_partition ADD COLUMN owner_incarnation TEXT;
ALTER TABLE ff_completion_group_partition ADD COLUMN unacked INTEGER NOT NULL DEFAULT 0;
ALTER TABLE ff_completion_group_partition ADD COLUMN retry_major INTEGER;
ALTER TABLE ff_completion_group_partition ADD COLUMN retry_hi INTEGER;
ALTER TABLE ff_completion_group_partition ADD COLUMN retry_lo INTEGER;
ALTER TABLE ff_completion_group_partition ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE ff_completion_group_partition ADD COLUMN last_reason TEXT;

-- Events a group's consumers refused as often as the group allows: the event as delivered
-- (JSON), the last reason, the attempts, when, and whether an operator asked to replay it.
CREATE TABLE IF NOT EXISTS ff_completion_group_parked (
    group_name    TEXT NOT NULL REFERENCES ff_completion_group (group_name) ON DELETE CASCADE,
    partition     INTEGER NOT NULL,
    major         INTEGER NOT NULL,
    hi            INTEGER NOT NULL,
    lo            INTEGER NOT NULL,
    event         TEXT NOT NULL,
    reason        TEXT NOT NULL,
    attempts      INTEGER NOT NULL,
    parked_at_ms  INTEGER NOT NULL,
    replay        INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (group_name, partition, major, hi, lo)
) WITHOUT ROWID;
