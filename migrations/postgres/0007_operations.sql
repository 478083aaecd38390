-- ff-completions for Postgres, part 7: a reader that survives real operations.
--
-- 1. Transactions, not rows, are what the reader looks for. A statement trigger on the outbox
--    (and on ff_completion_family_event) records each producing transaction once in
--    ff_completion_txn, in the producer's own transaction: invisible until it commits, gone if
--    it aborts. Every probe of the reader ("anything committed since the newest tick?", "which
--    transactions make batch k?") runs on that small unpartitioned table; the outbox is read
--    only for transactions known to have committed rows, by (txid, event_id), and on an outbox
--    partitioned on partition_key only in the partitions the transaction wrote. An idle check,
--    or a transaction still in progress, never costs a probe per partition, and no probe walks
--    the rows of a transaction that is still open.
-- 2. Ticks are durable whatever the server's synchronous_commit: a tick commits synchronously,
--    and its WAL flush also makes durable every transaction its snapshot sees. Each tick has a
--    random fingerprint and the system identifier of the cluster that recorded it; a cursor
--    names its tick's fingerprint, so a cursor from a lost or another lineage (a crash with
--    lost ticks, a restored backup, a lossy failover, a dump restored elsewhere) is refused by
--    name, never read against the wrong snapshot. Ticks recorded by another cluster (a dump,
--    a logical copy) are retired at once: the outbox rows they saw become history read first
--    in event_id order, and the new cluster's ticks start a new lineage.
-- 3. Retention cuts whole batches, in reader order, by the age of their tick or by the count
--    of rows in the newest batches, records the cut first, then deletes in small transactions
--    without the tick lock. A host's own DELETE or TRUNCATE on the outbox moves the cut too:
--    a reader that would miss a deleted row expires, never skips it.
--
-- Positions stay (major, txid, event_id): major 3k is batch k, 3k+1 batch k read whole, 3k+2
-- the end of batch k; txid 0 is before every row of the batch; rows from before the outbox was
-- adopted or before the current lineage come first, with txid 1, in event_id order.

-- Transactions that wrote completions or family events: one row each.
CREATE TABLE IF NOT EXISTS ff_completion_txn (
    txid        xid8 PRIMARY KEY,
    -- Whether it wrote outbox rows, and in which values of partition_key (NULL: any; kept only
    -- for an outbox partitioned on partition_key, where it prunes the reads).
    outbox      boolean NOT NULL DEFAULT false,
    partitions  smallint[],
    -- Whether it wrote rows of ff_completion_family_event.
    families    boolean NOT NULL DEFAULT false
);

-- Deletions of outbox rows that no tick had seen yet, by the deleting transaction: the first
-- tick that sees all of txids moves the retention cut past their batch.
CREATE TABLE IF NOT EXISTS ff_completion_pending_cut (
    deleter     xid8 PRIMARY KEY DEFAULT pg_current_xact_id(),
    txids       xid8[] NOT NULL
);

-- Lineages of the tick history: the first, and one more each time ticks of another cluster
-- were found (a restored dump, a logical copy). Ticks from first_tick on belong to it.
CREATE TABLE IF NOT EXISTS ff_completion_lineage (
    lineage_id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    system_identifier  bigint NOT NULL,
    first_tick         bigint NOT NULL,
    started_at_ms      bigint NOT NULL,
    cause              text NOT NULL
);

-- The producer's W3C trace context, when it records one (NULL otherwise, as in every row from
-- before): the readers return it last in each row shape (o_traceparent). No default, so adding
-- it to an adopted outbox is a catalogue change only, never a rewrite.
ALTER TABLE ff_completion_event ADD COLUMN IF NOT EXISTS traceparent text;
ALTER TABLE ff_completion_family_event ADD COLUMN IF NOT EXISTS traceparent text;

-- A random 64-bit value.
CREATE OR REPLACE FUNCTION ff_completions_random_id() RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    SELECT ('x' || substr(replace(gen_random_uuid()::text, '-', ''), 1, 16))::bit(64)::bigint
$$;

-- The cluster's system identifier (pg_control), read once per session.
CREATE OR REPLACE FUNCTION ff_completions_system_identifier() RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    known text := current_setting('ff_completions.system_identifier', true);
    id bigint;
BEGIN
    IF known IS NOT NULL AND known <> '' THEN
        RETURN known::bigint;
    END IF;
    id := (SELECT c.system_identifier FROM pg_control_system() c);
    PERFORM set_config('ff_completions.system_identifier', id::text, false);
    RETURN id;
END
$$;

-- Whether the outbox is partitioned on partition_key alone (reads are then pruned).
-- (The functions on the reader's path are PL/pgSQL, whose plans a session keeps: an SQL
-- function called from PL/pgSQL is planned again at every call.)
CREATE OR REPLACE FUNCTION ff_completions_outbox_partitioned() RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN EXISTS (SELECT 1 FROM pg_partitioned_table p
                     JOIN pg_attribute a ON a.attrelid = p.partrelid AND a.attnum = p.partattrs[0]
                    WHERE p.partrelid = 'ff_completion_event'::regclass AND p.partnatts = 1
                      AND a.attname = 'partition_key');
END
$$;

ALTER TABLE ff_completion_tick ADD COLUMN IF NOT EXISTS fingerprint bigint;
ALTER TABLE ff_completion_tick ADD COLUMN IF NOT EXISTS system_identifier bigint;
-- Rows in the tick's batch, counted lazily by count retention (NULL: not counted yet).
ALTER TABLE ff_completion_tick ADD COLUMN IF NOT EXISTS row_count bigint;
UPDATE ff_completion_tick SET fingerprint = ff_completions_random_id() WHERE fingerprint IS NULL;
UPDATE ff_completion_tick SET system_identifier = ff_completions_system_identifier() WHERE system_identifier IS NULL;
ALTER TABLE ff_completion_tick ALTER COLUMN fingerprint SET DEFAULT ff_completions_random_id();
ALTER TABLE ff_completion_tick ALTER COLUMN fingerprint SET NOT NULL;
ALTER TABLE ff_completion_tick ALTER COLUMN system_identifier SET DEFAULT ff_completions_system_identifier();
ALTER TABLE ff_completion_tick ALTER COLUMN system_identifier SET NOT NULL;

INSERT INTO ff_completion_lineage (system_identifier, first_tick, started_at_ms, cause)
SELECT ff_completions_system_identifier(), coalesce((SELECT min(t.tick_id) FROM ff_completion_tick t), 1),
       ff_completions_now_ms(), 'installed'
 WHERE NOT EXISTS (SELECT 1 FROM ff_completion_lineage);

-- The retention cut in reader order: positions below (cut_major, cut_txid, cut_event_id) may
-- have lost rows. trimmed_txid/trimmed_event_id (the highest (txid, event_id) removed) and
-- trimmed_max_event_id (the highest event_id removed) serve the cursors of earlier forms.
ALTER TABLE ff_completion_retention ADD COLUMN IF NOT EXISTS cut_major bigint;
ALTER TABLE ff_completion_retention ADD COLUMN IF NOT EXISTS cut_txid bigint;
ALTER TABLE ff_completion_retention ADD COLUMN IF NOT EXISTS cut_event_id bigint;
ALTER TABLE ff_completion_retention ADD COLUMN IF NOT EXISTS cut_key integer;

UPDATE ff_completion_retention
   SET cut_major = trimmed_batch, cut_txid = trimmed_txid::text::int8, cut_event_id = trimmed_event_id, cut_key = 32768
 WHERE cut_major IS NULL AND trimmed_batch IS NOT NULL;

-- Moves the cut up to (p_major, p_txid, p_event_id, p_key) (NULL: unchanged), and the marks of what was
-- removed up to the highest (txid, event_id) (txid 1: history from before adoption) and event_id
-- removed (NULL: unchanged). Never down. The marks expire a batch read whole (how cursors of the
-- earlier forms resume) below them, and those earlier forms.
DROP FUNCTION IF EXISTS ff_completions_raise_cut(bigint, bigint, bigint, xid8, bigint, bigint);
CREATE OR REPLACE FUNCTION ff_completions_raise_cut(
    p_major bigint, p_txid bigint, p_event_id bigint, p_key integer, p_removed_txid xid8, p_removed_event_id bigint,
    p_removed_max_event_id bigint) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    r ff_completion_retention;
BEGIN
    INSERT INTO ff_completion_retention (trimmed_txid, trimmed_event_id, trimmed_max_event_id)
    VALUES ('0'::xid8, 0, 0) ON CONFLICT (id) DO NOTHING;
    SELECT * INTO r FROM ff_completion_retention FOR UPDATE;
    IF p_major IS NOT NULL
       AND (r.cut_major IS NULL
            OR (p_major, p_txid, p_event_id, p_key) > (r.cut_major, r.cut_txid, r.cut_event_id, r.cut_key)) THEN
        r.cut_major := p_major;
        r.cut_txid := p_txid;
        r.cut_event_id := p_event_id;
        r.cut_key := p_key;
    END IF;
    IF p_removed_txid IS NOT NULL AND (p_removed_txid, p_removed_event_id) > (r.trimmed_txid, r.trimmed_event_id) THEN
        r.trimmed_txid := p_removed_txid;
        r.trimmed_event_id := p_removed_event_id;
    END IF;
    -- NULL means trimmed before this was recorded: unknown, and stays so.
    IF p_removed_max_event_id IS NOT NULL AND r.trimmed_max_event_id IS NOT NULL THEN
        r.trimmed_max_event_id := greatest(r.trimmed_max_event_id, p_removed_max_event_id);
    END IF;
    UPDATE ff_completion_retention SET cut_major = r.cut_major, cut_txid = r.cut_txid, cut_event_id = r.cut_event_id,
           cut_key = r.cut_key,
           trimmed_txid = r.trimmed_txid, trimmed_event_id = r.trimmed_event_id,
           trimmed_max_event_id = r.trimmed_max_event_id;
