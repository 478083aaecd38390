-- Retention for the completion outbox: a trim job removes a prefix in reader order and records
-- where it stopped, so a cursor below that point is reported as expired, never skipped.

-- The highest (txid, event_id) ever trimmed; one row at most.
CREATE TABLE IF NOT EXISTS ff_completion_retention (
    id                boolean PRIMARY KEY DEFAULT true CHECK (id),
    trimmed_txid      xid8 NOT NULL,
    trimmed_event_id  bigint NOT NULL
);

-- Removes readable completions older than p_before_ms and beyond the newest p_keep rows (either
-- may be NULL), as one prefix in (txid, event_id) order. Returns the rows removed.
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
    DELETE FROM ff_completion_event WHERE (txid, event_id) <= (cut_txid, cut_event);
    GET DIAGNOSTICS n = ROW_COUNT;
    INSERT INTO ff_completion_retention (trimmed_txid, trimmed_event_id) VALUES (cut_txid, cut_event)
    ON CONFLICT (id) DO UPDATE SET trimmed_txid = EXCLUDED.trimmed_txid, trimmed_event_id = EXCLUDED.trimmed_event_id
     WHERE (ff_completion_retention.trimmed_txid, ff_completion_retention.trimmed_event_id)
         < (EXCLUDED.trimmed_txid, EXCLUDED.trimmed_event_id);
    RETURN n;
END
$$;
