-- ff-completions for Postgres, part 5: lease history and signal delivery, two more event families
-- carried by the completion reader.
--
-- They live in a table of this subsystem's own, ff_completion_family_event, not in the outbox:
-- ff_completion_event may be a host's table that this subsystem adopted, and the host's own
-- readers of it must keep seeing completions only (a `family` column there would hand them lease
-- heartbeats as completions). The reader reads both tables in the same snapshot batches, with
-- the same two probes each (one lookup per transaction the previous tick saw in progress, one
-- range read above its xmax), merged in (txid, event_id) order. A family row takes its event_id
-- from the outbox's own identity sequence, so (txid, event_id) stays unique across both tables
-- and every family shares one reader order: a position, a cursor of any family, the retention
-- boundary and CursorExpired mean what they meant. Completions keep their probes unchanged. A
-- batch with family rows adds the family table's probes; a batch without reads the outbox alone:
-- each tick records whether family rows committed since the previous one (`families`), so the
-- reader does not plan the larger query for every page of a batch of completions (planning, not
-- the probes, is what the family branches cost: measured 0.83x completions read per second
-- server-side when every page planned them).
--
-- `kind` is the event's kind within its family (acquired, renewed, expired, reclaimed, revoked;
-- satisfied, buffered, deduped). Columns are loose (nullable text) so a bad row written by hand
-- is read and skipped alone, never refused by the reader.
CREATE TABLE IF NOT EXISTS ff_completion_family_event (
    txid             xid8 NOT NULL DEFAULT pg_current_xact_id(),
    event_id         bigint NOT NULL,
    family           text NOT NULL,
    kind             text,
    execution_id     uuid,
    namespace        text,
    occurred_at_ms   bigint,
    partition_key    smallint,
    -- The lease's holder (acquired, renewed, revoked), previous owner (expired) or new owner (reclaimed).
    lease_id         text,
    worker           text,
    revoked_by       text,
    signal_id        text,
    waitpoint_id     text,
    source_identity  text,
    PRIMARY KEY (txid, event_id)
);

-- Event ids from the outbox's identity (or serial) sequence.
DO $$
DECLARE
    seq text := pg_get_serial_sequence('ff_completion_event', 'event_id');
BEGIN
    IF seq IS NULL THEN
        RAISE EXCEPTION 'ff_completion_event.event_id has no sequence: lease and signal events take their ids from it'
            USING ERRCODE = '55000';
    END IF;
    EXECUTE format('ALTER TABLE ff_completion_family_event ALTER COLUMN event_id SET DEFAULT nextval(%L::regclass)', seq);
END
$$;

-- Whether rows of either table not visible in snapshot s are visible now.
CREATE OR REPLACE FUNCTION ff_completions_committed_since(s pg_snapshot) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT (SELECT e.txid FROM ff_completion_event e WHERE e.txid >= pg_snapshot_xmax(s)
             ORDER BY e.txid, e.event_id LIMIT 1) IS NOT NULL
        OR EXISTS (SELECT 1 FROM pg_snapshot_xip(s) AS x(txid)
                    WHERE EXISTS (SELECT 1 FROM ff_completion_event e WHERE e.txid = x.txid AND e.txid <= x.txid))
        OR (SELECT f.txid FROM ff_completion_family_event f WHERE f.txid >= pg_snapshot_xmax(s)
             ORDER BY f.txid, f.event_id LIMIT 1) IS NOT NULL
        OR EXISTS (SELECT 1 FROM pg_snapshot_xip(s) AS x(txid)
                    WHERE EXISTS (SELECT 1 FROM ff_completion_family_event f WHERE f.txid = x.txid))
$$;

-- Whether the family table has rows visible in s2 and not in s1 (s1 NULL: any visible in s2):
-- the outbox's two probes, on the family table.
CREATE OR REPLACE FUNCTION ff_completions_families_between(s1 pg_snapshot, s2 pg_snapshot) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM ff_completion_family_event f
                    WHERE f.txid >= coalesce(pg_snapshot_xmax(s1), '0'::xid8) AND f.txid < pg_snapshot_xmax(s2)
                      AND pg_visible_in_snapshot(f.txid, s2))
        OR EXISTS (SELECT 1 FROM pg_snapshot_xip(s1) AS x(txid)
                    WHERE EXISTS (SELECT 1 FROM ff_completion_family_event f
                                   WHERE f.txid = x.txid AND pg_visible_in_snapshot(f.txid, s2)))