END
$$;

-- Records the inserting transaction of an outbox statement. A transaction-local setting
-- remembers what is recorded, so a transaction of many statements writes its row once (and
-- once more per partition it adds), never a new version per statement.
CREATE OR REPLACE FUNCTION ff_completions_capture_outbox() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    me xid8 := pg_current_xact_id();
    recorded text := current_setting('ff_completions.captured_outbox', true);
    keys smallint[];
    state text;
BEGIN
    IF (SELECT c.relkind FROM pg_class c WHERE c.oid = TG_RELID) = 'p' THEN
        SELECT CASE WHEN bool_or(n.partition_key IS NULL) THEN NULL
                    ELSE array_agg(DISTINCT n.partition_key ORDER BY n.partition_key) END
          INTO keys FROM ff_captured n;
    END IF;
    state := me::text || ':' || coalesce(keys::text, '*');
    IF recorded = state OR recorded = me::text || ':*' THEN
        RETURN NULL;
    END IF;
    IF keys IS NOT NULL AND recorded LIKE me::text || ':{%' THEN
        IF substr(recorded, length(me::text) + 2)::smallint[] @> keys THEN
            RETURN NULL;
        END IF;
    END IF;
    INSERT INTO ff_completion_txn AS t (txid, outbox, partitions) VALUES (me, true, keys)
    ON CONFLICT (txid) DO UPDATE SET
        outbox = true,
        partitions = CASE WHEN NOT t.outbox THEN EXCLUDED.partitions
                          WHEN t.partitions IS NULL OR EXCLUDED.partitions IS NULL THEN NULL
                          ELSE ARRAY(SELECT DISTINCT k FROM unnest(t.partitions || EXCLUDED.partitions) k ORDER BY k)
                     END
    RETURNING me::text || ':' || coalesce(t.partitions::text, '*') INTO state;
    PERFORM set_config('ff_completions.captured_outbox', state, true);
    RETURN NULL;
END
$$;

-- Records the inserting transaction of a family-event statement.
CREATE OR REPLACE FUNCTION ff_completions_capture_families() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    me xid8 := pg_current_xact_id();
BEGIN
    IF current_setting('ff_completions.captured_families', true) = me::text THEN
        RETURN NULL;
    END IF;
    INSERT INTO ff_completion_txn AS t (txid, families) VALUES (me, true)
    ON CONFLICT (txid) DO UPDATE SET families = true;
    PERFORM set_config('ff_completions.captured_families', me::text, true);
    RETURN NULL;
END
$$;

-- The first tick whose snapshot sees every transaction of xs (NULL: none does yet).
-- Visibility only grows from tick to tick, so this is a binary search.
CREATE OR REPLACE FUNCTION ff_completions_first_tick_seeing(xs xid8[]) RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    lo bigint := (SELECT min(t.tick_id) FROM ff_completion_tick t);
    hi bigint := (SELECT max(t.tick_id) FROM ff_completion_tick t);
    mid bigint;
    top xid8 := (SELECT max(x) FROM unnest(xs) x);
BEGIN
    IF hi IS NULL OR top IS NULL THEN
        RETURN lo;
    END IF;
    IF NOT (SELECT top < pg_snapshot_xmax(t.snapshot)
                   AND NOT EXISTS (SELECT 1 FROM pg_snapshot_xip(t.snapshot) i(x) WHERE i.x = ANY(xs))
              FROM ff_completion_tick t WHERE t.tick_id = hi) THEN
        RETURN NULL;
    END IF;
    WHILE lo < hi LOOP
        mid := (SELECT min(t.tick_id) FROM ff_completion_tick t WHERE t.tick_id >= lo + (hi - lo) / 2);
        IF mid >= hi THEN
            mid := lo;
        END IF;
        IF (SELECT top < pg_snapshot_xmax(t.snapshot)
                   AND NOT EXISTS (SELECT 1 FROM pg_snapshot_xip(t.snapshot) i(x) WHERE i.x = ANY(xs))
              FROM ff_completion_tick t WHERE t.tick_id = mid) THEN
            hi := mid;
        ELSE
            lo := (SELECT min(t.tick_id) FROM ff_completion_tick t WHERE t.tick_id > mid);
        END IF;
    END LOOP;
    RETURN hi;
END
$$;

-- A host's DELETE on the outbox (or the family table): a reader that would read a deleted row's
-- batch after this commits must expire. Rows of transactions the newest tick already sees move
-- the cut past the first tick that sees them all, now; rows of transactions no tick sees yet
-- are left for the first tick that sees them (ff_completion_pending_cut). Retention's own
-- deletes set ff_completions.trimming and are not counted here.
CREATE OR REPLACE FUNCTION ff_completions_note_delete() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    me xid8 := pg_current_xact_id();
    newest bigint := (SELECT max(t.tick_id) FROM ff_completion_tick t);
    newest_snapshot pg_snapshot := (SELECT t.snapshot FROM ff_completion_tick t WHERE t.tick_id = newest);
    before pg_snapshot;
    seen xid8[];
    unseen xid8[];
    top_pre bigint;
    top record;
    top_event_id bigint;
    k bigint;
BEGIN
    IF current_setting('ff_completions.trimming', true) = 'on' THEN
        RETURN NULL;
    END IF;
    SELECT array_agg(DISTINCT r.txid) FILTER (WHERE r.txid > '2'::xid8 AND r.txid <> me
                                                  AND pg_visible_in_snapshot(r.txid, newest_snapshot)),
           array_agg(DISTINCT r.txid) FILTER (WHERE r.txid > '2'::xid8 AND r.txid <> me
                                                  AND (newest_snapshot IS NULL
                                                       OR NOT pg_visible_in_snapshot(r.txid, newest_snapshot))),
           max(r.event_id) FILTER (WHERE r.txid IS NULL OR r.txid <= '2'::xid8),
           max(r.event_id) FILTER (WHERE r.txid IS DISTINCT FROM me)
      INTO seen, unseen, top_pre, top_event_id
      FROM ff_removed r;
    IF seen IS NOT NULL THEN
        -- The newest deleted row in reader order: in the first tick that sees them all, the
        -- rows of transactions the tick before it did not see.
        k := ff_completions_first_tick_seeing(seen);
        before := (SELECT t.snapshot FROM ff_completion_tick t WHERE t.tick_id < k ORDER BY t.tick_id DESC LIMIT 1);
        SELECT r.txid, r.event_id, coalesce(r.partition_key::int4, -32769) AS key INTO top FROM ff_removed r
         WHERE r.txid = ANY (seen) AND (before IS NULL OR NOT pg_visible_in_snapshot(r.txid, before))
         ORDER BY r.txid DESC, r.event_id DESC, 3 DESC LIMIT 1;
        PERFORM ff_completions_raise_cut(3 * k, top.txid::text::int8, top.event_id, top.key, NULL, NULL, NULL);
    END IF;
    IF top_pre IS NOT NULL AND newest IS NOT NULL THEN
        -- History from before adoption is read first, with the oldest tick's batch.
        PERFORM ff_completions_raise_cut(3 * (SELECT min(t.tick_id) FROM ff_completion_tick t), 1, top_pre, 32768,
                                         '1'::xid8, top_pre, NULL);
    END IF;
    IF unseen IS NOT NULL THEN
        INSERT INTO ff_completion_pending_cut AS p (txids) VALUES (unseen)
        ON CONFLICT (deleter) DO UPDATE SET txids = p.txids || EXCLUDED.txids;
    END IF;
    IF top_event_id IS NOT NULL THEN
        SELECT r.txid, r.event_id INTO top FROM ff_removed r
         WHERE r.txid > '2'::xid8 AND r.txid <> me ORDER BY r.txid DESC, r.event_id DESC LIMIT 1;
        PERFORM ff_completions_raise_cut(NULL, NULL, NULL, NULL, coalesce(top.txid, '0'::xid8),
                                         coalesce(top.event_id, 0), top_event_id);
    END IF;
    RETURN NULL;
END
$$;

-- A host's TRUNCATE: every row is gone, so every reader that has not read all of them expires.
CREATE OR REPLACE FUNCTION ff_completions_note_truncate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    newest bigint := (SELECT max(t.tick_id) FROM ff_completion_tick t);
    newest_snapshot pg_snapshot := (SELECT t.snapshot FROM ff_completion_tick t WHERE t.tick_id = newest);
    unseen xid8[];
BEGIN
    IF current_setting('ff_completions.trimming', true) = 'on' THEN
        RETURN NULL;
    END IF;
    IF newest IS NOT NULL THEN
        PERFORM ff_completions_raise_cut(3 * newest + 2, 0, 0, -32769, NULL, NULL, NULL);
        unseen := ARRAY(SELECT t.txid FROM ff_completion_txn t
                         WHERE t.txid >= pg_snapshot_xmin(newest_snapshot)
                           AND NOT pg_visible_in_snapshot(t.txid, newest_snapshot)
                           AND t.txid <> pg_current_xact_id());
        IF cardinality(unseen) > 0 THEN
            INSERT INTO ff_completion_pending_cut AS p (txids) VALUES (unseen)
            ON CONFLICT (deleter) DO UPDATE SET txids = p.txids || EXCLUDED.txids;
        END IF;
    END IF;
    PERFORM ff_completions_raise_cut(NULL, NULL, NULL, NULL, '9223372036854775807'::xid8, 9223372036854775807,
                                     9223372036854775807);
    RETURN NULL;
