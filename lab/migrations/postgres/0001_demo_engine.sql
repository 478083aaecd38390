-- The demo engine for Postgres: flows, executions, dependency edges and their operations. Every
-- terminal transition writes its completion into the outbox (migrations/postgres/) in the same
-- transaction as the state change. Applied only by `PostgresEngine::connect` (examples, tests,
-- benches), with its own ledger `ff_completions_demo_migrations`: a database that only consumes
-- completions never gets these tables.

-- Flows: a DAG of executions under one namespace.
CREATE TABLE IF NOT EXISTS ff_flow (
    flow_id        uuid PRIMARY KEY,
    namespace      text,
    state          text NOT NULL DEFAULT 'open',
    created_at_ms  bigint NOT NULL
);

-- Executions: the unit of work; state is blocked | eligible | running | success | failed |
-- cancelled | expired | skipped.
CREATE TABLE IF NOT EXISTS ff_execution (
    execution_id    uuid PRIMARY KEY,
    partition_key   smallint NOT NULL,
    flow_id         uuid REFERENCES ff_flow (flow_id),
    namespace       text,
    tags            jsonb NOT NULL DEFAULT '{}'::jsonb,
    state           text NOT NULL,
    attempt         integer NOT NULL DEFAULT 0,
    max_attempts    integer NOT NULL DEFAULT 1,
    pending_parents integer NOT NULL DEFAULT 0,
    worker          text,
    created_at_ms   bigint NOT NULL,
    updated_at_ms   bigint NOT NULL
);

-- Claim scan: eligible executions, oldest first.
CREATE INDEX IF NOT EXISTS ff_execution_eligible_idx ON ff_execution (created_at_ms) WHERE state = 'eligible';
-- Flow cancellation scan.
CREATE INDEX IF NOT EXISTS ff_execution_flow_idx ON ff_execution (flow_id);

-- Dependency edges: state is pending | satisfied | failed.
CREATE TABLE IF NOT EXISTS ff_dependency (
    parent_id  uuid NOT NULL REFERENCES ff_execution (execution_id),
    child_id   uuid NOT NULL REFERENCES ff_execution (execution_id),
    state      text NOT NULL DEFAULT 'pending',
    PRIMARY KEY (parent_id, child_id)
);

-- Reverse lookup of a child's parents.
CREATE INDEX IF NOT EXISTS ff_dependency_child_idx ON ff_dependency (child_id);

-- Milliseconds since the epoch, from the transaction clock.
CREATE OR REPLACE FUNCTION ff_now_ms() RETURNS bigint
LANGUAGE sql STABLE AS $$ SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint $$;

-- Moves an execution to a terminal state and writes its completion, in the caller's transaction.
-- Returns false when the execution was already terminal.
CREATE OR REPLACE FUNCTION ff_finish_execution(p_execution_id uuid, p_outcome text, p_from text[])
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    e ff_execution;
    now_ms bigint := ff_now_ms();
BEGIN
    UPDATE ff_execution SET state = p_outcome, updated_at_ms = now_ms, worker = NULL
     WHERE execution_id = p_execution_id AND state = ANY (p_from)
    RETURNING * INTO e;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    INSERT INTO ff_completion_event
        (execution_id, flow_id, outcome, namespace, instance_tag, occurred_at_ms, partition_key, tags)
    VALUES
        (e.execution_id, e.flow_id, p_outcome, e.namespace,
         (SELECT key || '=' || value FROM jsonb_each_text(e.tags) ORDER BY key LIMIT 1),
         now_ms, e.partition_key, e.tags);
    RETURN true;
END
$$;

-- Creates a flow (idempotent).
CREATE OR REPLACE FUNCTION ff_create_flow(p_flow_id uuid, p_namespace text) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO ff_flow (flow_id, namespace, created_at_ms) VALUES (p_flow_id, p_namespace, ff_now_ms())
    ON CONFLICT (flow_id) DO NOTHING
