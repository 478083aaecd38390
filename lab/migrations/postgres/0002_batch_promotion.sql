-- Batched dependency resolution for the demo engine: resolves every pending edge out of the
-- given (terminal) parents in one call, so a promoter resolves a whole delivered batch of
-- completions in one round trip and one transaction.

-- One row per edge out of p_parents: the edge with both partitions, and what resolving it
-- did (as ff_resolve_dependency says). Children are locked in child_id order, so concurrent
-- callers cannot deadlock on each other's children.
CREATE OR REPLACE FUNCTION ff_resolve_children(p_parents uuid[])
RETURNS TABLE (parent_id uuid, parent_partition smallint, child_id uuid, child_partition smallint,
               resolution text)
LANGUAGE plpgsql AS $$
DECLARE
    edge record;
BEGIN
    FOR edge IN
        SELECT d.parent_id AS p, pe.partition_key AS p_part, d.child_id AS c, ce.partition_key AS c_part
          FROM ff_dependency d
          JOIN ff_execution pe ON pe.execution_id = d.parent_id
          JOIN ff_execution ce ON ce.execution_id = d.child_id
         WHERE d.parent_id = ANY (p_parents)
         ORDER BY d.child_id, d.parent_id
    LOOP
        parent_id := edge.p;
        parent_partition := edge.p_part;
        child_id := edge.c;
        child_partition := edge.c_part;
        resolution := ff_resolve_dependency(edge.p, edge.c);
        RETURN NEXT;
    END LOOP;
END
$$;
