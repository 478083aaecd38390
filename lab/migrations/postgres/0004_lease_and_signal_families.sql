-- The demo engine's leases, waitpoints and signal deliveries, and their producers: each function
-- writes its lease-history or signal-delivery event into ff_completion_family_event
-- (migrations/postgres/0005_lease_and_signal_families.sql) in the transaction of its state change.
-- The caller wakes the listeners after commit (CommitWake), as for completions.

-- Leases: a new lease_id at each claim; lease_state is active | expired | revoked | released; a
-- heartbeat bumps lease_renewals.
ALTER TABLE ff_execution ADD COLUMN IF NOT EXISTS lease_id text;
ALTER TABLE ff_execution ADD COLUMN IF NOT EXISTS lease_state text;
ALTER TABLE ff_execution ADD COLUMN IF NOT EXISTS lease_expires_at_ms bigint;
ALTER TABLE ff_execution ADD COLUMN IF NOT EXISTS lease_renewals integer NOT NULL DEFAULT 0;
ALTER TABLE ff_execution ADD COLUMN IF NOT EXISTS lease_revoked_by text;

-- The expiry sweep's scan.
CREATE INDEX IF NOT EXISTS ff_execution_lease_expiry_idx ON ff_execution (lease_expires_at_ms)
    WHERE state = 'running' AND lease_state = 'active';

-- Waitpoints: state is open | satisfied.
CREATE TABLE IF NOT EXISTS ff_waitpoint (
    execution_id  uuid NOT NULL REFERENCES ff_execution (execution_id),
    waitpoint_id  text NOT NULL,
    state         text NOT NULL,
    PRIMARY KEY (execution_id, waitpoint_id)
);

-- Every signal delivery and its effect; a buffered one is consumed when its waitpoint opens.
CREATE TABLE IF NOT EXISTS ff_signal_delivery (
    delivery_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    execution_id     uuid NOT NULL REFERENCES ff_execution (execution_id),
    waitpoint_id     text NOT NULL,
    signal_id        text NOT NULL,
    idempotency_key  text,
    source_identity  text,
    effect           text NOT NULL,
    consumed         boolean NOT NULL DEFAULT false,
    delivered_at_ms  bigint NOT NULL
);

-- At most one delivery of a key per execution is not deduped: the database enforces it.
CREATE UNIQUE INDEX IF NOT EXISTS ff_signal_delivery_key_idx ON ff_signal_delivery (execution_id, idempotency_key)
    WHERE effect <> 'deduped';
CREATE INDEX IF NOT EXISTS ff_signal_delivery_buffered_idx ON ff_signal_delivery (execution_id, waitpoint_id)
    WHERE effect = 'buffered' AND NOT consumed;

-- One lease-history event of execution e, in the caller's transaction.
CREATE OR REPLACE FUNCTION ff_lease_event(e ff_execution, p_kind text, p_lease_id text, p_worker text,
                                          p_revoked_by text) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO ff_completion_family_event
        (family, kind, execution_id, namespace, occurred_at_ms, partition_key, lease_id, worker, revoked_by)
    VALUES ('lease_history', p_kind, e.execution_id, e.namespace, ff_now_ms(), e.partition_key, p_lease_id, p_worker,
            p_revoked_by)
$$;

