-- The rows of a transaction the previous tick saw in progress are read through the
-- (txid, event_id) index alone. With the event_id bound written on its own, the planner could
-- answer `txid = x AND event_id > y` with a walk of the primary key filtered on txid: when the
-- outbox's statistics say one transaction wrote nearly every row, `txid = x` looks so rare that
-- every plan seems cheap, and the walk read the whole outbox once per transaction in progress
-- anywhere in the cluster. A row comparison on (txid, event_id) is a bound only that index takes.
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
                                   WHERE e.txid = x.txid
                                     AND (e.txid, e.event_id) > (x.txid, CASE WHEN x.txid = p_txid::text::xid8
                                                                              THEN p_event_id ELSE -1 END)
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