$$;

-- Whether batch tick_id has family rows: NULL (ticks from before this part) means maybe.
ALTER TABLE ff_completion_tick ADD COLUMN IF NOT EXISTS families boolean;

-- As in part 3, recording whether family rows committed since the previous tick. The snapshot is
-- taken first and the probe runs in a later statement, which sees every row the snapshot does.
CREATE OR REPLACE FUNCTION ff_completions_tick() RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    last_id bigint;
    last_snapshot pg_snapshot;
    s pg_snapshot;
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
    s := pg_current_snapshot();
    INSERT INTO ff_completion_tick (snapshot, created_at_ms, families)
    VALUES (s, ff_completions_now_ms(), last_snapshot IS NULL OR ff_completions_families_between(last_snapshot, s))
    RETURNING tick_id INTO last_id;
    RETURN last_id;
END
$$;

-- The reader's row shape gains the family (NULL: a completion) and the family's fields as one
-- JSON array [lease_id, worker, revoked_by, signal_id, waitpoint_id, source_identity] (NULL for
-- a completion): a completion row costs two more NULL columns.
DROP FUNCTION IF EXISTS ff_completions_read(bigint, bigint, bigint, integer);
DROP FUNCTION IF EXISTS ff_completions_batch_rows(bigint, pg_snapshot, pg_snapshot, bigint, bigint, integer);
DROP FUNCTION IF EXISTS ff_completions_outbox_rows(bigint, pg_snapshot, pg_snapshot, bigint, bigint, integer);

-- As in part 4, with the family table's two probes beside the outbox's.
CREATE FUNCTION ff_completions_batch_rows(
    p_major bigint, s1 pg_snapshot, s2 pg_snapshot, p_txid bigint, p_event_id bigint, p_limit integer)
RETURNS TABLE (o_kind integer, o_major bigint, o_txid bigint, o_event_id bigint, o_execution_id text,
               o_flow_id text, o_outcome text, o_namespace text, o_instance_tag text, o_tags text,
               o_occurred_at_ms bigint, o_partition_key integer, o_family text, o_fields text)
