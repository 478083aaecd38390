-- ff-completions for Postgres, part 3: the reader. Completions are read in batches between
-- successive snapshots, as PgQ does: tick k records a snapshot, and batch k is the rows visible in
-- tick k's snapshot and not in tick k-1's. An open transaction anywhere in the cluster never holds
-- a batch back: its rows join the batch of the first tick taken after it commits. Two index probes
-- read a batch, however old the oldest open transaction is.
--
-- Positions, in reader order, are (major, txid, event_id): major 3k is batch k, 3k+1 is batch k
-- read whole (every row visible in tick k: how cursors of earlier forms resume), 3k+2 with (0, 0)
-- is the end of batch k. Rows from before the outbox was adopted (NULL txid) come first, txid 0.

-- Recorded snapshots; a reader records one when rows committed since the newest.
CREATE TABLE IF NOT EXISTS ff_completion_tick (
    tick_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    snapshot       pg_snapshot NOT NULL,
    created_at_ms  bigint NOT NULL
);

-- What retention removed; one row at most. Reader positions below (trimmed_batch, trimmed_txid,
-- trimmed_event_id) may have lost rows; so may cursors of the earlier forms below the highest
-- (txid, event_id) removed (trimmed_txid, trimmed_event_id) or the highest event_id removed.
CREATE TABLE IF NOT EXISTS ff_completion_retention (
    id                    boolean PRIMARY KEY DEFAULT true CHECK (id),
    trimmed_txid          xid8 NOT NULL,
    trimmed_event_id      bigint NOT NULL
);
ALTER TABLE ff_completion_retention ADD COLUMN IF NOT EXISTS trimmed_max_event_id bigint;
ALTER TABLE ff_completion_retention ADD COLUMN IF NOT EXISTS trimmed_batch bigint;

-- Milliseconds since the epoch, from the wall clock.
CREATE OR REPLACE FUNCTION ff_completions_now_ms() RETURNS bigint
LANGUAGE sql VOLATILE AS $$ SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint $$;

-- Whether rows not visible in snapshot s are visible now (committed since s was taken). Both
-- probes are written so that only the (txid, event_id) index can serve them: a range read from
-- s's xmax in index order, and one lookup per transaction s saw in progress (an EXISTS or an
-- ordered scan filtered by = ANY may walk the whole outbox instead). The redundant `txid <=` keeps
-- the estimate low where one transaction wrote most of the outbox (a bulk load): with `=` alone
-- the planner expects every row to match and walks another index, filtering.
CREATE OR REPLACE FUNCTION ff_completions_committed_since(s pg_snapshot) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT (SELECT e.txid FROM ff_completion_event e WHERE e.txid >= pg_snapshot_xmax(s)
             ORDER BY e.txid, e.event_id LIMIT 1) IS NOT NULL
        OR EXISTS (SELECT 1 FROM pg_snapshot_xip(s) AS x(txid)
                    WHERE EXISTS (SELECT 1 FROM ff_completion_event e WHERE e.txid = x.txid AND e.txid <= x.txid))
$$;

-- The newest tick, after recording a new one when rows committed since it (or when there is none
-- yet). Ticks are taken one at a time under a transaction-scoped advisory lock, each in a
-- statement that starts after its predecessor committed, so every tick's snapshot contains its
-- predecessor's.
CREATE OR REPLACE FUNCTION ff_completions_tick() RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    last_id bigint;
    last_snapshot pg_snapshot;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'ff_completions_tick needs READ COMMITTED, not %', current_setting('transaction_isolation')
            USING ERRCODE = '25000';
    END IF;
    SELECT t.tick_id, t.snapshot INTO last_id, last_snapshot FROM ff_completion_tick t ORDER BY t.tick_id DESC LIMIT 1;
    IF last_id IS NOT NULL AND NOT ff_completions_committed_since(last_snapshot) THEN
        RETURN last_id;
    END IF;
    -- An advisory lock, not a table lock: a table lock would queue behind autovacuum of the tick
    -- table (which Postgres cancels only after deadlock_timeout, a second of stalled reads).
    PERFORM pg_advisory_xact_lock(hashtext('ff_completion_tick'), 0);
    SELECT t.tick_id, t.snapshot INTO last_id, last_snapshot FROM ff_completion_tick t ORDER BY t.tick_id DESC LIMIT 1;
    IF last_id IS NOT NULL AND NOT ff_completions_committed_since(last_snapshot) THEN
        RETURN last_id;
    END IF;
    INSERT INTO ff_completion_tick (snapshot, created_at_ms) VALUES (pg_current_snapshot(), ff_completions_now_ms())
    RETURNING tick_id INTO last_id;
    RETURN last_id;
