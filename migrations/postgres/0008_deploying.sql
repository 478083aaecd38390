-- ff-completions for Postgres, part 8: running as a role of least privilege.
--
-- The schema's owner (never a superuser) installs and upgrades the schema; the tree, its
-- families and durable-group members can then run as a runtime role that holds only the
-- privileges listed by ff_completions_runtime_privileges(), granted by
-- ff_completions_grant_runtime(role), and started with ff_migrate=false (it only checks the
-- installed version and ff_completions_missing_privileges()). The lists are read from the
-- catalog, so objects of later migrations with the subsystem's names are included as they
-- come. A host's producers need privileges on the outbox (and ff_completion_family_event)
-- alone: the capture triggers run as the owner (SECURITY DEFINER).

-- Every privilege the tree needs, one row each: privilege, object type (schema, database,
-- table, sequence, function, procedure) and the object's name as GRANT takes it. The schema
-- is the ledger's; in it: SELECT on the ledger; SELECT, UPDATE and DELETE on the outbox and
-- on ff_completion_family_event (read, retire foreign history, retention); SELECT, INSERT,
-- UPDATE and DELETE on every other ff_completion_* table (ticks, transactions, lineages,
-- pending cuts, retention, durable groups); USAGE and SELECT on their sequences; EXECUTE on
-- every ff_completion* function and procedure; and TEMPORARY on the database (a retention
-- step keeps its removed rows in a temporary table).
CREATE OR REPLACE FUNCTION ff_completions_runtime_privileges()
RETURNS TABLE (privilege text, object_type text, object_name text)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_schema oid := (SELECT c.relnamespace FROM pg_class c WHERE c.oid = 'ff_completions_migrations'::regclass);
BEGIN
    RETURN QUERY SELECT 'USAGE', 'schema', n.nspname::text FROM pg_namespace n WHERE n.oid = v_schema;
    RETURN QUERY SELECT 'TEMPORARY', 'database', current_database()::text;
    RETURN QUERY
        SELECT p.priv, 'table', c.oid::regclass::text
          FROM pg_class c
         CROSS JOIN LATERAL unnest(CASE
                 WHEN c.relname = 'ff_completions_migrations' THEN ARRAY['SELECT']
                 WHEN c.relname IN ('ff_completion_event', 'ff_completion_family_event')
                     THEN ARRAY['SELECT', 'UPDATE', 'DELETE']
                 ELSE ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE'] END) AS p(priv)
         WHERE c.relnamespace = v_schema AND c.relkind IN ('r', 'p') AND NOT c.relispartition
           AND (c.relname = 'ff_completions_migrations' OR c.relname LIKE 'ff\_completion\_%')
         ORDER BY c.relname, array_position(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE'], p.priv);
    RETURN QUERY
        SELECT p.priv, 'sequence', c.oid::regclass::text
          FROM pg_class c CROSS JOIN unnest(ARRAY['USAGE', 'SELECT']) AS p(priv)
         WHERE c.relnamespace = v_schema AND c.relkind = 'S' AND c.relname LIKE 'ff\_completion%'
         ORDER BY c.relname, p.priv DESC;
    RETURN QUERY
        SELECT 'EXECUTE', CASE WHEN f.prokind = 'p' THEN 'procedure' ELSE 'function' END, f.oid::regprocedure::text
          FROM pg_proc f
         WHERE f.pronamespace = v_schema AND f.proname LIKE 'ff\_completion%'
         ORDER BY f.proname, f.oid::regprocedure::text;
END
$$;

-- The privileges of ff_completions_runtime_privileges() that p_role does not hold (directly,
-- through a role it inherits, or through PUBLIC). The tree started with ff_migrate=false
-- refuses to start while this is not empty, naming the first ones.
CREATE OR REPLACE FUNCTION ff_completions_missing_privileges(p_role name DEFAULT current_user)
RETURNS TABLE (privilege text, object_type text, object_name text)
LANGUAGE sql STABLE AS $$
    SELECT r.privilege, r.object_type, r.object_name
      FROM ff_completions_runtime_privileges() r
     WHERE NOT CASE r.object_type
               WHEN 'schema' THEN has_schema_privilege(p_role, r.object_name, r.privilege)
               WHEN 'database' THEN has_database_privilege(p_role, r.object_name, r.privilege)
               WHEN 'table' THEN has_table_privilege(p_role, r.object_name, r.privilege)
               WHEN 'sequence' THEN has_sequence_privilege(p_role, r.object_name, r.privilege)
               ELSE has_function_privilege(p_role, r.object_name, r.privilege)
           END
$$;

-- Grants p_role every privilege of ff_completions_runtime_privileges(); run it as the schema's
-- owner after installing or upgrading. Returns the GRANT statements it ran, in order (the
-- exact grants, for review or for a script of one's own). TEMPORARY on the database is
-- granted only where the owner may grant it (PUBLIC holds it by default).
CREATE OR REPLACE FUNCTION ff_completions_grant_runtime(p_role name) RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    statement text;
BEGIN
    FOR r IN SELECT * FROM ff_completions_runtime_privileges() LOOP
        statement := format('GRANT %s ON %s %s TO %I', r.privilege, upper(r.object_type),
                            CASE WHEN r.object_type IN ('schema', 'database') THEN quote_ident(r.object_name)
                                 ELSE r.object_name END,
                            p_role);
        IF r.object_type = 'database' AND has_database_privilege(p_role, r.object_name, r.privilege) THEN
            CONTINUE;
        END IF;
        EXECUTE statement;
        RETURN NEXT statement;
    END LOOP;
END
$$;