END
$$;

-- The trigger functions run as the subsystem's owner (SECURITY DEFINER, with the search path of
-- the install): a host's producer role needs its privileges on the outbox only, none on the
-- subsystem's tables.
-- The triggers, installed while holding the outbox's SHARE ROW EXCLUSIVE lock: producers still
-- in progress are waited for, later ones are recorded, and every transaction already committed
-- is recorded below. ENABLE ALWAYS: they fire for logical replication's apply workers too.
DROP TRIGGER IF EXISTS ff_completions_capture ON ff_completion_event;
CREATE TRIGGER ff_completions_capture AFTER INSERT ON ff_completion_event
    REFERENCING NEW TABLE AS ff_captured FOR EACH STATEMENT EXECUTE FUNCTION ff_completions_capture_outbox();
ALTER TABLE ff_completion_event ENABLE ALWAYS TRIGGER ff_completions_capture;
DROP TRIGGER IF EXISTS ff_completions_note_delete ON ff_completion_event;
CREATE TRIGGER ff_completions_note_delete AFTER DELETE ON ff_completion_event
    REFERENCING OLD TABLE AS ff_removed FOR EACH STATEMENT EXECUTE FUNCTION ff_completions_note_delete();
ALTER TABLE ff_completion_event ENABLE ALWAYS TRIGGER ff_completions_note_delete;
DROP TRIGGER IF EXISTS ff_completions_note_truncate ON ff_completion_event;
CREATE TRIGGER ff_completions_note_truncate BEFORE TRUNCATE ON ff_completion_event
    FOR EACH STATEMENT EXECUTE FUNCTION ff_completions_note_truncate();
ALTER TABLE ff_completion_event ENABLE ALWAYS TRIGGER ff_completions_note_truncate;

DROP TRIGGER IF EXISTS ff_completions_capture ON ff_completion_family_event;
CREATE TRIGGER ff_completions_capture AFTER INSERT ON ff_completion_family_event
    FOR EACH STATEMENT EXECUTE FUNCTION ff_completions_capture_families();
ALTER TABLE ff_completion_family_event ENABLE ALWAYS TRIGGER ff_completions_capture;
DROP TRIGGER IF EXISTS ff_completions_note_delete ON ff_completion_family_event;
CREATE TRIGGER ff_completions_note_delete AFTER DELETE ON ff_completion_family_event
    REFERENCING OLD TABLE AS ff_removed FOR EACH STATEMENT EXECUTE FUNCTION ff_completions_note_delete();
ALTER TABLE ff_completion_family_event ENABLE ALWAYS TRIGGER ff_completions_note_delete;

INSERT INTO ff_completion_txn (txid, outbox, partitions)
SELECT e.txid, true,
       CASE WHEN ff_completions_outbox_partitioned() AND NOT bool_or(e.partition_key IS NULL)
            THEN array_agg(DISTINCT e.partition_key ORDER BY e.partition_key) END
  FROM ff_completion_event e WHERE e.txid > '2'::xid8 GROUP BY e.txid
ON CONFLICT (txid) DO NOTHING;
INSERT INTO ff_completion_txn (txid, families)
SELECT DISTINCT f.txid, true FROM ff_completion_family_event f WHERE f.txid > '2'::xid8
ON CONFLICT (txid) DO UPDATE SET families = true;

-- Whether a transaction recorded in ff_completion_txn committed since snapshot s. Two probes of
-- that table: a range from s's xmax (rows of transactions still open are invisible, one entry
-- each), and a lookup per transaction s saw in progress that has finished since.
CREATE OR REPLACE FUNCTION ff_completions_committed_since(s pg_snapshot) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    -- An ordered probe, which only the index serves (a cached plan of a bare EXISTS, estimating
    -- a third of the table above any bound, may walk the whole table for none).
    RETURN (SELECT t.txid FROM ff_completion_txn t WHERE t.txid >= pg_snapshot_xmax(s) ORDER BY t.txid LIMIT 1)
               IS NOT NULL
        OR EXISTS (SELECT 1 FROM pg_snapshot_xip(s) AS x(txid)
                    CROSS JOIN LATERAL (SELECT 1 FROM ff_completion_txn t WHERE t.txid = x.txid LIMIT 1) t
                    WHERE pg_visible_in_snapshot(x.txid, pg_current_snapshot()));
END
$$;

-- Retires the ticks of another cluster (a restored dump, a logical copy): their snapshots name
-- another cluster's transactions. Rows they saw become history read first in event_id order
-- (txid 2, as rows from before adoption are NULL), their transactions are forgotten, and a new
-- lineage starts at the next tick. Cursors of the old lineage then find no tick and are refused.
-- Runs under the tick lock.
CREATE OR REPLACE FUNCTION ff_completions_retire_foreign_ticks(p_cause text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    next_tick bigint := coalesce((SELECT max(t.tick_id) FROM ff_completion_tick t), 0) + 1;
BEGIN
    PERFORM set_config('ff_completions.trimming', 'on', true);
    UPDATE ff_completion_event SET txid = '2'::xid8 WHERE txid > '2'::xid8;
    UPDATE ff_completion_family_event SET txid = '2'::xid8 WHERE txid > '2'::xid8;
    DELETE FROM ff_completion_txn;
    DELETE FROM ff_completion_pending_cut;
    DELETE FROM ff_completion_tick;
    INSERT INTO ff_completion_lineage (system_identifier, first_tick, started_at_ms, cause)
    VALUES (ff_completions_system_identifier(), next_tick, ff_completions_now_ms(), p_cause);
    -- History before the new lineage is read whole with its first batch; nothing below it is.
    UPDATE ff_completion_retention SET cut_major = 3 * next_tick + 1, cut_txid = 0, cut_event_id = 0, cut_key = -32769;
    PERFORM set_config('ff_completions.trimming', 'off', true);
END
$$;

-- Why the newest tick cannot be trusted on this cluster, or NULL when it can.
CREATE OR REPLACE FUNCTION ff_completions_foreign_ticks() RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    t ff_completion_tick;
    here bigint := ff_completions_system_identifier();
BEGIN
    SELECT * INTO t FROM ff_completion_tick ORDER BY tick_id DESC LIMIT 1;
    IF t.system_identifier <> here THEN
        RETURN format('ticks were recorded by database system %s, this is %s (a restored dump or a logical copy)',
                      t.system_identifier, here);
    ELSIF pg_snapshot_xmax(t.snapshot) > pg_snapshot_xmax(pg_current_snapshot()) THEN
        RETURN format('the newest tick names transaction %s, beyond this cluster''s next (%s)',
                      pg_snapshot_xmax(t.snapshot), pg_snapshot_xmax(pg_current_snapshot()));
    END IF;
    RETURN NULL;
END
$$;

-- The newest tick, after recording a new one when a transaction committed since it (or when
-- there is none yet). Ticks are taken one at a time under a transaction-scoped advisory lock,
-- each in a statement that starts after its predecessor committed, so every tick's snapshot
-- contains its predecessor's. A new tick commits synchronously. Deletions waiting for a tick
-- (ff_completion_pending_cut) move the retention cut once a tick sees what they deleted.
CREATE OR REPLACE FUNCTION ff_completions_tick() RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    newest ff_completion_tick;
    foreign_cause text;
    pending_any boolean;
    s pg_snapshot;
    pending record;
    k bigint;
    tick bigint;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'ff_completions_tick needs READ COMMITTED, not %', current_setting('transaction_isolation')
            USING ERRCODE = '25000';
    END IF;
    SELECT * INTO newest FROM ff_completion_tick t ORDER BY t.tick_id DESC LIMIT 1;
    IF newest.tick_id IS NOT NULL AND (newest.system_identifier <> ff_completions_system_identifier()
                                       OR pg_snapshot_xmax(newest.snapshot) > pg_snapshot_xmax(pg_current_snapshot())) THEN
        foreign_cause := ff_completions_foreign_ticks();
    END IF;
    pending_any := EXISTS (SELECT 1 FROM ff_completion_pending_cut);
    IF foreign_cause IS NULL AND newest.tick_id IS NOT NULL AND NOT pending_any
       AND NOT ff_completions_committed_since(newest.snapshot) THEN
        -- Nothing new: the time to check the outbox still records what is written to it.
        PERFORM ff_completions_verify();
        RETURN newest.tick_id;
    END IF;
    -- An advisory lock, not a table lock: a table lock would queue behind autovacuum of the tick
    -- table (which Postgres cancels only after deadlock_timeout, a second of stalled reads).
    PERFORM pg_advisory_xact_lock(hashtext('ff_completion_tick'), 0);
    -- Read again now the lock is held: a deletion that committed while this tick waited for it
    -- (of rows no tick saw yet) must be resolved by this tick, before any reader reads its batch.
    pending_any := EXISTS (SELECT 1 FROM ff_completion_pending_cut);
    IF foreign_cause IS NOT NULL THEN
        -- Another reader may have retired them while this one waited for the lock.
        foreign_cause := ff_completions_foreign_ticks();
        IF foreign_cause IS NOT NULL THEN
            RAISE WARNING 'ff-completions: retiring foreign ticks: %', foreign_cause;
            PERFORM ff_completions_retire_foreign_ticks(foreign_cause);
        END IF;
    END IF;
    SELECT * INTO newest FROM ff_completion_tick t ORDER BY t.tick_id DESC LIMIT 1;
    IF newest.tick_id IS NOT NULL AND NOT ff_completions_committed_since(newest.snapshot)
       AND NOT (pending_any AND EXISTS (SELECT 1 FROM ff_completion_pending_cut p
                                         WHERE pg_visible_in_snapshot(p.deleter, pg_current_snapshot()))) THEN
        RETURN newest.tick_id;
    END IF;
    IF current_setting('synchronous_commit') IN ('off', 'local') THEN
        PERFORM set_config('synchronous_commit', 'on', true);
    END IF;
    s := pg_current_snapshot();
    INSERT INTO ff_completion_tick (snapshot, created_at_ms) VALUES (s, ff_completions_now_ms())
    RETURNING tick_id INTO tick;
    IF pending_any THEN
        FOR pending IN SELECT p.deleter, p.txids FROM ff_completion_pending_cut p
                        WHERE pg_visible_in_snapshot(p.deleter, s) LOOP
            k := ff_completions_first_tick_seeing(pending.txids);
            IF k IS NOT NULL THEN
                -- Past every row of the newest such transaction in reader order (which of its rows
                -- went is not known any more).
                PERFORM ff_completions_raise_cut(
                    3 * k,
                    (SELECT max(x)::text::int8 FROM unnest(pending.txids) x
                      WHERE NOT pg_visible_in_snapshot(x, (SELECT t.snapshot FROM ff_completion_tick t
                                                            WHERE t.tick_id < k ORDER BY t.tick_id DESC LIMIT 1))
                         OR k = (SELECT min(t.tick_id) FROM ff_completion_tick t)),
                    9223372036854775807, 32768, NULL, NULL, NULL);
                DELETE FROM ff_completion_pending_cut p WHERE p.deleter = pending.deleter;
            END IF;
        END LOOP;
    END IF;
    RETURN tick;
END
$$;

-- The newest tick (recording one as ff_completions_tick does) and its fingerprint.
CREATE OR REPLACE FUNCTION ff_completions_head(OUT o_tick bigint, OUT o_fingerprint bigint)
LANGUAGE plpgsql AS $$
BEGIN
    o_tick := ff_completions_tick();
    o_fingerprint := (SELECT t.fingerprint FROM ff_completion_tick t WHERE t.tick_id = o_tick);
END
$$;

-- Loads what reading each partition of a partitioned outbox needs into the session's caches (by
-- planning a query over every partition), so that a session's first read of a partition does
-- not pay for it while delivering. The tree calls it once per session.
CREATE OR REPLACE FUNCTION ff_completions_warm() RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    line text;
BEGIN
    IF ff_completions_outbox_partitioned() THEN
        FOR line IN EXECUTE 'EXPLAIN SELECT 1 FROM ff_completion_event e WHERE e.txid = ''1''::xid8' LOOP
        END LOOP;
    END IF;