END
$$;

-- Up to p_limit rows of one batch after (p_txid, p_event_id): visible in s2 and not in s1 (s1 NULL:
-- the whole batch, rows from before adoption first). One index lookup per transaction s1 saw in
-- progress, one index range read above its xmax. Each probe has a single lower bound: given a
-- scalar bound and a row comparison, a btree scan may start from the looser one (the start of
-- the outbox).
CREATE OR REPLACE FUNCTION ff_completions_batch_rows(
    p_major bigint, s1 pg_snapshot, s2 pg_snapshot, p_txid bigint, p_event_id bigint, p_limit integer)
RETURNS TABLE (o_kind integer, o_major bigint, o_txid bigint, o_event_id bigint, o_execution_id text,
               o_flow_id text, o_outcome text, o_namespace text, o_instance_tag text, o_tags text,
               o_occurred_at_ms bigint, o_partition_key integer)
LANGUAGE sql STABLE AS $$
    SELECT 0, p_major, coalesce(e.txid::text::int8, 0), e.event_id, e.execution_id::text, e.flow_id::text,
           e.outcome, e.namespace, e.instance_tag, e.tags::text, e.occurred_at_ms, e.partition_key::int4
      FROM ((SELECT * FROM ff_completion_event e
              WHERE s1 IS NULL AND p_txid = 0 AND e.txid IS NULL AND e.event_id > p_event_id
              ORDER BY e.txid, e.event_id LIMIT p_limit)
            UNION ALL
            (SELECT hit.* FROM pg_snapshot_xip(s1) AS x(txid)
              CROSS JOIN LATERAL (SELECT * FROM ff_completion_event e
                                   WHERE e.txid = x.txid AND e.txid <= x.txid
                                     AND e.event_id > CASE WHEN x.txid = p_txid::text::xid8 THEN p_event_id ELSE -1 END
                                     AND pg_visible_in_snapshot(e.txid, s2)
                                   ORDER BY e.txid, e.event_id LIMIT p_limit) hit
              WHERE s1 IS NOT NULL AND x.txid >= p_txid::text::xid8
              ORDER BY hit.txid, hit.event_id LIMIT p_limit)
            UNION ALL
            (SELECT * FROM ff_completion_event e
              WHERE (e.txid, e.event_id) > (greatest(p_txid::text::xid8, pg_snapshot_xmax(s1)),
                                            CASE WHEN pg_snapshot_xmax(s1) > p_txid::text::xid8 THEN -1 ELSE p_event_id END)
                AND e.txid < pg_snapshot_xmax(s2)
                AND pg_visible_in_snapshot(e.txid, s2)
              ORDER BY e.txid, e.event_id LIMIT p_limit)) e
     ORDER BY e.txid NULLS FIRST, e.event_id
     LIMIT p_limit
$$;

