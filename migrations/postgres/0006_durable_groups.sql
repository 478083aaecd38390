-- ff-completions for Postgres, part 6: durable groups. Processes subscribing under one group name
-- share the completions of the flow partitions through fenced leases; the group's acknowledged
-- position per partition lives here (see src/durable/store.rs for the rules). Every decision
-- about expiry uses clock_timestamp() taken after the group's row lock, never now() (the start of
-- a transaction that may have waited for that lock, or that is the caller's own).
--
-- Positions are reader positions as three bigints (batch, txid, event_id) compared as a row.
-- The partition count, 256, is the crate's PARTITION_COUNT.

-- A group: one row, locked by each heartbeat and leave (they run one at a time per group).
CREATE TABLE IF NOT EXISTS ff_completion_group (
    group_name  text PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- A group's members and when each one's membership lapses without another heartbeat.
CREATE TABLE IF NOT EXISTS ff_completion_group_member (
    group_name  text NOT NULL REFERENCES ff_completion_group (group_name) ON DELETE CASCADE,
    member      text NOT NULL,
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (group_name, member)
);

-- One lease per flow partition of a group: its holder (NULL: free) until expires_at, the fencing
-- token (raised each time the partition changes hands or its holder rejoins) and the
-- acknowledged position.
CREATE TABLE IF NOT EXISTS ff_completion_group_partition (
    group_name   text NOT NULL REFERENCES ff_completion_group (group_name) ON DELETE CASCADE,
    partition    smallint NOT NULL,
    owner        text,
    token        bigint NOT NULL DEFAULT 0,
    expires_at   timestamptz,
    acked_major  bigint NOT NULL,
    acked_hi     bigint NOT NULL,
    acked_lo     bigint NOT NULL,
    PRIMARY KEY (group_name, partition)
);

-- Joins or renews p_member of p_group and rebalances: creates the group (every partition free,
-- token 0, acknowledged at the start position) when absent; renews the member and its leases to
-- now + ttl, removing members that lapsed; on a rejoin raises the token of every partition it
-- holds; then frees its highest partitions above its share or takes free and lapsed ones in
-- ascending order (token + 1) below it. The share is every partition when exclusive, else the
-- ceiling of 256 over the live members (fair_share in src/durable/store.rs). A partition whose
-- row another transaction holds (an ack inside a paused engine's open transaction) is skipped
-- until that transaction ends, rather than waited for with the group's lock held. Returns what
-- the member holds, ascending.
CREATE OR REPLACE FUNCTION ff_completion_group_heartbeat(
    p_group text, p_member text, p_ttl_ms bigint, p_exclusive boolean, p_rejoin boolean,
    p_start_major bigint, p_start_hi bigint, p_start_lo bigint)
RETURNS TABLE (o_partition smallint, o_token bigint, o_acked_major bigint, o_acked_hi bigint, o_acked_lo bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_now    timestamptz;
    v_until  timestamptz;
    v_share  integer;
    v_held   integer;
BEGIN
    INSERT INTO ff_completion_group (group_name) VALUES (p_group) ON CONFLICT (group_name) DO NOTHING;
    IF FOUND THEN
        INSERT INTO ff_completion_group_partition (group_name, partition, acked_major, acked_hi, acked_lo)
        SELECT p_group, p::smallint, p_start_major, p_start_hi, p_start_lo FROM generate_series(0, 255) AS p;
    END IF;
    PERFORM 1 FROM ff_completion_group WHERE group_name = p_group FOR UPDATE;
    v_now := clock_timestamp();
    v_until := v_now + make_interval(secs => p_ttl_ms / 1000.0);

    INSERT INTO ff_completion_group_member (group_name, member, expires_at) VALUES (p_group, p_member, v_until)
        ON CONFLICT (group_name, member) DO UPDATE SET expires_at = excluded.expires_at;
    DELETE FROM ff_completion_group_member WHERE group_name = p_group AND expires_at <= v_now;

    -- Its own leases, locked in partition order (as an ack locks them), renewed, and on a rejoin
    -- given new tokens.
    PERFORM 1 FROM ff_completion_group_partition
      WHERE group_name = p_group AND owner = p_member ORDER BY partition FOR UPDATE;
    UPDATE ff_completion_group_partition
       SET expires_at = v_until, token = token + CASE WHEN p_rejoin THEN 1 ELSE 0 END
     WHERE group_name = p_group AND owner = p_member;
    GET DIAGNOSTICS v_held = ROW_COUNT;

    IF p_exclusive THEN
        v_share := 256;
    ELSE
        SELECT ceil(256.0 / count(*))::integer INTO v_share
          FROM ff_completion_group_member WHERE group_name = p_group AND expires_at > v_now;
    END IF;

    -- The partitions to free or take are chosen once, in a materialized CTE: as an IN (subquery
    -- with LIMIT ... SKIP LOCKED), a plan may run the subquery again per row and take more than
    -- the share.
    IF v_held > v_share THEN
        WITH freed AS MATERIALIZED (
            SELECT partition FROM ff_completion_group_partition
             WHERE group_name = p_group AND owner = p_member
             ORDER BY partition DESC LIMIT v_held - v_share)
        UPDATE ff_completion_group_partition p SET owner = NULL, expires_at = NULL
          FROM freed WHERE p.group_name = p_group AND p.partition = freed.partition;
    ELSIF v_held < v_share THEN
        WITH taken AS MATERIALIZED (
            SELECT partition FROM ff_completion_group_partition
             WHERE group_name = p_group
               AND (owner IS NULL OR (owner <> p_member AND expires_at <= v_now))
             ORDER BY partition LIMIT v_share - v_held FOR UPDATE SKIP LOCKED)
        UPDATE ff_completion_group_partition p SET owner = p_member, expires_at = v_until, token = p.token + 1
          FROM taken WHERE p.group_name = p_group AND p.partition = taken.partition;
    END IF;

    RETURN QUERY
        SELECT p.partition, p.token, p.acked_major, p.acked_hi, p.acked_lo FROM ff_completion_group_partition p
         WHERE p.group_name = p_group AND p.owner = p_member ORDER BY p.partition;
END
$$;

-- Acknowledges positions for p_member of p_group, all or nothing, on the caller's connection
-- (inside its transaction when it has one, so that a fenced ack aborts it). Raises FFG02 for an
-- unknown group, FFG03 for arrays of different lengths, FFG01 (DETAIL: the partition) when the
-- member does not hold one of the partitions with the ack's token. A lease that ran out but
-- that nobody took yet still counts: only a takeover (which raises the token) moves events to
-- another member, and a refused ack is redelivered only by the next holder of a new token.
-- Positions only move up; the highest of several acks of one partition wins. With p_once (an
-- ack in the transaction of the engine's effect) every ack must move its position up: one at
-- or below the stored position raises FFG04 (DETAIL: the partition), so that an effect whose
-- event was already acknowledged rolls back.
CREATE OR REPLACE FUNCTION ff_completion_group_ack(
    p_group text, p_member text, p_partitions integer[], p_tokens bigint[],
    p_majors bigint[], p_his bigint[], p_los bigint[], p_once boolean DEFAULT false)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_fenced  integer;
    v_repeat  integer;
    v_n       integer := coalesce(cardinality(p_partitions), 0);
BEGIN
    IF NOT EXISTS (SELECT 1 FROM ff_completion_group WHERE group_name = p_group) THEN
        RAISE EXCEPTION USING ERRCODE = 'FFG02', MESSAGE = format('unknown durable group %L', p_group);
    END IF;
    IF v_n <> coalesce(cardinality(p_tokens), 0) OR v_n <> coalesce(cardinality(p_majors), 0)
       OR v_n <> coalesce(cardinality(p_his), 0) OR v_n <> coalesce(cardinality(p_los), 0) THEN
        RAISE EXCEPTION USING ERRCODE = 'FFG03', MESSAGE = 'ack arrays of different lengths';
    END IF;
    PERFORM 1 FROM ff_completion_group_partition
      WHERE group_name = p_group AND partition = ANY (p_partitions) ORDER BY partition FOR UPDATE;
    SELECT a.partition INTO v_fenced
      FROM unnest(p_partitions, p_tokens) AS a(partition, token)
      LEFT JOIN ff_completion_group_partition p ON p.group_name = p_group AND p.partition = a.partition
     WHERE p.owner IS DISTINCT FROM p_member OR p.token IS DISTINCT FROM a.token
     ORDER BY a.partition LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FFG01', DETAIL = v_fenced::text,
            MESSAGE = format('member %L of group %L no longer holds partition %s', p_member, p_group, v_fenced);
    END IF;
    IF p_once THEN
        SELECT a.partition INTO v_repeat
          FROM unnest(p_partitions, p_majors, p_his, p_los) AS a(partition, major, hi, lo)
          JOIN ff_completion_group_partition p ON p.group_name = p_group AND p.partition = a.partition
         WHERE (a.major, a.hi, a.lo) <= (p.acked_major, p.acked_hi, p.acked_lo)
         ORDER BY a.partition LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION USING ERRCODE = 'FFG04', DETAIL = v_repeat::text,
                MESSAGE = format('group %L has acknowledged partition %s at or past this position', p_group, v_repeat);
        END IF;
    END IF;
    UPDATE ff_completion_group_partition p
       SET acked_major = a.major, acked_hi = a.hi, acked_lo = a.lo
      FROM (SELECT DISTINCT ON (u.partition) u.partition, u.major, u.hi, u.lo
              FROM unnest(p_partitions, p_majors, p_his, p_los) AS u(partition, major, hi, lo)
             ORDER BY u.partition, u.major DESC, u.hi DESC, u.lo DESC) a
     WHERE p.group_name = p_group AND p.partition = a.partition
       AND (a.major, a.hi, a.lo) > (p.acked_major, p.acked_hi, p.acked_lo);
END
$$;

-- Removes p_member from p_group and frees its partitions (tokens unchanged: the next holder
-- raises them). An unknown group or member changes nothing.
CREATE OR REPLACE FUNCTION ff_completion_group_leave(p_group text, p_member text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM ff_completion_group WHERE group_name = p_group FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    DELETE FROM ff_completion_group_member WHERE group_name = p_group AND member = p_member;
    UPDATE ff_completion_group_partition SET owner = NULL, expires_at = NULL
     WHERE group_name = p_group AND owner = p_member;
END
$$;
