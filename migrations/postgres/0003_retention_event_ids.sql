-- An event_id-only cursor (the original 9-byte form) says nothing of transactions, so the
-- (txid, event_id) boundary cannot tell whether a trimmed row was one it had not seen. The
-- highest event_id ever trimmed can: a cursor below it has lost a row and is expired. NULL
-- where trimming ran before this column existed (unknown: such cursors are expired).
ALTER TABLE ff_completion_retention ADD COLUMN IF NOT EXISTS trimmed_max_event_id bigint;

-- As in 0002_retention.sql, and it also records the highest event_id removed.
CREATE OR REPLACE FUNCTION ff_trim_completions(p_before_ms bigint, p_keep bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    horizon xid8 := pg_snapshot_xmin(pg_current_snapshot());
    age_txid xid8;
    age_event bigint;
    count_txid xid8;
    count_event bigint;
    cut_txid xid8;
    cut_event bigint;
    n bigint;
    removed_max bigint;
BEGIN
    IF p_before_ms IS NOT NULL THEN
        SELECT txid, event_id INTO age_txid, age_event FROM ff_completion_event
         WHERE txid < horizon AND occurred_at_ms < p_before_ms
         ORDER BY txid DESC, event_id DESC LIMIT 1;
    END IF;
    IF p_keep IS NOT NULL THEN
        SELECT txid, event_id INTO count_txid, count_event FROM ff_completion_event
         WHERE txid < horizon
         ORDER BY txid DESC, event_id DESC OFFSET greatest(p_keep, 0) LIMIT 1;
    END IF;
    IF age_txid IS NULL OR (count_txid IS NOT NULL AND (count_txid, count_event) > (age_txid, age_event)) THEN
        cut_txid := count_txid;
        cut_event := count_event;
    ELSE
        cut_txid := age_txid;
        cut_event := age_event;
    END IF;
    IF cut_txid IS NULL THEN
        RETURN 0;
    END IF;
    WITH removed AS (
        DELETE FROM ff_completion_event WHERE (txid, event_id) <= (cut_txid, cut_event) RETURNING event_id
    )
    SELECT count(*), max(event_id) INTO n, removed_max FROM removed;
    IF n = 0 THEN
        RETURN 0;
    END IF;
    INSERT INTO ff_completion_retention (trimmed_txid, trimmed_event_id, trimmed_max_event_id)
    VALUES (cut_txid, cut_event, removed_max)
    ON CONFLICT (id) DO UPDATE SET trimmed_txid = EXCLUDED.trimmed_txid, trimmed_event_id = EXCLUDED.trimmed_event_id
     WHERE (ff_completion_retention.trimmed_txid, ff_completion_retention.trimmed_event_id)
         < (EXCLUDED.trimmed_txid, EXCLUDED.trimmed_event_id);
    -- Only where it is known: NULL (trimmed before this column) stays unknown.
    UPDATE ff_completion_retention SET trimmed_max_event_id = greatest(trimmed_max_event_id, removed_max)
     WHERE trimmed_max_event_id IS NOT NULL;
    RETURN n;
END
$$;