-- Up to p_limit rows after position (p_major, p_txid, p_event_id), in reader order, going on into
-- later batches while the limit allows (recording at most one new tick at the head). o_kind: 0 a row; 2 the end
-- of a batch; 1 history after the position was trimmed (its position is the oldest kept; the
-- caller ignores the other rows then). Checked last, so a trim committed during the reads is seen.
CREATE OR REPLACE FUNCTION ff_completions_read(p_major bigint, p_txid bigint, p_event_id bigint, p_limit integer)
RETURNS TABLE (o_kind integer, o_major bigint, o_txid bigint, o_event_id bigint, o_execution_id text,
               o_flow_id text, o_outcome text, o_namespace text, o_instance_tag text, o_tags text,
               o_occurred_at_ms bigint, o_partition_key integer)
LANGUAGE plpgsql AS $$
DECLARE
    k bigint := p_major / 3;
    phase integer := (p_major % 3)::integer;
    pos_t bigint := p_txid;
    pos_e bigint := p_event_id;
    s1 pg_snapshot;
    s2 pg_snapshot;
    remaining integer := greatest(p_limit, 1);
    got integer;
    next_tick bigint;
    batches integer := 0;
    ticked boolean := false;
    trimmed ff_completion_retention;
BEGIN
    IF k = 0 THEN
        phase := 2;
    END IF;
    LOOP
        IF phase < 2 THEN
            s2 := (SELECT t.snapshot FROM ff_completion_tick t WHERE t.tick_id = k);
            EXIT WHEN s2 IS NULL;
            s1 := NULL;
            IF phase = 0 THEN
                s1 := (SELECT t.snapshot FROM ff_completion_tick t WHERE t.tick_id < k ORDER BY t.tick_id DESC LIMIT 1);
            END IF;
            RETURN QUERY SELECT * FROM ff_completions_batch_rows(3 * k + phase, s1, s2, pos_t, pos_e, remaining);
            GET DIAGNOSTICS got = ROW_COUNT;
            remaining := remaining - got;
            EXIT WHEN remaining <= 0;
            o_kind := 2; o_major := 3 * k + 2; o_txid := 0; o_event_id := 0;
            o_execution_id := NULL; o_flow_id := NULL; o_outcome := NULL; o_namespace := NULL;
            o_instance_tag := NULL; o_tags := NULL; o_occurred_at_ms := NULL; o_partition_key := NULL;
            RETURN NEXT;
        END IF;
        batches := batches + 1;
        EXIT WHEN batches > 64;
        next_tick := (SELECT min(t.tick_id) FROM ff_completion_tick t WHERE t.tick_id > k);
        IF next_tick IS NULL THEN
            -- At the head: one new tick per call, so a call ends while producers keep committing.
            EXIT WHEN ticked;
            ticked := true;
            EXIT WHEN ff_completions_tick() <= k;
            next_tick := (SELECT min(t.tick_id) FROM ff_completion_tick t WHERE t.tick_id > k);
        END IF;
        k := next_tick;
        phase := 0;
        pos_t := 0;
        pos_e := 0;
    END LOOP;
    SELECT * INTO trimmed FROM ff_completion_retention r;
    IF trimmed.trimmed_batch IS NOT NULL
       AND (p_major, p_txid, p_event_id) < (trimmed.trimmed_batch, trimmed.trimmed_txid::text::int8, trimmed.trimmed_event_id) THEN
        RETURN QUERY SELECT 1, trimmed.trimmed_batch, trimmed.trimmed_txid::text::int8, trimmed.trimmed_event_id,
                            NULL::text, NULL::text, NULL::text, NULL::text, NULL::text, NULL::text, NULL::bigint,
                            NULL::integer;
    END IF;
END
$$;

-- Where a cursor of an earlier form resumes: the whole batch of the newest tick, from just before
-- the first row it had not seen. p_txid NULL: the 9-byte event_id cursor (the rows with a higher
-- event_id are the unseen ones); otherwise the 17-byte (txid, event_id) cursor. Returns
-- (major, txid, event_id).
CREATE OR REPLACE FUNCTION ff_completions_resume_earlier_form(p_txid bigint, p_event_id bigint)
RETURNS TABLE (o_major bigint, o_txid bigint, o_event_id bigint)
LANGUAGE plpgsql AS $$
DECLARE
    k bigint := ff_completions_tick();
    first_txid bigint;