-- Claims up to p_limit eligible executions for a worker (skipping rows other workers hold), each
-- with a new lease of p_lease_ms: `acquired`, or `reclaimed` when its previous lease had expired.
-- It replaces the claim of part 1, which opened no lease.
DROP FUNCTION IF EXISTS ff_claim_executions(text, integer);
CREATE OR REPLACE FUNCTION ff_claim_executions(p_worker text, p_limit integer, p_lease_ms bigint)
RETURNS TABLE (execution_id uuid, partition_key smallint)
LANGUAGE sql AS $$
    WITH picked AS (
        SELECT e.execution_id, e.lease_state AS was FROM ff_execution e
         WHERE e.state = 'eligible'
         ORDER BY e.created_at_ms
         LIMIT p_limit
           FOR UPDATE SKIP LOCKED
    ), claimed AS (
        UPDATE ff_execution x
           SET state = 'running', worker = p_worker, attempt = x.attempt + 1, updated_at_ms = ff_now_ms(),
               lease_id = gen_random_uuid()::text, lease_state = 'active', lease_expires_at_ms = ff_now_ms() + p_lease_ms
          FROM picked p
         WHERE x.execution_id = p.execution_id
        RETURNING x.execution_id, x.partition_key, x.namespace, x.lease_id, p.was
    ), written AS (
        INSERT INTO ff_completion_family_event
            (family, kind, execution_id, namespace, occurred_at_ms, partition_key, lease_id, worker)
        SELECT 'lease_history', CASE WHEN c.was = 'expired' THEN 'reclaimed' ELSE 'acquired' END, c.execution_id,
               c.namespace, ff_now_ms(), c.partition_key, c.lease_id, p_worker
          FROM claimed c
    )
    SELECT c.execution_id, c.partition_key FROM claimed c
$$;