LANGUAGE sql STABLE AS $$
    SELECT 0, p_major, coalesce(e.txid::text::int8, 0), e.event_id, e.execution_id::text, e.flow_id::text,
           e.outcome, e.namespace, e.instance_tag, e.tags::text, e.occurred_at_ms, e.partition_key::int4,
           e.family, e.fields
      FROM ((SELECT e.txid, e.event_id, e.execution_id, e.flow_id, e.outcome, e.namespace, e.instance_tag, e.tags,
                    e.occurred_at_ms, e.partition_key, NULL::text AS family, NULL::text AS fields
               FROM ff_completion_event e
              WHERE s1 IS NULL AND p_txid = 0 AND e.txid IS NULL AND e.event_id > p_event_id
              ORDER BY e.txid, e.event_id LIMIT p_limit)
            UNION ALL
            (SELECT hit.* FROM pg_snapshot_xip(s1) AS x(txid)
              CROSS JOIN LATERAL (SELECT e.txid, e.event_id, e.execution_id, e.flow_id, e.outcome, e.namespace,
                                         e.instance_tag, e.tags, e.occurred_at_ms, e.partition_key,
                                         NULL::text, NULL::text
                                    FROM ff_completion_event e
                                   WHERE e.txid = x.txid
                                     AND (e.txid, e.event_id) > (x.txid, CASE WHEN x.txid = p_txid::text::xid8
                                                                              THEN p_event_id ELSE -1 END)
                                     AND pg_visible_in_snapshot(e.txid, s2)
                                   ORDER BY e.txid, e.event_id LIMIT p_limit) hit
              WHERE s1 IS NOT NULL AND x.txid >= p_txid::text::xid8
              ORDER BY hit.txid, hit.event_id LIMIT p_limit)
            UNION ALL
            (SELECT hit.* FROM pg_snapshot_xip(s1) AS x(txid)
              CROSS JOIN LATERAL (SELECT f.txid, f.event_id, f.execution_id, NULL::uuid, f.kind, f.namespace,
                                         NULL::text, NULL::jsonb, f.occurred_at_ms, f.partition_key,
                                         f.family,
                                         json_build_array(f.lease_id, f.worker, f.revoked_by, f.signal_id,
                                                          f.waitpoint_id, f.source_identity)::text
                                    FROM ff_completion_family_event f
                                   WHERE f.txid = x.txid
                                     AND (f.txid, f.event_id) > (x.txid, CASE WHEN x.txid = p_txid::text::xid8
                                                                              THEN p_event_id ELSE -1 END)
                                     AND pg_visible_in_snapshot(f.txid, s2)
                                   ORDER BY f.txid, f.event_id LIMIT p_limit) hit
              WHERE s1 IS NOT NULL AND x.txid >= p_txid::text::xid8
              ORDER BY hit.txid, hit.event_id LIMIT p_limit)
            UNION ALL
            (SELECT e.txid, e.event_id, e.execution_id, e.flow_id, e.outcome, e.namespace, e.instance_tag, e.tags,
                    e.occurred_at_ms, e.partition_key, NULL::text, NULL::text
               FROM ff_completion_event e
              WHERE (e.txid, e.event_id) > (greatest(p_txid::text::xid8, pg_snapshot_xmax(s1)),
                                            CASE WHEN pg_snapshot_xmax(s1) > p_txid::text::xid8 THEN -1 ELSE p_event_id END)
                AND e.txid < pg_snapshot_xmax(s2)
                AND pg_visible_in_snapshot(e.txid, s2)
              ORDER BY e.txid, e.event_id LIMIT p_limit)
            UNION ALL
            (SELECT f.txid, f.event_id, f.execution_id, NULL::uuid, f.kind, f.namespace, NULL::text, NULL::jsonb,
                    f.occurred_at_ms, f.partition_key, f.family,
                    json_build_array(f.lease_id, f.worker, f.revoked_by, f.signal_id, f.waitpoint_id,
                                     f.source_identity)::text
               FROM ff_completion_family_event f
              WHERE (f.txid, f.event_id) > (greatest(p_txid::text::xid8, pg_snapshot_xmax(s1)),
                                            CASE WHEN pg_snapshot_xmax(s1) > p_txid::text::xid8 THEN -1 ELSE p_event_id END)
                AND f.txid < pg_snapshot_xmax(s2)
                AND pg_visible_in_snapshot(f.txid, s2)
              ORDER BY f.txid, f.event_id LIMIT p_limit)) e
     ORDER BY e.txid NULLS FIRST, e.event_id
     LIMIT p_limit
$$;

-- ff_completions_batch_rows for a batch without family rows: the outbox's probes alone (part 4's
-- query, in the new row shape).
CREATE FUNCTION ff_completions_outbox_rows(
    p_major bigint, s1 pg_snapshot, s2 pg_snapshot, p_txid bigint, p_event_id bigint, p_limit integer)
RETURNS TABLE (o_kind integer, o_major bigint, o_txid bigint, o_event_id bigint, o_execution_id text,
               o_flow_id text, o_outcome text, o_namespace text, o_instance_tag text, o_tags text,
               o_occurred_at_ms bigint, o_partition_key integer, o_family text, o_fields text)