BEGIN
    IF p_txid IS NOT NULL THEN
        RETURN QUERY SELECT 3 * k + 1, p_txid, p_event_id;
        RETURN;
    END IF;
    IF (SELECT e.event_id FROM ff_completion_event e WHERE e.txid IS NULL AND e.event_id > p_event_id
         ORDER BY e.txid, e.event_id LIMIT 1) IS NOT NULL THEN
        RETURN QUERY SELECT 3 * k + 1, 0::bigint, p_event_id;
        RETURN;
    END IF;
    first_txid := (SELECT min(e.txid)::text::int8 FROM ff_completion_event e WHERE e.event_id > p_event_id);
    IF first_txid IS NULL THEN
        RETURN QUERY SELECT 3 * k + 2, 0::bigint, 0::bigint;
    ELSE
        RETURN QUERY SELECT 3 * k + 1, first_txid - 1, 9223372036854775807::bigint;
    END IF;
END
$$;

-- Removes the oldest completions: a prefix in (txid, event_id) order of the rows the newest tick
-- sees, up to the newest row older than p_before_ms or the newest beyond the p_keep newest rows,
-- whichever removes more (either may be NULL). Records the boundary in reader order (the batch of
-- the last removed row to become visible, and the highest (txid, event_id) removed): a cursor
-- below it has lost rows and expires. Ticks no reader after the boundary needs go too.
-- Returns the rows removed.
CREATE OR REPLACE FUNCTION ff_completions_trim(p_before_ms bigint, p_keep bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    newest bigint := ff_completions_tick();
    seen pg_snapshot := (SELECT t.snapshot FROM ff_completion_tick t WHERE t.tick_id = newest);
    age_txid xid8;
    age_event bigint;
    count_txid xid8;
    count_event bigint;
    cut_txid xid8;
    cut_event bigint;
    n bigint;
    max_event bigint;
    lo bigint;
    hi bigint;
    mid bigint;
    last_batch bigint;
BEGIN
    IF p_before_ms IS NOT NULL THEN
        SELECT e.txid, e.event_id INTO age_txid, age_event FROM ff_completion_event e
         WHERE e.txid < pg_snapshot_xmax(seen) AND pg_visible_in_snapshot(e.txid, seen)
           AND e.occurred_at_ms < p_before_ms
         ORDER BY e.txid DESC, e.event_id DESC LIMIT 1;
    END IF;
    IF p_keep IS NOT NULL THEN
        SELECT e.txid, e.event_id INTO count_txid, count_event FROM ff_completion_event e
         WHERE e.txid < pg_snapshot_xmax(seen) AND pg_visible_in_snapshot(e.txid, seen)
         ORDER BY e.txid DESC, e.event_id DESC OFFSET greatest(p_keep, 0) LIMIT 1;
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
    -- The first tick that sees every row to remove (visibility only grows from tick to tick):
    -- a committed txid is visible in a snapshot when below its xmax and not in progress in it.
    lo := coalesce((SELECT min(t.tick_id) FROM ff_completion_tick t), newest);
    hi := newest;
    WHILE lo < hi LOOP
        mid := (SELECT min(t.tick_id) FROM ff_completion_tick t WHERE t.tick_id >= lo + (hi - lo) / 2);
        IF mid >= hi THEN
            -- No tick between the middle and hi: look at lo itself.
            mid := lo;
        END IF;
        IF (SELECT cut_txid < pg_snapshot_xmax(t.snapshot)
                   AND NOT EXISTS (SELECT 1 FROM pg_snapshot_xip(t.snapshot) AS x(txid)
                                    WHERE EXISTS (SELECT 1 FROM ff_completion_event e
                                                   WHERE e.txid = x.txid AND e.txid <= x.txid
                                                     AND (e.txid, e.event_id) <= (cut_txid, cut_event)
                                                     AND pg_visible_in_snapshot(e.txid, seen)))
              FROM ff_completion_tick t WHERE t.tick_id = mid) THEN
            hi := mid;
        ELSE
            lo := (SELECT min(t.tick_id) FROM ff_completion_tick t WHERE t.tick_id > mid);
        END IF;
    END LOOP;
    last_batch := 3 * hi;
    WITH removed AS (
        DELETE FROM ff_completion_event e
         WHERE e.txid IS NULL
            OR ((e.txid, e.event_id) <= (cut_txid, cut_event) AND pg_visible_in_snapshot(e.txid, seen))
        RETURNING e.event_id
    )
    SELECT count(*), max(r.event_id) INTO n, max_event FROM removed r;
    INSERT INTO ff_completion_retention AS r (trimmed_txid, trimmed_event_id, trimmed_max_event_id, trimmed_batch)
    VALUES (cut_txid, cut_event, max_event, last_batch)
    ON CONFLICT (id) DO UPDATE SET
        trimmed_batch = CASE WHEN (EXCLUDED.trimmed_batch, EXCLUDED.trimmed_txid, EXCLUDED.trimmed_event_id)
                                  > (coalesce(r.trimmed_batch, 0), r.trimmed_txid, r.trimmed_event_id)
                             THEN EXCLUDED.trimmed_batch ELSE r.trimmed_batch END,
        trimmed_txid = CASE WHEN (EXCLUDED.trimmed_txid, EXCLUDED.trimmed_event_id) > (r.trimmed_txid, r.trimmed_event_id)
                            THEN EXCLUDED.trimmed_txid ELSE r.trimmed_txid END,
        trimmed_event_id = CASE WHEN (EXCLUDED.trimmed_txid, EXCLUDED.trimmed_event_id) > (r.trimmed_txid, r.trimmed_event_id)
                                THEN EXCLUDED.trimmed_event_id ELSE r.trimmed_event_id END,
        -- NULL means trimmed before this was recorded: unknown, and stays so.
        trimmed_max_event_id = CASE WHEN r.trimmed_max_event_id IS NULL THEN NULL
                                    ELSE greatest(r.trimmed_max_event_id, EXCLUDED.trimmed_max_event_id) END;
    -- A reader at the boundary needs the boundary's tick and the one before it.
    DELETE FROM ff_completion_tick t
     WHERE t.tick_id < (SELECT coalesce(max(p.tick_id), 0) FROM ff_completion_tick p
                         WHERE p.tick_id < (SELECT r.trimmed_batch / 3 FROM ff_completion_retention r));
    RETURN n;
END
$$;

-- Wakes the listeners. Producers call it after their commit, on any connection (the demo engine
-- does, coalesced): inside the producer's transaction a NOTIFY would hold Postgres' notify lock
-- through the commit's WAL flush and serialise committing producers. Listeners also poll, so a
-- producer that never calls it is still delivered, a few milliseconds to 100 ms later.
CREATE OR REPLACE FUNCTION ff_completions_wake() RETURNS void
LANGUAGE sql AS $$ SELECT pg_notify('ff_completion', '') $$;

-- The opt-in in-commit wake-up: one empty NOTIFY per inserting statement.
CREATE OR REPLACE FUNCTION ff_completions_wake_in_commit() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('ff_completion', '');
    RETURN NULL;
END
$$;

-- Installs (true) or removes (false) the opt-in trigger ff_completions_wake_trg, for producers
-- that cannot call ff_completions_wake() after committing; it serialises committing producers.
CREATE OR REPLACE FUNCTION ff_completions_set_commit_trigger(p_on boolean) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    DROP TRIGGER IF EXISTS ff_completions_wake_trg ON ff_completion_event;
    IF p_on THEN
        CREATE TRIGGER ff_completions_wake_trg AFTER INSERT ON ff_completion_event
            FOR EACH STATEMENT EXECUTE FUNCTION ff_completions_wake_in_commit();
    END IF;
END
$$;