$$;

-- Creates an execution, blocked on its parents or eligible when it has none.
CREATE OR REPLACE FUNCTION ff_create_execution(
    p_execution_id uuid, p_partition smallint, p_flow_id uuid, p_namespace text, p_tags jsonb,
    p_parents uuid[], p_max_attempts integer) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    n integer := coalesce(cardinality(p_parents), 0);
    initial text := CASE WHEN n = 0 THEN 'eligible' ELSE 'blocked' END;
BEGIN
    IF p_partition < 0 OR p_partition > 255 THEN
        RAISE EXCEPTION 'partition % out of range', p_partition USING ERRCODE = '22023';
    END IF;
    IF p_max_attempts < 1 THEN
        RAISE EXCEPTION 'max_attempts must be at least 1' USING ERRCODE = '22023';
    END IF;
    INSERT INTO ff_execution (execution_id, partition_key, flow_id, namespace, tags, state, max_attempts,
                              pending_parents, created_at_ms, updated_at_ms)
    VALUES (p_execution_id, p_partition, p_flow_id, p_namespace, coalesce(p_tags, '{}'::jsonb), initial,
            p_max_attempts, n, ff_now_ms(), ff_now_ms());
    INSERT INTO ff_dependency (parent_id, child_id)
    SELECT DISTINCT unnest(p_parents), p_execution_id;
    RETURN initial;
END
$$;

-- Claims up to p_limit eligible executions for a worker; skips rows other workers hold.
CREATE OR REPLACE FUNCTION ff_claim_executions(p_worker text, p_limit integer)
RETURNS TABLE (execution_id uuid, partition_key smallint)
LANGUAGE sql AS $$
    UPDATE ff_execution x
       SET state = 'running', worker = p_worker, attempt = x.attempt + 1, updated_at_ms = ff_now_ms()
     WHERE x.execution_id IN (
           SELECT e.execution_id FROM ff_execution e
            WHERE e.state = 'eligible'
            ORDER BY e.created_at_ms
            LIMIT p_limit
              FOR UPDATE SKIP LOCKED)
    RETURNING x.execution_id, x.partition_key
$$;

-- Completes a running execution with success.
CREATE OR REPLACE FUNCTION ff_complete_execution(p_execution_id uuid) RETURNS boolean
LANGUAGE sql AS $$ SELECT ff_finish_execution(p_execution_id, 'success', ARRAY['running']) $$;

-- Fails a running execution: back to eligible while attempts remain and the failure is
-- retryable ('retry_scheduled'), terminal 'failed' otherwise ('terminal_failed').
CREATE OR REPLACE FUNCTION ff_fail_execution(p_execution_id uuid, p_retryable boolean) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    e ff_execution;
BEGIN
    SELECT * INTO e FROM ff_execution WHERE execution_id = p_execution_id FOR UPDATE;
    IF NOT FOUND OR e.state <> 'running' THEN
        RETURN 'not_running';
    END IF;
    IF p_retryable AND e.attempt < e.max_attempts THEN
        UPDATE ff_execution SET state = 'eligible', worker = NULL, updated_at_ms = ff_now_ms()
         WHERE execution_id = p_execution_id;
        RETURN 'retry_scheduled';
    END IF;
    PERFORM ff_finish_execution(p_execution_id, 'failed', ARRAY['running']);
    RETURN 'terminal_failed';
END
$$;

-- Cancels a non-terminal execution.
CREATE OR REPLACE FUNCTION ff_cancel_execution(p_execution_id uuid) RETURNS boolean
LANGUAGE sql AS $$
    SELECT ff_finish_execution(p_execution_id, 'cancelled', ARRAY['blocked', 'eligible', 'running'])
$$;

-- Expires a non-terminal execution whose deadline passed.
CREATE OR REPLACE FUNCTION ff_expire_execution(p_execution_id uuid) RETURNS boolean
LANGUAGE sql AS $$
    SELECT ff_finish_execution(p_execution_id, 'expired', ARRAY['blocked', 'eligible', 'running'])