END
$$;

-- Up to p_limit transactions of the batch from s1 to s2 (s1 NULL: every transaction s2 sees),
-- from p_from on, in txid order: those started at or after s1's xmax and seen by s2, and those
-- s1 saw in progress that s2 sees (a transaction still in progress costs no probe).
CREATE OR REPLACE FUNCTION ff_completions_batch_txns(s1 pg_snapshot, s2 pg_snapshot, p_from xid8, p_limit integer)
RETURNS SETOF ff_completion_txn
LANGUAGE sql STABLE AS $$
    SELECT t.* FROM (
        (SELECT t.* FROM ff_completion_txn t
          WHERE t.txid >= greatest(coalesce(pg_snapshot_xmax(s1), '0'::xid8), p_from)
            AND t.txid < pg_snapshot_xmax(s2) AND pg_visible_in_snapshot(t.txid, s2)
          ORDER BY t.txid LIMIT p_limit)
        UNION ALL
        (SELECT t.* FROM pg_snapshot_xip(s1) AS x(txid)
          CROSS JOIN LATERAL (SELECT * FROM ff_completion_txn t WHERE t.txid = x.txid LIMIT 1) t
          WHERE x.txid >= p_from AND pg_visible_in_snapshot(x.txid, s2)
          ORDER BY t.txid LIMIT p_limit)) t
     ORDER BY t.txid LIMIT p_limit
$$;