LANGUAGE sql STABLE AS $$
    SELECT 0, p_major, coalesce(e.txid::text::int8, 0), e.event_id, e.execution_id::text, e.flow_id::text,
           e.outcome, e.namespace, e.instance_tag, e.tags::text, e.occurred_at_ms, e.partition_key::int4,
           e.family, e.fields
      FROM ((SELECT e.txid, e.event_id, e.execution_id, e.flow_id, e.outcome, e.namespace, e.instance_tag, e.tags,
                    e.occurred_at_ms, e.partition_key, NULL::text AS family, NULL::text AS fields
               FROM ff_completion_event e
              WHERE s1 IS NULL AND p_txid = 0 AND e.txid IS NULL AND e.event_id > p_event_id
              ORDER BY e.txid, e.event_id LIMIT p_limit)
            UNION ALL
            (SELECT hit.* FROM pg_snapshot_xip(s1) AS x(txid)
              CROSS JOIN LATERAL (SELECT e.txid, e.event_id, e.execution_id, e.flow_id, e.outcome, e.namespace,
                                         e.instance_tag, e.tags, e.occurred_at_ms, e.partition_key,
                                         NULL::text, NULL::text
                                    FROM ff_completion_event e
                                   WHERE e.txid = x.txid
                                     AND (e.txid, e.event_id) > (x.txid, CASE WHEN x.txid = p_txid::text::xid8
                                                                              THEN p_event_id ELSE -1 END)
                                     AND pg_visible_in_snapshot(e.txid, s2)
                                   ORDER BY e.txid, e.event_id LIMIT p_limit) hit
              WHERE s1 IS NOT NULL AND x.txid >= p_txid::text::xid8
              ORDER BY hit.txid, hit.event_id LIMIT p_limit)
            UNION ALL
            (SELECT e.txid, e.event_id, e.execution_id, e.flow_id, e.outcome, e.namespace, e.instance_tag, e.tags,
                    e.occurred_at_ms, e.partition_key, NULL::text, NULL::text
               FROM ff_completion_event e
              WHERE (e.txid, e.event_id) > (greatest(p_txid::text::xid8, pg_snapshot_xmax(s1)),
                                            CASE WHEN pg_snapshot_xmax(s1) > p_txid::text::xid8 THEN -1 ELSE p_event_id END)
                AND e.txid < pg_snapshot_xmax(s2)
                AND pg_visible_in_snapshot(e.txid, s2)
              ORDER BY e.txid, e.event_id LIMIT p_limit)) e
     ORDER BY e.txid NULLS FIRST, e.event_id
     LIMIT p_limit
$$;

