-- ff-completions for Postgres, part 1: the completion outbox, created or adopted. Every migration
-- of this directory is recorded in the ledger ff_completions_migrations (never the host's
-- _sqlx_migrations), creates only objects named ff_completion_* / ff_completions_*, and replaces
-- nothing this project did not create. This part holds ACCESS EXCLUSIVE on an existing outbox for
-- catalogue changes only (no rewrite, no scan), and commits before the index is built.

-- The outbox in the original shape; an existing table of that shape is adopted below.
CREATE TABLE IF NOT EXISTS ff_completion_event (
    event_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    execution_id    uuid,
    flow_id         uuid,
    outcome         text,
    namespace       text,
    instance_tag    text,
    occurred_at_ms  bigint,
    partition_key   smallint
);

-- The inserting transaction, added without a default and then given one: both only change the
-- catalogue (a volatile default in ADD COLUMN would rewrite the table). Rows from before the
-- adoption keep NULL and are read first, in event_id order.
ALTER TABLE ff_completion_event ADD COLUMN IF NOT EXISTS txid xid8;
ALTER TABLE ff_completion_event ALTER COLUMN txid SET DEFAULT pg_current_xact_id();

-- The execution's tags, for in-memory instance-tag filtering.
ALTER TABLE ff_completion_event ADD COLUMN IF NOT EXISTS tags jsonb;

-- New rows always carry their transaction (checked for new rows only: no scan of old ones).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                    WHERE conrelid = 'ff_completion_event'::regclass AND conname = 'ff_completion_event_txid_set') THEN
        ALTER TABLE ff_completion_event ADD CONSTRAINT ff_completion_event_txid_set CHECK (txid IS NOT NULL) NOT VALID;
    END IF;
END
$$;

-- Earlier versions of this project sent NOTIFY from a statement trigger inside the producer's
-- transaction, which serialises committing producers on Postgres' notify lock. It is dropped only
-- when it is exactly that trigger (same name, statement level, same function body); a host's
-- trigger or function of the same name is left alone.
DO $$
DECLARE
    fn oid;
BEGIN
    SELECT p.oid INTO fn
      FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
     WHERE t.tgrelid = 'ff_completion_event'::regclass
       AND t.tgname = 'ff_completion_event_notify_trg'
       AND (t.tgtype & 1) = 0
       AND p.proname = 'ff_notify_completion_event'
       AND regexp_replace(p.prosrc, '\s+', ' ', 'g') = ' BEGIN PERFORM pg_notify(''ff_completion'', ''''); RETURN NULL; END ';
    IF fn IS NOT NULL THEN
        DROP TRIGGER ff_completion_event_notify_trg ON ff_completion_event;
        IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgfoid = fn) THEN
            EXECUTE format('DROP FUNCTION %s', fn::regprocedure);
        END IF;
    END IF;
END
$$;