-- The outbox and family rows of transactions txids (outbox rows only in partitions keys) after
-- (pos, pos_e, pos_k), in reader order, up to lim. Planned at every call with the values given,
-- so the planner prunes an outbox partitioned on partition_key to the partitions in keys
-- before it opens any (the plan's text is kept: no parsing).
DROP FUNCTION IF EXISTS ff_completions_partition_rows(smallint[], xid8[], xid8[], xid8, bigint, integer, integer);
CREATE FUNCTION ff_completions_partition_rows(
    keys smallint[], outbox_txids xid8[], family_txids xid8[], pos xid8, pos_e bigint, pos_k integer, lim integer)
RETURNS TABLE (o_txid xid8, o_event_id bigint, o_execution_id text, o_flow_id text, o_outcome text,
               o_namespace text, o_instance_tag text, o_tags text, o_occurred_at_ms bigint, o_partition_key integer,
               o_family text, o_fields text, o_traceparent text)
LANGUAGE plpgsql STABLE SET plan_cache_mode = force_custom_plan AS $$
BEGIN
    RETURN QUERY
    SELECT r.txid, r.event_id, r.execution_id, r.flow_id, r.outcome, r.namespace, r.instance_tag, r.tags,
           r.occurred_at_ms, r.partition_key, r.family, r.fields, r.traceparent
      FROM ((SELECT e.txid, e.event_id, e.execution_id::text, e.flow_id::text, e.outcome, e.namespace,
                    e.instance_tag, e.tags::text AS tags, e.occurred_at_ms, e.partition_key::int4,
                    NULL::text AS family, NULL::text AS fields, e.traceparent
               FROM ff_completion_event e
              WHERE e.partition_key = ANY (keys) AND e.txid = ANY (outbox_txids)
                AND (e.txid, e.event_id) >= (pos, pos_e)
                AND ((e.txid, e.event_id) > (pos, pos_e) OR coalesce(e.partition_key::int4, -32769) > pos_k)
              ORDER BY e.txid, e.event_id, coalesce(e.partition_key::int4, -32769) LIMIT lim)
            UNION ALL
            (SELECT f.txid, f.event_id, f.execution_id::text, NULL, f.kind, f.namespace, NULL, NULL,
                    f.occurred_at_ms, f.partition_key::int4, f.family,
                    json_build_array(f.lease_id, f.worker, f.revoked_by, f.signal_id, f.waitpoint_id,
                                     f.source_identity)::text, f.traceparent
               FROM ff_completion_family_event f
              WHERE f.txid = ANY (family_txids) AND (f.txid, f.event_id) >= (pos, pos_e)
                AND ((f.txid, f.event_id) > (pos, pos_e) OR coalesce(f.partition_key::int4, -32769) > pos_k)
              ORDER BY f.txid, f.event_id LIMIT lim)) r
     ORDER BY r.txid, r.event_id, coalesce(r.partition_key, -32769) LIMIT lim;
END
$$;

-- The row shape every read returns. o_kind: 0 a row; 1 history after the position was trimmed
-- (its position: the oldest kept); 2 the end of a batch; 3 the read stopped with more to read;
-- 4 the position's tick is not this database's (o_outcome: the verdict of
-- ff_completions_check_tick; its position: where a reader that gives up on that history
-- resumes). Rows are ordered by (txid, event_id, partition key), a NULL key as -32769 (an outbox
-- keyed on (partition_key, event_id) may hold one event_id twice in a transaction).
--
-- Up to p_limit rows of the batch from s1 to s2 (s1 NULL: read whole) after position
-- (p_txid, p_event_id, p_key): txid 0 is before every row, txid 1 in the history from before
-- adoption or before the lineage (read first when the batch is read whole, by event_id).
DROP FUNCTION IF EXISTS ff_completions_page(bigint, bigint, pg_snapshot, pg_snapshot, bigint, bigint, integer);
DROP FUNCTION IF EXISTS ff_completions_page(bigint, bigint, pg_snapshot, pg_snapshot, bigint, bigint, integer, integer);
CREATE FUNCTION ff_completions_page(
    p_major bigint, p_fingerprint bigint, s1 pg_snapshot, s2 pg_snapshot, p_txid bigint, p_event_id bigint,
    p_key integer, p_limit integer)
RETURNS TABLE (o_kind integer, o_major bigint, o_txid bigint, o_event_id bigint, o_fingerprint bigint,
               o_execution_id text, o_flow_id text, o_outcome text, o_namespace text, o_instance_tag text,
               o_tags text, o_occurred_at_ms bigint, o_partition_key integer, o_family text, o_fields text, o_traceparent text)
LANGUAGE plpgsql STABLE
-- The cached plans are kept: planning a query over every partition of a partitioned outbox costs
-- more than running it.
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    members integer;
    last_member xid8;
    unknown_partitions boolean;
    outbox_txids xid8[];
    family_txids xid8[];
    keys smallint[];
    -- The position within a transaction: rows at or after (pos, pos_e), and at pos_e only with
    -- a key above pos_k. Below every row: (0, the smallest id, below every key).
    pos xid8 := '0'::xid8;
    pos_e bigint := -9223372036854775808;
    pos_k integer := -32770;
    got integer;
    remaining integer := p_limit;
    requested integer;
    partitioned boolean := ff_completions_outbox_partitioned();
BEGIN
    IF p_txid >= 2 THEN
        pos := p_txid::text::xid8;
        pos_e := p_event_id;
        pos_k := p_key;
    END IF;
    -- History from before adoption or before the lineage, when the batch is read whole.
    IF s1 IS NULL AND p_txid <= 1 THEN
        IF p_txid = 1 THEN
            pos_e := p_event_id;
            pos_k := p_key;
        END IF;
        RETURN QUERY
        SELECT 0, p_major, 1::bigint, h.event_id, p_fingerprint, h.execution_id, h.flow_id, h.outcome, h.namespace,
               h.instance_tag, h.tags, h.occurred_at_ms, h.partition_key, h.family, h.fields, h.traceparent
          FROM ((SELECT e.event_id, e.execution_id::text, e.flow_id::text, e.outcome, e.namespace, e.instance_tag,
                        e.tags::text AS tags, e.occurred_at_ms, e.partition_key::int4, NULL::text AS family,
                        NULL::text AS fields, e.traceparent
                   FROM ff_completion_event e
                  WHERE e.txid IS NULL AND e.event_id >= pos_e
                    AND (e.event_id > pos_e OR coalesce(e.partition_key::int4, -32769) > pos_k)
                  ORDER BY e.txid, e.event_id LIMIT p_limit)
                UNION ALL
                (SELECT e.event_id, e.execution_id::text, e.flow_id::text, e.outcome, e.namespace, e.instance_tag,
                        e.tags::text, e.occurred_at_ms, e.partition_key::int4, NULL::text, NULL::text, e.traceparent
                   FROM ff_completion_event e
                  WHERE e.txid = '2'::xid8 AND e.event_id >= pos_e
                    AND (e.event_id > pos_e OR coalesce(e.partition_key::int4, -32769) > pos_k)
                  ORDER BY e.txid, e.event_id LIMIT p_limit)
                UNION ALL
                (SELECT f.event_id, f.execution_id::text, NULL, f.kind, f.namespace, NULL, NULL, f.occurred_at_ms,
                        f.partition_key::int4, f.family,
                        json_build_array(f.lease_id, f.worker, f.revoked_by, f.signal_id, f.waitpoint_id,
                                         f.source_identity)::text, f.traceparent
                   FROM ff_completion_family_event f
                  WHERE f.txid = '2'::xid8 AND f.event_id >= pos_e
                    AND (f.event_id > pos_e OR coalesce(f.partition_key::int4, -32769) > pos_k)
                  ORDER BY f.txid, f.event_id LIMIT p_limit)) h
         ORDER BY h.event_id, coalesce(h.partition_key, -32769) LIMIT p_limit;
        GET DIAGNOSTICS got = ROW_COUNT;
        remaining := remaining - got;
        IF remaining <= 0 THEN
            RETURN;
        END IF;
        pos := '0'::xid8;
        pos_e := -9223372036854775808;
        pos_k := -32770;
    END IF;
    LOOP
        requested := remaining;
        -- The next transactions of the batch: which wrote outbox rows (and in which partitions,
        -- when the outbox is partitioned on partition_key), which wrote family rows.
        SELECT count(*), max(t.txid), coalesce(array_agg(t.txid) FILTER (WHERE t.outbox), '{}'),
               coalesce(array_agg(t.txid) FILTER (WHERE t.families), '{}'),
               coalesce(bool_or(t.outbox AND t.partitions IS NULL), false)
          INTO members, last_member, outbox_txids, family_txids, unknown_partitions
          FROM ff_completions_batch_txns(s1, s2, pos, requested) t;
        EXIT WHEN members = 0;
        keys := NULL;
        IF partitioned AND NOT unknown_partitions AND cardinality(outbox_txids) > 0 THEN
            keys := ARRAY(SELECT DISTINCT k FROM ff_completions_batch_txns(s1, s2, pos, requested) t,
                                                 unnest(t.partitions) AS k WHERE t.outbox);
        END IF;
        IF cardinality(keys) <= 16 THEN
            -- Only the few partitions these transactions wrote (a page that spans many takes the
            -- cached plan below: planning for every partition would cost more than reading).
            RETURN QUERY
            SELECT 0, p_major, r.o_txid::text::int8, r.o_event_id, p_fingerprint, r.o_execution_id, r.o_flow_id,
                   r.o_outcome, r.o_namespace, r.o_instance_tag, r.o_tags, r.o_occurred_at_ms, r.o_partition_key,
                   r.o_family, r.o_fields, r.o_traceparent
              FROM ff_completions_partition_rows(keys, outbox_txids, family_txids, pos, pos_e, pos_k, remaining) r;
        ELSIF cardinality(family_txids) = 0 THEN
            -- Completions alone (the common batch): the outbox's probe only.
            RETURN QUERY
            SELECT 0, p_major, e.txid::text::int8, e.event_id, p_fingerprint, e.execution_id::text, e.flow_id::text,
                   e.outcome, e.namespace, e.instance_tag, e.tags::text, e.occurred_at_ms, e.partition_key::int4,
                   NULL::text, NULL::text, e.traceparent
              FROM ff_completion_event e
             WHERE e.txid = ANY (outbox_txids) AND (e.txid, e.event_id) >= (pos, pos_e)
               AND ((e.txid, e.event_id) > (pos, pos_e) OR coalesce(e.partition_key::int4, -32769) > pos_k)
             ORDER BY e.txid, e.event_id, coalesce(e.partition_key::int4, -32769) LIMIT remaining;
        ELSE
            RETURN QUERY
            SELECT 0, p_major, r.txid::text::int8, r.event_id, p_fingerprint, r.execution_id, r.flow_id, r.outcome,
                   r.namespace, r.instance_tag, r.tags, r.occurred_at_ms, r.partition_key, r.family, r.fields, r.traceparent
              FROM ((SELECT e.txid, e.event_id, e.execution_id::text, e.flow_id::text, e.outcome, e.namespace,
                            e.instance_tag, e.tags::text AS tags, e.occurred_at_ms, e.partition_key::int4,
                            NULL::text AS family, NULL::text AS fields, e.traceparent
                       FROM ff_completion_event e
                      WHERE e.txid = ANY (outbox_txids) AND (e.txid, e.event_id) >= (pos, pos_e)
                        AND ((e.txid, e.event_id) > (pos, pos_e) OR coalesce(e.partition_key::int4, -32769) > pos_k)
                      ORDER BY e.txid, e.event_id, coalesce(e.partition_key::int4, -32769) LIMIT remaining)
                    UNION ALL
                    (SELECT f.txid, f.event_id, f.execution_id::text, NULL, f.kind, f.namespace, NULL, NULL,
                            f.occurred_at_ms, f.partition_key::int4, f.family,
                            json_build_array(f.lease_id, f.worker, f.revoked_by, f.signal_id, f.waitpoint_id,
                                             f.source_identity)::text, f.traceparent
                       FROM ff_completion_family_event f
                      WHERE f.txid = ANY (family_txids) AND (f.txid, f.event_id) >= (pos, pos_e)
                        AND ((f.txid, f.event_id) > (pos, pos_e) OR coalesce(f.partition_key::int4, -32769) > pos_k)
                      ORDER BY f.txid, f.event_id LIMIT remaining)) r
             ORDER BY r.txid, r.event_id, coalesce(r.partition_key, -32769) LIMIT remaining;
        END IF;
        GET DIAGNOSTICS got = ROW_COUNT;
        remaining := remaining - got;
        EXIT WHEN remaining <= 0;
        -- Fewer rows than asked for: every row of these transactions was returned. Go on with
        -- the transactions after the last of them, if there may be more.
        EXIT WHEN members < requested;
        pos := (last_member::text::int8 + 1)::text::xid8;
        pos_e := -9223372036854775808;
        pos_k := -32770;
    END LOOP;
END
$$;

-- Batches from tick p_tick (fingerprint p_fp, from snapshot s1 to s2) on, up to p_max of them,
-- while each is small enough to be read together with the others in one probe of the outbox:
-- at most 64 transactions, each of the outbox alone, in partitions it recorded; at most 256
-- transactions and 64 partitions in all. Returns their ticks and fingerprints, in order, their
-- transactions with the tick of each, the partitions (NULL: the outbox is not partitioned), and
-- the last one's snapshot. Fewer than two batches: read them one at a time (ff_completions_page).
CREATE OR REPLACE FUNCTION ff_completions_small_batches(
    p_tick bigint, p_fp bigint, s1 pg_snapshot, s2 pg_snapshot, p_max integer,
    OUT o_ticks bigint[], OUT o_fingerprints bigint[], OUT o_txids xid8[], OUT o_txid_ticks bigint[],
    OUT o_keys smallint[], OUT o_last_snapshot pg_snapshot)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    partitioned boolean := ff_completions_outbox_partitioned();
    -- The ticks after p_tick, in order: the later batches' ends.
    later_ticks bigint[];
    later_snapshots pg_snapshot[];
    later_fingerprints bigint[];
    k bigint := p_tick;
    fp bigint := p_fp;
    i integer := 0;
    members integer;
    readable boolean;
    txids xid8[];
    keys smallint[];
BEGIN
    o_ticks := '{}';
    o_fingerprints := '{}';
    o_txids := '{}';
    o_txid_ticks := '{}';
    o_keys := CASE WHEN partitioned THEN '{}'::smallint[] END;
    SELECT array_agg(t.tick_id ORDER BY t.tick_id), array_agg(t.snapshot ORDER BY t.tick_id),
           array_agg(t.fingerprint ORDER BY t.tick_id)
      INTO later_ticks, later_snapshots, later_fingerprints
      FROM (SELECT t.tick_id, t.snapshot, t.fingerprint FROM ff_completion_tick t
             WHERE t.tick_id > p_tick ORDER BY t.tick_id LIMIT greatest(p_max - 1, 0)) t;
    LOOP
        SELECT count(DISTINCT t.txid),
               coalesce(bool_and(t.outbox AND NOT t.families AND (t.partitions IS NOT NULL OR NOT partitioned)), true),
               coalesce(array_agg(DISTINCT t.txid), '{}'),
               coalesce(array_agg(DISTINCT x) FILTER (WHERE x IS NOT NULL), '{}')
          INTO members, readable, txids, keys
          FROM ff_completions_batch_txns(s1, s2, '0'::xid8, 65) t
          LEFT JOIN LATERAL unnest(t.partitions) AS x ON partitioned;
        EXIT WHEN members > 64 OR NOT readable OR cardinality(o_txids) + members > 256;
        IF partitioned THEN
            -- A partition two batches wrote counts twice here: the bound stays a bound.
            EXIT WHEN cardinality(o_keys) + cardinality(keys) > 64;
            o_keys := o_keys || keys;
        END IF;
        o_ticks := o_ticks || k;
        o_fingerprints := o_fingerprints || fp;
        o_txids := o_txids || txids;
        o_txid_ticks := o_txid_ticks || array_fill(k, ARRAY[members]);
        o_last_snapshot := s2;
        i := i + 1;
        EXIT WHEN i > coalesce(cardinality(later_ticks), 0);
        k := later_ticks[i];
        fp := later_fingerprints[i];
        s1 := s2;
        s2 := later_snapshots[i];
    END LOOP;
END
$$;

-- The retention cut as a position, or no row when nothing was cut.
DROP FUNCTION IF EXISTS ff_completions_cut();
CREATE FUNCTION ff_completions_cut(OUT o_major bigint, OUT o_txid bigint, OUT o_event_id bigint, OUT o_key integer)
RETURNS SETOF record LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN QUERY SELECT r.cut_major, r.cut_txid, r.cut_event_id, r.cut_key FROM ff_completion_retention r
                  WHERE r.cut_major IS NOT NULL;
END
$$;

-- The retention cut, when a reader at (p_major, p_txid, p_event_id, p_key) may have lost rows:
-- below the cut, or reading a batch whole (every row its tick sees, in (txid, event_id) order)
-- below the highest row removed. No row otherwise.
CREATE OR REPLACE FUNCTION ff_completions_expiry(p_major bigint, p_txid bigint, p_event_id bigint, p_key integer,
                                                 OUT o_major bigint, OUT o_txid bigint, OUT o_event_id bigint,
                                                 OUT o_key integer)
RETURNS SETOF record LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN QUERY
    SELECT r.cut_major, r.cut_txid, r.cut_event_id, r.cut_key FROM ff_completion_retention r
     WHERE r.cut_major IS NOT NULL
       AND ((p_major, p_txid, p_event_id, p_key) < (r.cut_major, r.cut_txid, r.cut_event_id, r.cut_key)
            OR (p_major % 3 = 1 AND (p_txid, p_event_id) < (r.trimmed_txid::text::int8, r.trimmed_event_id)));
END
$$;

-- Up to p_limit rows after position (p_major, p_txid, p_event_id, p_key), in reader order, going
-- on into later batches while the limit allows (recording at most one new tick at the head, and
-- reading at most 64 batches: then a row of kind 3 says more is waiting). p_fingerprint, when
-- given, is the fingerprint of the position's tick: a tick that is missing or another one is
-- refused with kind 4 (or kind 1 when retention removed it) instead of being read against the
-- wrong snapshot. The retention cut is checked last, so a cut committed during the read is seen.
DROP FUNCTION IF EXISTS ff_completions_read(bigint, bigint, bigint, bigint, integer);
DROP FUNCTION IF EXISTS ff_completions_read(bigint, bigint, bigint, integer, bigint, integer);
CREATE FUNCTION ff_completions_read(p_major bigint, p_txid bigint, p_event_id bigint, p_key integer,
                                    p_fingerprint bigint, p_limit integer)
RETURNS TABLE (o_kind integer, o_major bigint, o_txid bigint, o_event_id bigint, o_fingerprint bigint,
               o_execution_id text, o_flow_id text, o_outcome text, o_namespace text, o_instance_tag text,
               o_tags text, o_occurred_at_ms bigint, o_partition_key integer, o_family text, o_fields text, o_traceparent text)
LANGUAGE plpgsql AS $$
DECLARE
    k bigint := p_major / 3;
    phase integer := (p_major % 3)::integer;
    pos_t bigint := p_txid;
    pos_e bigint := p_event_id;
    pos_k integer := p_key;
    s1 pg_snapshot;
    s2 pg_snapshot;
    fp bigint;
    remaining integer := greatest(p_limit, 1);
    got integer;
    next_tick bigint;
    batches integer := 0;
    ticked boolean := false;
    cut ff_completion_retention;
    expired record;
    verdict text;
    -- Small batches read together (see ff_completions_small_batches).
    small record;
    row record;
BEGIN
    IF k = 0 THEN
        phase := 2;
    ELSE
        SELECT t.snapshot, t.fingerprint INTO s2, fp FROM ff_completion_tick t WHERE t.tick_id = k;
        IF s2 IS NULL OR fp IS DISTINCT FROM coalesce(p_fingerprint, fp) THEN
            verdict := (SELECT c.o_verdict FROM ff_completions_check_tick(k, p_fingerprint) c);
            SELECT * INTO expired FROM ff_completions_expiry(p_major, p_txid, p_event_id, p_key);
            IF expired.o_major IS NOT NULL AND verdict NOT IN ('retired', 'different') THEN
                RETURN QUERY SELECT 1, expired.o_major, expired.o_txid, expired.o_event_id, t.fingerprint, NULL::text,
                                    NULL::text, NULL::text, NULL::text, NULL::text, NULL::text, NULL::bigint,
                                    expired.o_key, NULL::text, NULL::text, NULL::text
                               FROM (SELECT 1) one LEFT JOIN ff_completion_tick t ON t.tick_id = expired.o_major / 3;
                RETURN;
            END IF;
            -- Where a reader that gives up on the lost history resumes: the end of the newest tick.
            next_tick := ff_completions_tick();
            RETURN QUERY SELECT 4, 3 * next_tick + 2, 0::bigint, 0::bigint, t.fingerprint, NULL::text, NULL::text,
                                verdict, NULL::text, NULL::text,
                                NULL::text, NULL::bigint, NULL::integer, NULL::text, NULL::text, NULL::text
                           FROM ff_completion_tick t WHERE t.tick_id = next_tick;
            RETURN;
        END IF;
        IF phase = 0 THEN
            s1 := (SELECT t.snapshot FROM ff_completion_tick t WHERE t.tick_id < k ORDER BY t.tick_id DESC LIMIT 1);
        END IF;
    END IF;
    LOOP
        IF phase = 0 AND pos_t = 0 AND s1 IS NOT NULL AND NOT ticked
           AND EXISTS (SELECT 1 FROM ff_completion_tick t WHERE t.tick_id > k) THEN
            -- At the start of a batch with more ticks after it (catching up): small batches are
            -- read together, in one probe of the outbox for all of them.
            small := ff_completions_small_batches(k, fp, s1, s2, 64 - batches);
            IF cardinality(small.o_ticks) >= 2 THEN
                -- Their rows up to the limit and the end of each batch, in reader order; after the
                -- limit's last row, nothing (the next read goes on from that row).
                FOR row IN EXECUTE
                    'SELECT x.* FROM (
                        (SELECT 0 AS kind, b.k, e.txid::text::int8 AS txid, e.event_id,
                                e.execution_id::text AS execution_id, e.flow_id::text AS flow_id, e.outcome,
                                e.namespace, e.instance_tag, e.tags::text AS tags, e.occurred_at_ms,
                                e.partition_key::int4 AS partition_key, e.traceparent
                           FROM ff_completion_event e
                           JOIN unnest($2::xid8[], $3::bigint[]) AS b(txid, k) ON b.txid = e.txid
                          WHERE e.txid = ANY ($2)' || CASE WHEN small.o_keys IS NULL THEN '' ELSE ' AND e.partition_key = ANY ($1)' END ||
                        ' ORDER BY b.k, e.txid, e.event_id, coalesce(e.partition_key::int4, -32769) LIMIT $4)
                        UNION ALL
                        SELECT 2, t.k, 0, 0, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
                          FROM unnest($5::bigint[]) AS t(k)) x
                     ORDER BY x.k, x.kind, x.txid, x.event_id, coalesce(x.partition_key, -32769)'
                    USING small.o_keys, small.o_txids, small.o_txid_ticks, remaining, small.o_ticks LOOP
                    EXIT WHEN remaining <= 0;
                    o_kind := row.kind; o_major := 3 * row.k + row.kind; o_txid := row.txid;
                    o_event_id := row.event_id;
                    o_fingerprint := small.o_fingerprints[array_position(small.o_ticks, row.k)];
                    o_execution_id := row.execution_id; o_flow_id := row.flow_id; o_outcome := row.outcome;
                    o_namespace := row.namespace; o_instance_tag := row.instance_tag; o_tags := row.tags;
                    o_occurred_at_ms := row.occurred_at_ms; o_partition_key := row.partition_key; o_family := NULL;
                    o_fields := NULL; o_traceparent := row.traceparent;
                    RETURN NEXT;
                    IF row.kind = 0 THEN
                        remaining := remaining - 1;
                    END IF;
                END LOOP;
                EXIT WHEN remaining <= 0;
                -- Go on after the last of them (the loop counts it).
                batches := batches + cardinality(small.o_ticks) - 1;
                k := small.o_ticks[cardinality(small.o_ticks)];
                fp := small.o_fingerprints[cardinality(small.o_ticks)];
                s2 := small.o_last_snapshot;
                phase := 2;
            END IF;
        END IF;
        IF phase < 2 THEN
            IF phase = 1 THEN
                s1 := NULL;
            END IF;
            RETURN QUERY SELECT * FROM ff_completions_page(3 * k + phase, fp, s1, s2, pos_t, pos_e, pos_k, remaining);
            GET DIAGNOSTICS got = ROW_COUNT;
            remaining := remaining - got;
            EXIT WHEN remaining <= 0;
            o_kind := 2; o_major := 3 * k + 2; o_txid := 0; o_event_id := 0; o_fingerprint := fp;
            o_execution_id := NULL; o_flow_id := NULL; o_outcome := NULL; o_namespace := NULL;
            o_instance_tag := NULL; o_tags := NULL; o_occurred_at_ms := NULL; o_partition_key := NULL;
            o_family := NULL; o_fields := NULL; o_traceparent := NULL;
            RETURN NEXT;
        END IF;
        batches := batches + 1;
        IF batches > 64 THEN
            o_kind := 3; o_major := 3 * k + 2; o_txid := 0; o_event_id := 0; o_fingerprint := fp;
            o_outcome := NULL;
            RETURN NEXT;
            EXIT;
        END IF;
        -- The next tick, and its predecessor's snapshot: the batch between them.
        s1 := s2;
        SELECT t.tick_id, t.snapshot, t.fingerprint INTO next_tick, s2, fp FROM ff_completion_tick t
         WHERE t.tick_id > k ORDER BY t.tick_id LIMIT 1;
        IF next_tick IS NULL THEN
            -- At the head: one new tick per call, so a call ends while producers keep committing.
            EXIT WHEN ticked;
            ticked := true;
            EXIT WHEN ff_completions_tick() <= k;
            SELECT t.tick_id, t.snapshot, t.fingerprint INTO next_tick, s2, fp FROM ff_completion_tick t
             WHERE t.tick_id > k ORDER BY t.tick_id LIMIT 1;
        END IF;
        IF k = 0 THEN
            -- The first batch a reader from the start reads is every row its tick sees, as if
            -- read after a tick before all history.
            s1 := (SELECT t.snapshot FROM ff_completion_tick t WHERE t.tick_id < next_tick
                    ORDER BY t.tick_id DESC LIMIT 1);
        END IF;
        k := next_tick;
        phase := 0;
        pos_t := 0;
        pos_e := 0;
        pos_k := -32769;
    END LOOP;
    -- Checked last, so a cut committed during the read is seen.
    SELECT * INTO cut FROM ff_completion_retention r;
    IF cut.cut_major IS NOT NULL
       AND ((p_major, p_txid, p_event_id, p_key) < (cut.cut_major, cut.cut_txid, cut.cut_event_id, cut.cut_key)
            OR (p_major % 3 = 1 AND (p_txid, p_event_id) < (cut.trimmed_txid::text::int8, cut.trimmed_event_id))) THEN
        RETURN QUERY SELECT 1, cut.cut_major, cut.cut_txid, cut.cut_event_id, t.fingerprint, NULL::text, NULL::text,
                            NULL::text, NULL::text, NULL::text, NULL::text, NULL::bigint, cut.cut_key, NULL::text,
                            NULL::text, NULL::text
                       FROM (SELECT 1) one LEFT JOIN ff_completion_tick t ON t.tick_id = cut.cut_major / 3;
    END IF;
END
$$;

-- The reader of earlier versions, for processes of an earlier version during a rolling upgrade:
-- the same rows in the earlier shape (history from before adoption at txid 0, no fingerprint).
DROP FUNCTION IF EXISTS ff_completions_read(bigint, bigint, bigint, integer);
CREATE FUNCTION ff_completions_read(p_major bigint, p_txid bigint, p_event_id bigint, p_limit integer)
RETURNS TABLE (o_kind integer, o_major bigint, o_txid bigint, o_event_id bigint, o_execution_id text,
               o_flow_id text, o_outcome text, o_namespace text, o_instance_tag text, o_tags text,
               o_occurred_at_ms bigint, o_partition_key integer, o_family text, o_fields text, o_traceparent text)
LANGUAGE sql AS $$
    SELECT r.o_kind, r.o_major, CASE WHEN r.o_txid = 1 THEN 0 ELSE r.o_txid END, r.o_event_id, r.o_execution_id,
           r.o_flow_id, r.o_outcome, r.o_namespace, r.o_instance_tag, r.o_tags, r.o_occurred_at_ms,
           r.o_partition_key, r.o_family, r.o_fields, r.o_traceparent
      FROM ff_completions_read(p_major, CASE WHEN p_txid = 0 AND p_event_id > 0 THEN 1 ELSE p_txid END, p_event_id,
                               32768, NULL::bigint, p_limit) r
     WHERE r.o_kind IN (0, 1, 2)
$$;

-- Where a cursor of an earlier form resumes: the whole batch of the newest tick, from just before
-- the first row it had not seen. p_txid NULL: the 9-byte event_id cursor (the rows with a higher
-- event_id are the unseen ones); otherwise the 17-byte (txid, event_id) cursor. Returns
-- (major, txid, event_id, fingerprint).
DROP FUNCTION IF EXISTS ff_completions_resume_earlier_form(bigint, bigint);
CREATE FUNCTION ff_completions_resume_earlier_form(p_txid bigint, p_event_id bigint)
RETURNS TABLE (o_major bigint, o_txid bigint, o_event_id bigint, o_fingerprint bigint)
LANGUAGE plpgsql AS $$
DECLARE
    k bigint := ff_completions_tick();
    fp bigint := (SELECT t.fingerprint FROM ff_completion_tick t WHERE t.tick_id = k);
    first_txid bigint;
BEGIN
    IF p_txid IS NOT NULL THEN
        RETURN QUERY SELECT 3 * k + 1, greatest(p_txid, 2), p_event_id, fp;
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM ff_completion_event e WHERE (e.txid IS NULL OR e.txid = '2'::xid8)
                                                     AND e.event_id > p_event_id) THEN
        RETURN QUERY SELECT 3 * k + 1, 1::bigint, p_event_id, fp;
        RETURN;
    END IF;
    first_txid := (SELECT min(e.txid)::text::int8 FROM ff_completion_event e WHERE e.event_id > p_event_id);
    IF first_txid IS NULL THEN
        RETURN QUERY SELECT 3 * k + 2, 0::bigint, 0::bigint, fp;
    ELSE
        RETURN QUERY SELECT 3 * k + 1, first_txid - 1, 9223372036854775807::bigint, fp;
    END IF;