-- As in part 3, with the two family columns; a batch whose tick recorded no family rows (and a
-- whole batch when the family table has no row below its snapshot's xmax) reads the outbox alone.
CREATE FUNCTION ff_completions_read(p_major bigint, p_txid bigint, p_event_id bigint, p_limit integer)
RETURNS TABLE (o_kind integer, o_major bigint, o_txid bigint, o_event_id bigint, o_execution_id text,
               o_flow_id text, o_outcome text, o_namespace text, o_instance_tag text, o_tags text,
               o_occurred_at_ms bigint, o_partition_key integer, o_family text, o_fields text)
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
    families boolean;
BEGIN
    IF k = 0 THEN
        phase := 2;
    END IF;
    LOOP
        IF phase < 2 THEN
            s2 := NULL;
            SELECT t.snapshot, t.families INTO s2, families FROM ff_completion_tick t WHERE t.tick_id = k;
            EXIT WHEN s2 IS NULL;
            s1 := NULL;
            IF phase = 0 THEN
                s1 := (SELECT t.snapshot FROM ff_completion_tick t WHERE t.tick_id < k ORDER BY t.tick_id DESC LIMIT 1);
            END IF;
            IF phase = 1 OR s1 IS NULL THEN
                families := EXISTS (SELECT 1 FROM ff_completion_family_event f WHERE f.txid < pg_snapshot_xmax(s2));
            END IF;
            IF families IS FALSE THEN
                RETURN QUERY SELECT * FROM ff_completions_outbox_rows(3 * k + phase, s1, s2, pos_t, pos_e, remaining);
            ELSE
                RETURN QUERY SELECT * FROM ff_completions_batch_rows(3 * k + phase, s1, s2, pos_t, pos_e, remaining);
            END IF;
            GET DIAGNOSTICS got = ROW_COUNT;
            remaining := remaining - got;
            EXIT WHEN remaining <= 0;
            o_kind := 2; o_major := 3 * k + 2; o_txid := 0; o_event_id := 0;
            o_execution_id := NULL; o_flow_id := NULL; o_outcome := NULL; o_namespace := NULL;
            o_instance_tag := NULL; o_tags := NULL; o_occurred_at_ms := NULL; o_partition_key := NULL;
            o_family := NULL; o_fields := NULL;
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
                            NULL::integer, NULL::text, NULL::text;
    END IF;
END
$$;

-- As in part 3, over the rows of every family: the cut is a prefix of the reader order of both
-- tables (p_keep counts the rows of every family), and both lose that prefix. The highest
-- event_id removed (for event_id-only cursors, completions only) counts completions alone.
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
    n_family bigint;
    max_event bigint;
    lo bigint;
    hi bigint;
    mid bigint;
    last_batch bigint;
BEGIN
    IF p_before_ms IS NOT NULL THEN
        SELECT a.txid, a.event_id INTO age_txid, age_event
          FROM ((SELECT e.txid, e.event_id FROM ff_completion_event e
                  WHERE e.txid < pg_snapshot_xmax(seen) AND pg_visible_in_snapshot(e.txid, seen)
                    AND e.occurred_at_ms < p_before_ms
                  ORDER BY e.txid DESC, e.event_id DESC LIMIT 1)
                UNION ALL
                (SELECT f.txid, f.event_id FROM ff_completion_family_event f
                  WHERE f.txid < pg_snapshot_xmax(seen) AND pg_visible_in_snapshot(f.txid, seen)
                    AND f.occurred_at_ms < p_before_ms
                  ORDER BY f.txid DESC, f.event_id DESC LIMIT 1)) a
         ORDER BY a.txid DESC, a.event_id DESC LIMIT 1;
    END IF;
    IF p_keep IS NOT NULL THEN
        SELECT c.txid, c.event_id INTO count_txid, count_event
          FROM ((SELECT e.txid, e.event_id FROM ff_completion_event e
                  WHERE e.txid < pg_snapshot_xmax(seen) AND pg_visible_in_snapshot(e.txid, seen)
                  ORDER BY e.txid DESC, e.event_id DESC LIMIT greatest(p_keep, 0) + 1)
                UNION ALL
                (SELECT f.txid, f.event_id FROM ff_completion_family_event f
                  WHERE f.txid < pg_snapshot_xmax(seen) AND pg_visible_in_snapshot(f.txid, seen)
                  ORDER BY f.txid DESC, f.event_id DESC LIMIT greatest(p_keep, 0) + 1)) c
         ORDER BY c.txid DESC, c.event_id DESC OFFSET greatest(p_keep, 0) LIMIT 1;
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
                                                     AND pg_visible_in_snapshot(e.txid, seen))
                                       OR EXISTS (SELECT 1 FROM ff_completion_family_event f
                                                   WHERE f.txid = x.txid
                                                     AND (f.txid, f.event_id) <= (cut_txid, cut_event)
                                                     AND pg_visible_in_snapshot(f.txid, seen)))
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
    WITH removed AS (
        DELETE FROM ff_completion_family_event f
         WHERE (f.txid, f.event_id) <= (cut_txid, cut_event) AND pg_visible_in_snapshot(f.txid, seen)
        RETURNING 1
    )
    SELECT count(*) INTO n_family FROM removed;
    INSERT INTO ff_completion_retention AS r (trimmed_txid, trimmed_event_id, trimmed_max_event_id, trimmed_batch)
    VALUES (cut_txid, cut_event, coalesce(max_event, 0), last_batch)
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
    RETURN n + n_family;
END
$$;

-- The opt-in in-commit trigger wakes on family rows too.
CREATE OR REPLACE FUNCTION ff_completions_set_commit_trigger(p_on boolean) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    DROP TRIGGER IF EXISTS ff_completions_wake_trg ON ff_completion_event;
    DROP TRIGGER IF EXISTS ff_completions_wake_trg ON ff_completion_family_event;
    IF p_on THEN
        CREATE TRIGGER ff_completions_wake_trg AFTER INSERT ON ff_completion_event
            FOR EACH STATEMENT EXECUTE FUNCTION ff_completions_wake_in_commit();
        CREATE TRIGGER ff_completions_wake_trg AFTER INSERT ON ff_completion_family_event
            FOR EACH STATEMENT EXECUTE FUNCTION ff_completions_wake_in_commit();
    END IF;
END
$$;
