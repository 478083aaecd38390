-- ff-completions for Postgres, part 2: the reader's index, in its own transaction so that building
-- it on an adopted outbox holds only a SHARE lock (reads go on; inserts wait for the build).

-- Batch reads and trims: (txid, event_id) order; rows from before adoption (NULL txid) by IS NULL.
CREATE INDEX IF NOT EXISTS ff_completion_event_txid_idx ON ff_completion_event (txid, event_id);