-- A heartbeat of p_worker on its active lease: extends it by p_lease_ms and writes `renewed`.
-- Returns false when p_worker holds no active lease on the execution.
CREATE OR REPLACE FUNCTION ff_renew_lease(p_execution_id uuid, p_worker text, p_lease_ms bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    e ff_execution;
BEGIN
    UPDATE ff_execution
       SET lease_renewals = lease_renewals + 1, lease_expires_at_ms = ff_now_ms() + p_lease_ms
     WHERE execution_id = p_execution_id AND worker = p_worker AND state = 'running' AND lease_state = 'active'
    RETURNING * INTO e;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM ff_lease_event(e, 'renewed', e.lease_id, e.worker, NULL);
    RETURN true;
END
$$;

-- The expiry sweep: each running execution whose lease ended before p_now_ms loses it (`expired`,
-- naming its previous owner) and is eligible again.
CREATE OR REPLACE FUNCTION ff_expire_leases(p_now_ms bigint)
RETURNS TABLE (execution_id uuid, partition_key smallint)
LANGUAGE sql AS $$
    WITH swept AS (
        SELECT e.execution_id, e.worker AS owner FROM ff_execution e
         WHERE e.state = 'running' AND e.lease_state = 'active' AND e.lease_expires_at_ms < p_now_ms
           FOR UPDATE SKIP LOCKED
    ), expired AS (
        UPDATE ff_execution x
           SET state = 'eligible', lease_state = 'expired', worker = NULL, updated_at_ms = ff_now_ms()
          FROM swept s
         WHERE x.execution_id = s.execution_id
        RETURNING x.execution_id, x.partition_key, x.namespace, x.lease_id, s.owner
    ), written AS (
        INSERT INTO ff_completion_family_event
            (family, kind, execution_id, namespace, occurred_at_ms, partition_key, lease_id, worker)
        SELECT 'lease_history', 'expired', x.execution_id, x.namespace, ff_now_ms(), x.partition_key, x.lease_id,
               x.owner
          FROM expired x
    )
    SELECT x.execution_id, x.partition_key FROM expired x
$$;

-- An operator takes the execution's active lease away (`revoked`, with who); it is eligible
-- again. Returns false when it had no active lease.
CREATE OR REPLACE FUNCTION ff_revoke_lease(p_execution_id uuid, p_revoked_by text) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    e ff_execution;
BEGIN
    SELECT * INTO e FROM ff_execution
     WHERE execution_id = p_execution_id AND state = 'running' AND lease_state = 'active' FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    UPDATE ff_execution
       SET state = 'eligible', lease_state = 'revoked', lease_revoked_by = p_revoked_by, worker = NULL,
           updated_at_ms = ff_now_ms()
     WHERE execution_id = p_execution_id;
    PERFORM ff_lease_event(e, 'revoked', e.lease_id, e.worker, p_revoked_by);
    RETURN true;
END
$$;

-- A running execution suspends on a waitpoint (its lease released). The oldest signal buffered
-- for it is consumed at once: the waitpoint is satisfied and the execution eligible again
-- ('satisfied'); otherwise the waitpoint stays open ('open'). 'not_running' changes nothing.
-- The execution's row lock orders it with deliveries to the same execution.
CREATE OR REPLACE FUNCTION ff_suspend_execution(p_execution_id uuid, p_waitpoint text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    consumed_id bigint;
BEGIN
    UPDATE ff_execution
       SET state = 'suspended', worker = NULL, lease_state = 'released', updated_at_ms = ff_now_ms()
     WHERE execution_id = p_execution_id AND state = 'running';
    IF NOT FOUND THEN
        RETURN 'not_running';
    END IF;
    UPDATE ff_signal_delivery SET consumed = true
     WHERE delivery_id = (SELECT min(d.delivery_id) FROM ff_signal_delivery d
                           WHERE d.execution_id = p_execution_id AND d.waitpoint_id = p_waitpoint
                             AND d.effect = 'buffered' AND NOT d.consumed)
    RETURNING delivery_id INTO consumed_id;
    INSERT INTO ff_waitpoint (execution_id, waitpoint_id, state)
    VALUES (p_execution_id, p_waitpoint, CASE WHEN consumed_id IS NULL THEN 'open' ELSE 'satisfied' END)
    ON CONFLICT (execution_id, waitpoint_id) DO UPDATE SET state = EXCLUDED.state;
    IF consumed_id IS NULL THEN
        RETURN 'open';
    END IF;
    UPDATE ff_execution SET state = 'eligible', updated_at_ms = ff_now_ms() WHERE execution_id = p_execution_id;
    RETURN 'satisfied';
END
$$;

-- Delivers a signal and writes its event: 'deduped' when a delivery of the same key to this
-- execution was not deduped (the partial unique index decides, so of concurrent deliveries of
-- one key exactly one is not deduped), else 'satisfied' when the waitpoint is open (it is
-- satisfied, the execution eligible again), else 'buffered'. NULL for an unknown execution. The
-- execution's row lock orders deliveries and suspends of one execution.
CREATE OR REPLACE FUNCTION ff_deliver_signal(p_execution_id uuid, p_waitpoint text, p_signal_id text,
                                             p_idempotency_key text, p_source_identity text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    e ff_execution;
    v_effect text;
    inserted bigint;
BEGIN
    SELECT * INTO e FROM ff_execution WHERE execution_id = p_execution_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    v_effect := CASE WHEN EXISTS (SELECT 1 FROM ff_waitpoint w WHERE w.execution_id = p_execution_id
                                     AND w.waitpoint_id = p_waitpoint AND w.state = 'open')
                     THEN 'satisfied' ELSE 'buffered' END;
    INSERT INTO ff_signal_delivery (execution_id, waitpoint_id, signal_id, idempotency_key, source_identity, effect,
                                    delivered_at_ms)
    VALUES (p_execution_id, p_waitpoint, p_signal_id, p_idempotency_key, p_source_identity, v_effect, ff_now_ms())
    ON CONFLICT (execution_id, idempotency_key) WHERE effect <> 'deduped' DO NOTHING
    RETURNING delivery_id INTO inserted;
    IF inserted IS NULL THEN
        v_effect := 'deduped';
        INSERT INTO ff_signal_delivery (execution_id, waitpoint_id, signal_id, idempotency_key, source_identity,
                                        effect, delivered_at_ms)
        VALUES (p_execution_id, p_waitpoint, p_signal_id, p_idempotency_key, p_source_identity, v_effect, ff_now_ms());
    ELSIF v_effect = 'satisfied' THEN
        UPDATE ff_waitpoint SET state = 'satisfied' WHERE execution_id = p_execution_id AND waitpoint_id = p_waitpoint;
        UPDATE ff_execution SET state = 'eligible', updated_at_ms = ff_now_ms()
         WHERE execution_id = p_execution_id AND state = 'suspended';
    END IF;
    INSERT INTO ff_completion_family_event
        (family, kind, execution_id, namespace, occurred_at_ms, partition_key, signal_id, waitpoint_id,
         source_identity)
    VALUES ('signal_delivery', v_effect, e.execution_id, e.namespace, ff_now_ms(), e.partition_key, p_signal_id,
            p_waitpoint, p_source_identity);
    RETURN v_effect;
END
$$;
