-- Set-based dependency resolution: ff_resolve_children resolves every pending edge out of the
-- given parents with one statement (the edges, then each child's count of satisfied parents)
-- instead of one ff_resolve_dependency call per edge. Only children skipped because a parent
-- did not succeed go one at a time, through ff_finish_execution, which writes their completion.
--
-- The parents drive every lookup through unnest(), which the planner sizes small: with
-- `= ANY ($1)` the function's cached generic plan hashed the whole execution table per call.
--
-- Results are the same as resolving the edges one by one in (child_id, parent_id) order: of a
-- child's edges resolved in one call, the last one is 'promoted' when the child becomes eligible,
-- the others 'waiting'.
CREATE OR REPLACE FUNCTION ff_resolve_children(p_parents uuid[])
RETURNS TABLE (parent_id uuid, parent_partition smallint, child_id uuid, child_partition smallint,
               resolution text)
LANGUAGE plpgsql AS $$
DECLARE
    parents uuid[];
    parent_parts smallint[];
    children uuid[];
    child_parts smallint[];
    resolutions text[];
BEGIN
    -- Children are locked in child_id order, so concurrent callers cannot deadlock on each
    -- other's children, and the statement below sees their latest committed state.
    PERFORM 1 FROM unnest(p_parents) u (p)
      JOIN ff_dependency d ON d.parent_id = u.p
      JOIN ff_execution x ON x.execution_id = d.child_id
      ORDER BY x.execution_id
      FOR UPDATE OF x;

    WITH edge AS (
        SELECT d.parent_id AS p, pe.partition_key AS p_part, pe.state AS p_state,
               d.child_id AS c, ce.partition_key AS c_part, ce.state AS c_state, d.state AS d_state
          FROM unnest(p_parents) u (p)
          JOIN ff_dependency d ON d.parent_id = u.p
          JOIN ff_execution pe ON pe.execution_id = d.parent_id
          JOIN ff_execution ce ON ce.execution_id = d.child_id
    ), resolved AS (
        UPDATE ff_dependency d
           SET state = CASE WHEN e.p_state = 'success' THEN 'satisfied' ELSE 'failed' END
          FROM edge e
         WHERE d.parent_id = e.p AND d.child_id = e.c AND d.state = 'pending'
           AND e.p_state IN ('success', 'failed', 'cancelled', 'expired', 'skipped')
        RETURNING d.parent_id AS p, d.child_id AS c, d.state AS d_state
    ), satisfied AS (
        SELECT r.c, count(*)::integer AS n, (array_agg(r.p ORDER BY r.p DESC))[1] AS last_parent
          FROM resolved r WHERE r.d_state = 'satisfied' GROUP BY r.c
    ), counted AS (
        UPDATE ff_execution x
           SET pending_parents = x.pending_parents - s.n,
               state = CASE WHEN x.pending_parents - s.n = 0 AND x.state = 'blocked' THEN 'eligible' ELSE x.state END,
               updated_at_ms = ff_now_ms()
          FROM satisfied s
         WHERE x.execution_id = s.c
        RETURNING x.execution_id AS c, x.pending_parents AS pending_left, s.last_parent
    )
    SELECT array_agg(e.p ORDER BY e.c, e.p), array_agg(e.p_part ORDER BY e.c, e.p),
           array_agg(e.c ORDER BY e.c, e.p), array_agg(e.c_part ORDER BY e.c, e.p),
           array_agg(CASE
                         WHEN e.p_state NOT IN ('success', 'failed', 'cancelled', 'expired', 'skipped')
                             THEN 'parent_not_terminal'
                         WHEN r.p IS NULL THEN 'already_resolved'
                         WHEN r.d_state = 'failed' THEN 'failed'
                         WHEN k.pending_left = 0 AND e.c_state = 'blocked' AND k.last_parent = e.p THEN 'promoted'
                         ELSE 'waiting'
                     END ORDER BY e.c, e.p)
      INTO parents, parent_parts, children, child_parts, resolutions
      FROM edge e
      LEFT JOIN resolved r ON r.p = e.p AND r.c = e.c
      LEFT JOIN counted k ON k.c = e.c;

    FOR i IN 1 .. coalesce(cardinality(parents), 0) LOOP
        parent_id := parents[i];
        parent_partition := parent_parts[i];
        child_id := children[i];
        child_partition := child_parts[i];
        resolution := resolutions[i];
        IF resolution = 'failed' THEN
            -- A parent that did not succeed skips the child; skipping writes its completion.
            resolution := CASE WHEN ff_finish_execution(child_id, 'skipped', ARRAY['blocked', 'eligible'])
                               THEN 'skipped' ELSE 'already_resolved' END;
        END IF;
        RETURN NEXT;
    END LOOP;
END
$$;
