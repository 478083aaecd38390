-- Trace context across the event: the demo's terminal transitions record the W3C traceparent
-- of the producer's span with the completion, taken from the transaction's setting
-- `ff_demo.traceparent` (set with set_config(.., true) before the call; unset or empty: none).
-- A host's producer would pass it however it likes; the outbox column is the subsystem's.
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
        (execution_id, flow_id, outcome, namespace, instance_tag, occurred_at_ms, partition_key, tags, traceparent)
    VALUES
        (e.execution_id, e.flow_id, p_outcome, e.namespace,
         (SELECT key || '=' || value FROM jsonb_each_text(e.tags) ORDER BY key LIMIT 1),
         now_ms, e.partition_key, e.tags, nullif(current_setting('ff_demo.traceparent', true), ''));
    RETURN true;
END
$$;
