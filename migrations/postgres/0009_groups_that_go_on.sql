-- ff-completions for Postgres, part 9: durable groups that never stall, die or repeat (the rules
-- are in src/backends/groups.rs). It replaces the group functions of part 6:
--
-- - A member process is an incarnation of its member id: the member row and each partition it
--   holds name the incarnation. A newer one claims the id (its first heartbeat) and raises the
--   token of every partition it then holds; the earlier one's heartbeats are refused (FFG05) and
--   its leave frees only what it still holds itself.
-- - A partition's lease lives by its holder's member row: it is held while the member row of
--   its owner under its owner_incarnation has not expired, and lapsed otherwise. A heartbeat
--   renews that one row; it writes (and locks) a partition row only when one of its values
--   changes (a newer incarnation's or a rejoin's token, the unacknowledged count), so that a
--   heartbeat of a member holding every partition leaves no dead row versions behind, which an
--   open transaction elsewhere would keep from being pruned. The partitions' expires_at column
--   (part 6) is no longer read: taking or freeing a partition clears it.
-- - A heartbeat never waits for a partition row another transaction holds (an ack inside an
--   engine's open transaction): it skips it (SKIP LOCKED) and takes it up at a later heartbeat.
--   The only lock it waits for is the group row, which heartbeats, leaves and moves hold for
--   the length of one short statement; its clock is read after that wait. Its waits are bounded
--   by a lock_timeout of a third of the lease (50 ms to 10 s); the other functions wait 2 s at
--   most. A timeout is an error the caller retries.
-- - A consumer can refuse an event (nack): attempts are counted on the partition, and the event
--   is parked in ff_completion_group_parked once they reach the group's limit, the partition's
--   position moving past it. Parked events are listed, replayed (handed out again by the
--   partition's holder; their ack or ticket removes them) or discarded.
-- - Operators move positions (ff_completion_group_move), never while a member holds them unless
--   forced; a move raises the partition's token.
-- - Each heartbeat records how many events the member delivered and has not acknowledged, per
--   partition it holds (for ff_completion_group_view and the operators' report).

ALTER TABLE ff_completion_group_member ADD COLUMN IF NOT EXISTS incarnation text;

ALTER TABLE ff_completion_group_partition
    ADD COLUMN IF NOT EXISTS owner_incarnation text,
    ADD COLUMN IF NOT EXISTS unacked integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS retry_major bigint,
    ADD COLUMN IF NOT EXISTS retry_hi bigint,
    ADD COLUMN IF NOT EXISTS retry_lo bigint,
    ADD COLUMN IF NOT EXISTS attempts integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS last_reason text;

-- Events a group's consumers refused as often as the group allows, by partition and position:
-- the event as it was delivered (JSON), the last reason, the attempts, and whether an operator
-- asked for it to be handed out again.
CREATE TABLE IF NOT EXISTS ff_completion_group_parked (
    group_name  text NOT NULL REFERENCES ff_completion_group (group_name) ON DELETE CASCADE,
    partition   smallint NOT NULL,
    major       bigint NOT NULL,
    hi          bigint NOT NULL,
    lo          bigint NOT NULL,
    event       text NOT NULL,
    reason      text NOT NULL,
    attempts    integer NOT NULL,
    parked_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    replay      boolean NOT NULL DEFAULT false,
    PRIMARY KEY (group_name, partition, major, hi, lo)
);

DROP FUNCTION IF EXISTS ff_completion_group_heartbeat(text, text, bigint, boolean, boolean, bigint, bigint, bigint);
DROP FUNCTION IF EXISTS ff_completion_group_leave(text, text);

-- Joins or renews incarnation p_incarnation of p_member in p_group and rebalances (see the
-- header). Raises FFG05 when another live incarnation holds the member id and this is not the
-- incarnation's first heartbeat (p_rejoin). Its member row is renewed to now + ttl, and with
-- it the leases of every partition it holds. Of its own partitions that no other transaction
-- holds, those it holds under another incarnation, or all of them on p_rejoin, get token + 1
-- (their unacknowledged counts cleared); the others' unacknowledged counts are recorded from
-- p_unacked_* where they changed. Above its share it frees its highest partitions, below it
-- takes free and lapsed ones (token + 1), each only if no other transaction holds its row.
-- Returns what this incarnation holds, ascending, with the parked events of each and how many
-- of them are to be replayed.
CREATE FUNCTION ff_completion_group_heartbeat(
    p_group text, p_member text, p_incarnation text, p_ttl_ms bigint, p_exclusive boolean, p_rejoin boolean,
    p_start_major bigint, p_start_hi bigint, p_start_lo bigint,
    p_unacked_partitions integer[] DEFAULT '{}', p_unacked_counts integer[] DEFAULT '{}')
RETURNS TABLE (o_partition smallint, o_token bigint, o_acked_major bigint, o_acked_hi bigint, o_acked_lo bigint,
               o_parked integer, o_replays integer)
LANGUAGE plpgsql AS $$
DECLARE
    v_now    timestamptz;
    v_until  timestamptz;
    v_share  integer;
    v_held   integer;
    v_live   text;
BEGIN
    -- Local to the heartbeat's own transaction (it runs alone, in autocommit).
    PERFORM set_config('lock_timeout', greatest(50, least(p_ttl_ms / 3, 10000))::text || 'ms', true);
    INSERT INTO ff_completion_group (group_name) VALUES (p_group) ON CONFLICT (group_name) DO NOTHING;
    IF FOUND THEN
        INSERT INTO ff_completion_group_partition (group_name, partition, acked_major, acked_hi, acked_lo)
        SELECT p_group, p::smallint, p_start_major, p_start_hi, p_start_lo FROM generate_series(0, 255) AS p;
    END IF;
    PERFORM 1 FROM ff_completion_group WHERE group_name = p_group FOR NO KEY UPDATE;
    v_now := clock_timestamp();
    v_until := v_now + make_interval(secs => p_ttl_ms / 1000.0);

    DELETE FROM ff_completion_group_member WHERE group_name = p_group AND expires_at <= v_now;
    SELECT m.incarnation INTO v_live FROM ff_completion_group_member m
     WHERE m.group_name = p_group AND m.member = p_member;
    IF FOUND AND NOT p_rejoin AND v_live IS DISTINCT FROM p_incarnation THEN
        RAISE EXCEPTION USING ERRCODE = 'FFG05',
            MESSAGE = format('member %L of group %L is now another process''s', p_member, p_group);
    END IF;
    INSERT INTO ff_completion_group_member (group_name, member, incarnation, expires_at)
    VALUES (p_group, p_member, p_incarnation, v_until)
        ON CONFLICT (group_name, member) DO UPDATE SET expires_at = excluded.expires_at,
                                                      incarnation = excluded.incarnation;

    -- Its own partitions whose row changes (chosen before they are locked): a newer
    -- incarnation's or a rejoin's token, or an unacknowledged count that moved. The others are
    -- neither locked nor written: their leases live by the member row just renewed.
    WITH mine AS MATERIALIZED (
        SELECT p.partition, coalesce(u.count, 0) AS unacked
          FROM ff_completion_group_partition p
          LEFT JOIN unnest(p_unacked_partitions, p_unacked_counts) AS u(partition, count)
                 ON u.partition = p.partition
         WHERE p.group_name = p_group AND p.owner = p_member
           AND (p_rejoin OR p.owner_incarnation IS DISTINCT FROM p_incarnation
                OR p.unacked IS DISTINCT FROM coalesce(u.count, 0))
         ORDER BY p.partition FOR UPDATE OF p SKIP LOCKED)
    UPDATE ff_completion_group_partition p
       SET token = p.token + CASE WHEN p_rejoin OR p.owner_incarnation IS DISTINCT FROM p_incarnation
                                  THEN 1 ELSE 0 END,
           unacked = CASE WHEN p_rejoin OR p.owner_incarnation IS DISTINCT FROM p_incarnation THEN 0
                          ELSE mine.unacked END,
           owner_incarnation = p_incarnation
      FROM mine
     WHERE p.group_name = p_group AND p.partition = mine.partition;
    SELECT count(*) INTO v_held FROM ff_completion_group_partition WHERE group_name = p_group AND owner = p_member;

    IF p_exclusive THEN
        v_share := 256;
    ELSE
        SELECT ceil(256.0 / count(*))::integer INTO v_share
          FROM ff_completion_group_member WHERE group_name = p_group AND expires_at > v_now;
    END IF;

    -- Chosen once, in materialized CTEs: as an IN (subquery with LIMIT ... SKIP LOCKED), a plan
    -- may run the subquery again per row and take more than the share.
    IF v_held > v_share THEN
        WITH freed AS MATERIALIZED (
            SELECT partition FROM ff_completion_group_partition
             WHERE group_name = p_group AND owner = p_member
             ORDER BY partition DESC LIMIT v_held - v_share FOR UPDATE SKIP LOCKED)
        UPDATE ff_completion_group_partition p
           SET owner = NULL, expires_at = NULL, owner_incarnation = NULL, unacked = 0
          FROM freed WHERE p.group_name = p_group AND p.partition = freed.partition;
    ELSIF v_held < v_share THEN
        -- Free partitions, and those whose holder's member row lapsed (or is another
        -- incarnation's): the partition row's own expires_at is not read.
        WITH taken AS MATERIALIZED (
            SELECT c.partition FROM ff_completion_group_partition c
             WHERE c.group_name = p_group
               AND (c.owner IS NULL
                    OR (c.owner <> p_member AND NOT EXISTS (
                        SELECT 1 FROM ff_completion_group_member m
                         WHERE m.group_name = p_group AND m.member = c.owner
                           AND m.incarnation IS NOT DISTINCT FROM c.owner_incarnation AND m.expires_at > v_now)))
             ORDER BY c.partition LIMIT v_share - v_held FOR UPDATE OF c SKIP LOCKED)
        UPDATE ff_completion_group_partition p
           SET owner = p_member, owner_incarnation = p_incarnation, expires_at = NULL, token = p.token + 1,
               unacked = 0
          FROM taken WHERE p.group_name = p_group AND p.partition = taken.partition;
    END IF;

    RETURN QUERY
        SELECT p.partition, p.token, p.acked_major, p.acked_hi, p.acked_lo,
               coalesce(k.parked, 0)::integer, coalesce(k.replays, 0)::integer
          FROM ff_completion_group_partition p
          LEFT JOIN (SELECT x.partition, count(*) AS parked, count(*) FILTER (WHERE x.replay) AS replays
                       FROM ff_completion_group_parked x WHERE x.group_name = p_group
                      GROUP BY x.partition) k ON k.partition = p.partition
         WHERE p.group_name = p_group AND p.owner = p_member AND p.owner_incarnation = p_incarnation
         ORDER BY p.partition;
END
$$;

-- Acknowledges positions (part 6), its waits bounded.
ALTER FUNCTION ff_completion_group_ack(text, text, integer[], bigint[], bigint[], bigint[], bigint[], boolean)
    SET lock_timeout = '2s';

-- Removes incarnation p_incarnation of p_member from p_group (a newer incarnation's membership
-- stays) and frees the partitions it holds (tokens unchanged; a partition an open transaction
-- holds stays its own, lapsed with its member row, until a heartbeat takes it over). An unknown
-- group or member changes nothing.
CREATE FUNCTION ff_completion_group_leave(p_group text, p_member text, p_incarnation text) RETURNS void
LANGUAGE plpgsql SET lock_timeout = '2s' AS $$
BEGIN
    PERFORM 1 FROM ff_completion_group WHERE group_name = p_group FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    DELETE FROM ff_completion_group_member
     WHERE group_name = p_group AND member = p_member AND incarnation IS NOT DISTINCT FROM p_incarnation;
    WITH mine AS MATERIALIZED (
        SELECT partition FROM ff_completion_group_partition
         WHERE group_name = p_group AND owner = p_member AND owner_incarnation IS NOT DISTINCT FROM p_incarnation
         FOR UPDATE SKIP LOCKED)
    UPDATE ff_completion_group_partition p
       SET owner = NULL, expires_at = NULL, owner_incarnation = NULL, unacked = 0
      FROM mine WHERE p.group_name = p_group AND p.partition = mine.partition;
END
$$;

-- A consumer refuses the event at (p_major, p_hi, p_lo) of p_partition, delivered under
-- p_token, for p_reason. Raises FFG02 for an unknown group, FFG01 (DETAIL: the partition) when
-- the member does not hold the partition with that token. A replayed parked event
-- (p_replayed) counts one more attempt and stays parked, no longer to be replayed. Otherwise
-- attempts on one position are counted on the partition; the event is parked once they reach
-- p_park_after, the partition's position moving past it. Returns the attempts and whether the
-- event is parked now.
CREATE FUNCTION ff_completion_group_nack(
    p_group text, p_member text, p_partition integer, p_token bigint, p_major bigint, p_hi bigint, p_lo bigint,
    p_reason text, p_park_after integer, p_event text, p_replayed boolean,
    OUT o_attempts integer, OUT o_parked boolean)
LANGUAGE plpgsql SET lock_timeout = '2s' AS $$
DECLARE
    r ff_completion_group_partition;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM ff_completion_group WHERE group_name = p_group) THEN
        RAISE EXCEPTION USING ERRCODE = 'FFG02', MESSAGE = format('unknown durable group %L', p_group);
    END IF;
    SELECT * INTO r FROM ff_completion_group_partition
     WHERE group_name = p_group AND partition = p_partition FOR UPDATE;
    IF NOT FOUND OR r.owner IS DISTINCT FROM p_member OR r.token IS DISTINCT FROM p_token THEN
        RAISE EXCEPTION USING ERRCODE = 'FFG01', DETAIL = p_partition::text,
            MESSAGE = format('member %L of group %L no longer holds partition %s', p_member, p_group, p_partition);
    END IF;
    IF p_replayed THEN
        UPDATE ff_completion_group_parked SET attempts = attempts + 1, reason = p_reason, replay = false
         WHERE group_name = p_group AND partition = p_partition AND (major, hi, lo) = (p_major, p_hi, p_lo)
        RETURNING attempts INTO o_attempts;
        o_attempts := coalesce(o_attempts, 0);
        o_parked := true;
        RETURN;
    END IF;
    o_attempts := CASE WHEN (r.retry_major, r.retry_hi, r.retry_lo) = (p_major, p_hi, p_lo) THEN r.attempts + 1
                       ELSE 1 END;
    o_parked := o_attempts >= p_park_after;
    IF o_parked THEN
        INSERT INTO ff_completion_group_parked (group_name, partition, major, hi, lo, event, reason, attempts)
        VALUES (p_group, p_partition, p_major, p_hi, p_lo, p_event, p_reason, o_attempts)
            ON CONFLICT (group_name, partition, major, hi, lo)
            DO UPDATE SET attempts = excluded.attempts, reason = excluded.reason, replay = false;
        UPDATE ff_completion_group_partition
           SET acked_major = p_major, acked_hi = p_hi, acked_lo = p_lo
         WHERE group_name = p_group AND partition = p_partition
           AND (p_major, p_hi, p_lo) > (acked_major, acked_hi, acked_lo);
        UPDATE ff_completion_group_partition
           SET retry_major = NULL, retry_hi = NULL, retry_lo = NULL, attempts = 0, last_reason = p_reason
         WHERE group_name = p_group AND partition = p_partition;
    ELSE
        UPDATE ff_completion_group_partition
           SET retry_major = p_major, retry_hi = p_hi, retry_lo = p_lo, attempts = o_attempts,
               last_reason = p_reason
         WHERE group_name = p_group AND partition = p_partition;
    END IF;
END
$$;

-- Acknowledges replayed parked events for p_member, all or nothing, on the caller's connection
-- (inside its transaction when it has one): each partition must be held with the given token
-- (else FFG01, DETAIL the partition), and each acknowledged event is removed from the parked
-- ones. With p_once (a ticket beside the event's effect) an event no longer parked raises FFG04
-- (DETAIL the partition): its effect committed before.
CREATE FUNCTION ff_completion_group_settle(
    p_group text, p_member text, p_partitions integer[], p_tokens bigint[],
    p_majors bigint[], p_his bigint[], p_los bigint[], p_once boolean)
RETURNS void
LANGUAGE plpgsql SET lock_timeout = '2s' AS $$
DECLARE
    v_fenced  integer;
    v_gone    integer;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM ff_completion_group WHERE group_name = p_group) THEN
        RAISE EXCEPTION USING ERRCODE = 'FFG02', MESSAGE = format('unknown durable group %L', p_group);
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
        SELECT a.partition INTO v_gone
          FROM unnest(p_partitions, p_majors, p_his, p_los) AS a(partition, major, hi, lo)
         WHERE NOT EXISTS (SELECT 1 FROM ff_completion_group_parked x
                            WHERE x.group_name = p_group AND x.partition = a.partition
                              AND (x.major, x.hi, x.lo) = (a.major, a.hi, a.lo))
         ORDER BY a.partition LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION USING ERRCODE = 'FFG04', DETAIL = v_gone::text,
                MESSAGE = format('group %L has no such parked event of partition %s any more', p_group, v_gone);
        END IF;
    END IF;
    DELETE FROM ff_completion_group_parked x
     USING unnest(p_partitions, p_majors, p_his, p_los) AS a(partition, major, hi, lo)
     WHERE x.group_name = p_group AND x.partition = a.partition AND (x.major, x.hi, x.lo) = (a.major, a.hi, a.lo);
END
$$;

-- Sets the positions of p_partitions to (p_majors, p_his, p_los) (up or down), each with token
-- + 1 and its attempts cleared. Raises FFG02 for an unknown group, and unless p_force FFG06
-- (DETAIL the partition) when a member holds one of them with an unexpired lease (its member
-- row).
CREATE FUNCTION ff_completion_group_move(
    p_group text, p_partitions integer[], p_majors bigint[], p_his bigint[], p_los bigint[], p_force boolean)
RETURNS integer
LANGUAGE plpgsql SET lock_timeout = '2s' AS $$
DECLARE
    v_held   record;
    v_moved  integer;
BEGIN
    PERFORM 1 FROM ff_completion_group WHERE group_name = p_group FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FFG02', MESSAGE = format('unknown durable group %L', p_group);
    END IF;
    IF NOT p_force THEN
        SELECT p.partition, p.owner INTO v_held FROM ff_completion_group_partition p
         WHERE p.group_name = p_group AND p.partition = ANY (p_partitions)
           AND EXISTS (SELECT 1 FROM ff_completion_group_member m
                        WHERE m.group_name = p_group AND m.member = p.owner
                          AND m.incarnation IS NOT DISTINCT FROM p.owner_incarnation
                          AND m.expires_at > clock_timestamp())
         ORDER BY p.partition LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION USING ERRCODE = 'FFG06', DETAIL = v_held.partition::text,
                MESSAGE = format('member %L holds partition %s of group %L', v_held.owner, v_held.partition, p_group);
        END IF;
    END IF;
    UPDATE ff_completion_group_partition p
       SET acked_major = a.major, acked_hi = a.hi, acked_lo = a.lo, token = p.token + 1,
           retry_major = NULL, retry_hi = NULL, retry_lo = NULL, attempts = 0
      FROM unnest(p_partitions, p_majors, p_his, p_los) AS a(partition, major, hi, lo)
     WHERE p.group_name = p_group AND p.partition = a.partition;
    GET DIAGNOSTICS v_moved = ROW_COUNT;
    RETURN v_moved;
END
$$;

-- Marks parked events of p_group to be replayed (p_replay) or removes them (otherwise): those
-- of p_partitions at (p_majors, p_his, p_los), or every one when p_partitions is NULL. Returns
-- how many.
CREATE FUNCTION ff_completion_group_parked_mark(
    p_group text, p_partitions integer[], p_majors bigint[], p_his bigint[], p_los bigint[], p_replay boolean)
RETURNS bigint
LANGUAGE plpgsql SET lock_timeout = '2s' AS $$
DECLARE
    v_n bigint;
BEGIN
    IF p_replay THEN
        UPDATE ff_completion_group_parked x SET replay = true
         WHERE x.group_name = p_group
           AND (p_partitions IS NULL OR (x.partition, x.major, x.hi, x.lo) IN
                (SELECT * FROM unnest(p_partitions, p_majors, p_his, p_los)));
    ELSE
        DELETE FROM ff_completion_group_parked x
         WHERE x.group_name = p_group
           AND (p_partitions IS NULL OR (x.partition, x.major, x.hi, x.lo) IN
                (SELECT * FROM unnest(p_partitions, p_majors, p_his, p_los)));
    END IF;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n;
END
$$;
