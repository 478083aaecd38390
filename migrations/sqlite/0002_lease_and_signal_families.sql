-- Lease history and signal delivery: two more event families in the completion outbox.
--
-- The families share ff_completion_event (a `family` column; NULL is a completion, as every
-- row written before this migration): one AUTOINCREMENT order for every family, so one
-- listener reads one sequence, a cursor of any family is a position in it, and retention and
-- the trim boundary work unchanged. `outcome` holds the event's kind within its family: the
-- completion outcome, the lease kind (acquired, renewed, expired, reclaimed, revoked) or the
-- signal effect (satisfied, buffered, deduped).
ALTER TABLE ff_completion_event ADD COLUMN family TEXT;
ALTER TABLE ff_completion_event ADD COLUMN lease_id TEXT;
-- The lease's holder (acquired, renewed, revoked), previous owner (expired) or new owner (reclaimed).
ALTER TABLE ff_completion_event ADD COLUMN worker TEXT;
ALTER TABLE ff_completion_event ADD COLUMN revoked_by TEXT;
ALTER TABLE ff_completion_event ADD COLUMN signal_id TEXT;
ALTER TABLE ff_completion_event ADD COLUMN waitpoint_id TEXT;
ALTER TABLE ff_completion_event ADD COLUMN source_identity TEXT;