END
$$;

-- The rows of batch k (every family), counted once and kept on the tick.
CREATE OR REPLACE FUNCTION ff_completions_batch_row_count(k bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    s2 pg_snapshot := (SELECT t.snapshot FROM ff_completion_tick t WHERE t.tick_id = k);
    s1 pg_snapshot := (SELECT t.snapshot FROM ff_completion_tick t WHERE t.tick_id < k ORDER BY t.tick_id DESC LIMIT 1);
    counted bigint := (SELECT t.row_count FROM ff_completion_tick t WHERE t.tick_id = k);
    n bigint := 0;
BEGIN
    IF counted IS NOT NULL OR s2 IS NULL THEN
        RETURN coalesce(counted, 0);
    END IF;
    n := (SELECT count(*) FROM ff_completion_event e
           WHERE e.txid = ANY (ARRAY(SELECT t.txid FROM ff_completions_batch_txns(s1, s2, '0'::xid8, 2147483647) t
                                      WHERE t.outbox)))
       + (SELECT count(*) FROM ff_completion_family_event f
           WHERE f.txid = ANY (ARRAY(SELECT t.txid FROM ff_completions_batch_txns(s1, s2, '0'::xid8, 2147483647) t
                                      WHERE t.families)));
    IF s1 IS NULL THEN
        n := n + (SELECT count(*) FROM ff_completion_event e WHERE e.txid IS NULL OR e.txid = '2'::xid8)
               + (SELECT count(*) FROM ff_completion_family_event f WHERE f.txid = '2'::xid8);
    END IF;
    UPDATE ff_completion_tick SET row_count = n WHERE tick_id = k;
    RETURN n;
END
$$;

-- Plans a trim: the newest tick whose batch retention removes, by age (its tick older than
-- p_max_age_ms, by the database's clock) or by count (at least p_keep rows in later batches),
-- whichever removes more (either may be NULL). Records the cut at the end of that batch first:
-- from then on a reader below it expires. Returns the tick (NULL: nothing to cut). Deleting is
-- ff_completions_trim_step's work, in small transactions.
CREATE OR REPLACE FUNCTION ff_completions_trim_plan(p_max_age_ms bigint, p_keep bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    newest bigint := ff_completions_tick();
    by_age bigint;
    by_count bigint;
    later bigint := 0;
    k bigint;
    cut record;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('ff_completion_trim'), 0);
    IF p_max_age_ms IS NOT NULL THEN
        by_age := (SELECT max(t.tick_id) FROM ff_completion_tick t
                    WHERE t.created_at_ms < ff_completions_now_ms() - greatest(p_max_age_ms, 0));
    END IF;
    IF p_keep IS NOT NULL THEN
        FOR k IN SELECT t.tick_id FROM ff_completion_tick t ORDER BY t.tick_id DESC LOOP
            IF later >= greatest(p_keep, 0) THEN
                by_count := k;
                EXIT;
            END IF;
            later := later + ff_completions_batch_row_count(k);
        END LOOP;
    END IF;
    k := greatest(by_age, by_count);
    IF k IS NULL OR k > newest THEN
        RETURN NULL;
    END IF;
    SELECT * INTO cut FROM ff_completions_cut();
    PERFORM ff_completions_raise_cut(3 * k + 2, 0, 0, -32769, NULL, NULL, NULL);
    RETURN k;
END
$$;

-- Deletes up to p_limit rows below the retention cut (rows of transactions the cut's tick sees,
-- and history from before adoption or before the lineage), forgets the transactions left with
-- no row, and deletes ticks no reader needs (a reader at the cut needs its tick). Returns the
-- rows deleted, and whether nothing is left below the cut. Each call is its own small
-- transaction and takes no lock a reader waits for.
CREATE OR REPLACE FUNCTION ff_completions_trim_step(p_limit integer, OUT o_rows bigint, OUT o_done boolean)
LANGUAGE plpgsql AS $$
DECLARE
    cut record;
    k bigint;
    s pg_snapshot;
    txids xid8[];
    lim integer := greatest(p_limit, 1);
    n bigint := 0;
    got bigint;
    forgotten bigint := 0;
    top record;
    top_event_id bigint;
BEGIN
    SELECT * INTO cut FROM ff_completions_cut();
    IF cut.o_major IS NULL THEN
        o_rows := 0;
        o_done := true;
        RETURN;
    END IF;
    PERFORM set_config('ff_completions.trimming', 'on', true);
    -- A cut at the end of batch k removes what tick k sees; a cut inside a batch (the start of
    -- a new lineage) removes only the history read before it.
    k := CASE WHEN cut.o_major % 3 = 2 THEN cut.o_major / 3 END;
    DELETE FROM ff_completion_tick t WHERE t.tick_id < coalesce(k, cut.o_major / 3);
    CREATE TEMP TABLE IF NOT EXISTS ff_trimmed (txid xid8, event_id bigint) ON COMMIT DROP;
    IF k IS NOT NULL THEN
        WITH doomed AS (
            DELETE FROM ff_completion_event e
             WHERE (e.tableoid, e.ctid) IN (SELECT d.tableoid, d.ctid FROM ff_completion_event d
                                             WHERE d.txid IS NULL OR d.txid = '2'::xid8 LIMIT lim)
            RETURNING e.txid, e.event_id)
        INSERT INTO ff_trimmed SELECT d.txid, d.event_id FROM doomed d;
        GET DIAGNOSTICS got = ROW_COUNT;
        n := n + got;
        s := (SELECT t.snapshot FROM ff_completion_tick t WHERE t.tick_id = k);
    END IF;
    IF n < lim AND s IS NOT NULL THEN
        txids := ARRAY(SELECT t.txid FROM ff_completion_txn t
                        WHERE t.txid < pg_snapshot_xmax(s) AND pg_visible_in_snapshot(t.txid, s)
                        ORDER BY t.txid LIMIT 64);
        IF cardinality(txids) > 0 THEN
            WITH doomed AS (
                DELETE FROM ff_completion_event e
                 WHERE (e.tableoid, e.ctid) IN (SELECT d.tableoid, d.ctid FROM ff_completion_event d
                                                 WHERE d.txid = ANY (txids) LIMIT lim - n)
                RETURNING e.txid, e.event_id)
            INSERT INTO ff_trimmed SELECT d.txid, d.event_id FROM doomed d;
            GET DIAGNOSTICS got = ROW_COUNT;
            n := n + got;
            IF n < lim THEN
                DELETE FROM ff_completion_family_event f
                 WHERE (f.txid, f.event_id) IN (SELECT d.txid, d.event_id FROM ff_completion_family_event d
                                                 WHERE d.txid = ANY (txids) LIMIT lim - n);
                GET DIAGNOSTICS got = ROW_COUNT;
                n := n + got;
            END IF;
            IF n < lim THEN
                -- Every row of these transactions is gone: forget them.
                DELETE FROM ff_completion_txn t WHERE t.txid = ANY (txids);
                GET DIAGNOSTICS forgotten = ROW_COUNT;
            END IF;
        END IF;
    END IF;
    SELECT d.txid, d.event_id INTO top FROM ff_trimmed d WHERE d.txid IS NOT NULL
     ORDER BY d.txid DESC, d.event_id DESC LIMIT 1;
    top_event_id := (SELECT max(d.event_id) FROM ff_trimmed d);
    IF top_event_id IS NOT NULL THEN
        PERFORM ff_completions_raise_cut(NULL, NULL, NULL, NULL, coalesce(top.txid, '1'::xid8),
                                         coalesce(top.event_id, top_event_id), top_event_id);
    END IF;
    TRUNCATE ff_trimmed;
    PERFORM set_config('ff_completions.trimming', 'off', true);
    o_rows := n;
    o_done := n + forgotten = 0;
END
$$;

-- Retention in one call, for a scheduler such as cron or pg_cron: plans the cut, then deletes
-- in transactions of p_step rows each (a procedure: CALL it outside a transaction block).
CREATE OR REPLACE PROCEDURE ff_completions_trim_all(p_max_age_ms bigint, p_keep bigint, p_step integer DEFAULT 5000)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM ff_completions_trim_plan(p_max_age_ms, p_keep);
    COMMIT;
    WHILE NOT (SELECT s.o_done FROM ff_completions_trim_step(p_step) s) LOOP
        COMMIT;
    END LOOP;
END
$$;

-- The earlier interface: plans a cut (p_before_ms is a wall-clock cutoff, as it was) and deletes
-- one step of rows. Returns the rows removed.
CREATE OR REPLACE FUNCTION ff_completions_trim(p_before_ms bigint, p_keep bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM ff_completions_trim_plan(CASE WHEN p_before_ms IS NOT NULL
                                          THEN greatest(ff_completions_now_ms() - p_before_ms, 0) END, p_keep);
    RETURN (SELECT s.o_rows FROM ff_completions_trim_step(10000) s);
END
$$;

-- Whether a position in the batch of tick k, read under fingerprint p_fingerprint (NULL: not
-- known), can be read here. o_verdict: 'ok'; 'retired' (k belongs to a lineage retired since:
-- a restored dump or a logical copy); 'missing' (no tick k, and k is beyond the newest: a
-- restored backup or a lossy failover); 'gone' (no tick k below the newest: retention removed
-- it, the caller decides by the cut); 'different' (tick k is another tick). o_reason says it
-- for an operator.
CREATE OR REPLACE FUNCTION ff_completions_check_tick(k bigint, p_fingerprint bigint,
                                                     OUT o_verdict text, OUT o_reason text)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    fp bigint := (SELECT t.fingerprint FROM ff_completion_tick t WHERE t.tick_id = k);
    newest bigint := coalesce((SELECT max(t.tick_id) FROM ff_completion_tick t), 0);
    current_lineage ff_completion_lineage := (SELECT l FROM ff_completion_lineage l ORDER BY l.lineage_id DESC LIMIT 1);
BEGIN
    IF k = 0 OR (fp IS NOT NULL AND fp = coalesce(p_fingerprint, fp)) THEN
        o_verdict := 'ok';
    ELSIF fp IS NULL AND current_lineage.lineage_id > 1 AND k < current_lineage.first_tick THEN
        o_verdict := 'retired';
        o_reason := format('tick %s belongs to a history of this database retired at %s: %s', k,
                           to_timestamp(current_lineage.started_at_ms / 1000.0), current_lineage.cause);
    ELSIF fp IS NULL AND k > newest THEN
        o_verdict := 'missing';
        o_reason := format('this database has no tick %s, its newest is %s: it was restored from a backup or a dump '
                           'older than the cursor, failed over to a replica that missed it, or is another database',
                           k, newest);
    ELSIF fp IS NULL THEN
        o_verdict := 'gone';
        o_reason := format('tick %s was removed by retention', k);
    ELSE
        o_verdict := 'different';
        o_reason := format('tick %s of this database is another tick than the cursor''s: it was restored from a backup '
                           'older than the cursor, failed over to a replica that missed it, or is another database', k);
    END IF;
END
$$;

-- Refuses to read a database whose outbox is gone or lost its capture trigger (a host that
-- recreated the table, or disabled the trigger): its new rows would never be read. Class 42,
-- as for a missing table: an operator must act.
CREATE OR REPLACE FUNCTION ff_completions_verify() RETURNS void
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF to_regclass('ff_completion_event') IS NULL THEN
        RAISE EXCEPTION 'the outbox ff_completion_event does not exist' USING ERRCODE = '42P01';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = 'ff_completion_event'::regclass
                                               AND t.tgname = 'ff_completions_capture' AND t.tgenabled = 'A') THEN
        RAISE EXCEPTION 'ff_completion_event has no trigger ff_completions_capture enabled ALWAYS, so its new rows '
                        'would never be read: the outbox was recreated or the trigger disabled'
            USING ERRCODE = '42704',
                  HINT = 'ALTER TABLE ff_completion_event ENABLE ALWAYS TRIGGER ff_completions_capture, or reinstall';
    END IF;
END
$$;