$$;

-- Cancels a flow: p_policy is flow_only | cancel_all | cancel_pending. Returns members cancelled.
CREATE OR REPLACE FUNCTION ff_cancel_flow(p_flow_id uuid, p_policy text) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    states text[];
    n integer := 0;
    r record;
BEGIN
    states := CASE p_policy
        WHEN 'flow_only' THEN ARRAY[]::text[]
        WHEN 'cancel_all' THEN ARRAY['blocked', 'eligible', 'running']
        WHEN 'cancel_pending' THEN ARRAY['blocked', 'eligible']
    END;
    IF states IS NULL THEN
        RAISE EXCEPTION 'unknown cancel policy %', p_policy USING ERRCODE = '22023';
    END IF;
    UPDATE ff_flow SET state = 'cancelled' WHERE flow_id = p_flow_id;
    FOR r IN SELECT execution_id FROM ff_execution
              WHERE flow_id = p_flow_id AND state = ANY (states)
              ORDER BY created_at_ms, execution_id FOR UPDATE LOOP
        IF ff_finish_execution(r.execution_id, 'cancelled', states) THEN
            n := n + 1;
        END IF;
    END LOOP;
    RETURN n;
END
$$;

-- Resolves the edge parent -> child once the parent is terminal: promotes the child when all its
-- parents succeeded, skips it (a completion) when one did not. Returns promoted | skipped |
-- waiting | already_resolved | parent_not_terminal.
CREATE OR REPLACE FUNCTION ff_resolve_dependency(p_parent uuid, p_child uuid) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    parent_state text;
    child ff_execution;
BEGIN
    SELECT state INTO parent_state FROM ff_execution WHERE execution_id = p_parent;
    IF parent_state IS NULL OR parent_state NOT IN ('success', 'failed', 'cancelled', 'expired', 'skipped') THEN
        RETURN 'parent_not_terminal';
    END IF;
    SELECT * INTO child FROM ff_execution WHERE execution_id = p_child FOR UPDATE;
    UPDATE ff_dependency SET state = CASE WHEN parent_state = 'success' THEN 'satisfied' ELSE 'failed' END
     WHERE parent_id = p_parent AND child_id = p_child AND state = 'pending';
    IF NOT FOUND THEN
        RETURN 'already_resolved';
    END IF;
    IF parent_state <> 'success' THEN
        IF ff_finish_execution(p_child, 'skipped', ARRAY['blocked', 'eligible']) THEN
            RETURN 'skipped';
        END IF;
        RETURN 'already_resolved';
    END IF;
    UPDATE ff_execution SET pending_parents = pending_parents - 1, updated_at_ms = ff_now_ms()
     WHERE execution_id = p_child
    RETURNING * INTO child;
    IF child.pending_parents = 0 AND child.state = 'blocked' THEN
        UPDATE ff_execution SET state = 'eligible', updated_at_ms = ff_now_ms() WHERE execution_id = p_child;
        RETURN 'promoted';
    END IF;
    RETURN 'waiting';
END
$$;

-- Edges whose parent is terminal but which were never resolved: the reconciler's work list.
CREATE OR REPLACE FUNCTION ff_unresolved_dependencies(p_limit integer)
RETURNS TABLE (parent_id uuid, parent_partition smallint, child_id uuid, child_partition smallint)
LANGUAGE sql STABLE AS $$
    SELECT d.parent_id, p.partition_key, d.child_id, c.partition_key
      FROM ff_dependency d
      JOIN ff_execution p ON p.execution_id = d.parent_id
      JOIN ff_execution c ON c.execution_id = d.child_id
     WHERE d.state = 'pending'
       AND p.state IN ('success', 'failed', 'cancelled', 'expired', 'skipped')
     LIMIT p_limit
$$;
