-- Each month's keys without the login date.
--
-- Since 0017 the two primary keys and the message key were constraints of the partitioned
-- tables, and PostgreSQL requires those to include the partition key: (id, create_date),
-- (message_id, create_date), (login_id, create_date). The date made every entry of the three
-- B-trees 8 bytes wider (4 and its alignment), about 38 bytes of disk and as many of WAL a
-- login (`cargo bench --bench pipeline`, which runs the same pipeline into tables that are not
-- partitioned).
--
-- Within one month's partition the date adds nothing a key needs, so each month now has its own
-- keys: `<month>_pkey` (id), `<month>_message_id_key` (message_id) and, in the vault,
-- `<month>_pkey` (login_id). The parents have none. What each key promises:
-- - A login id is unique: the sequence gives each once; a month's key finds it.
-- - A message is stored once per month, whatever its day: stronger than (message key, day).
--   Every delivery of a message carries the same date (its SentTimestamp, or for a file line its
--   source's first day, 0021), so it always meets its earlier delivery in the same month. The
--   writer looks a batch's keys up in the whole of its months, as the index holds.
-- - A vault row per login.
--
-- `vault_add_month` makes a month's keys before it attaches it; the months already there get
-- theirs here, built in this migration's transaction, which holds the two tables against writes
-- meanwhile: on a 2-core machine 1.2 s per million logins for the logins' two keys and 0.4 s for
-- the vault's, plus a read of each month's message keys.

ALTER TABLE user_logins DROP CONSTRAINT user_logins_pkey,
                        DROP CONSTRAINT user_logins_message_id_key;
ALTER TABLE login_vault DROP CONSTRAINT login_vault_pkey;

-- The keys of one month's partition `p_partition` of `p_parent` (owner only: the doors call it).
CREATE FUNCTION vault_month_keys(p_parent text, p_partition text) RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, public, pg_temp
AS $$
BEGIN
    IF p_parent = 'user_logins' THEN
        EXECUTE format('ALTER TABLE public.%I ADD CONSTRAINT %I PRIMARY KEY (id),'
                       ' ADD CONSTRAINT %I UNIQUE (message_id)',
                       p_partition, p_partition || '_pkey', p_partition || '_message_id_key');
    ELSIF p_parent = 'login_vault' THEN
        EXECUTE format('ALTER TABLE public.%I ADD CONSTRAINT %I PRIMARY KEY (login_id)',
                       p_partition, p_partition || '_pkey');
    ELSE
        RAISE EXCEPTION 'months are kept for user_logins and login_vault, not %', p_parent;
    END IF;
END
$$;
REVOKE EXECUTE ON FUNCTION vault_month_keys(text, text) FROM PUBLIC;

-- A month that already holds a message on two days (possible only if a source gave one message
-- two dates) keeps its message key by day, so that nothing stored is refused or lost; the
-- writer's look-up by month still finds either.
DO $$
DECLARE
    month record;
    twice boolean;
BEGIN
    FOR month IN
        SELECT p.parent, c.relname AS partition
        FROM (VALUES ('user_logins'), ('login_vault')) AS p(parent)
        JOIN pg_inherits i ON i.inhparent = ('public.' || p.parent)::regclass
        JOIN pg_class c ON c.oid = i.inhrelid
        ORDER BY c.relname
    LOOP
        IF month.parent = 'user_logins' THEN
            EXECUTE format('SELECT EXISTS (SELECT FROM public.%I GROUP BY message_id'
                           ' HAVING count(*) > 1)', month.partition) INTO twice;
        END IF;
        IF month.parent = 'user_logins' AND twice THEN
            RAISE WARNING '% holds a message on two days: its message key keeps the date',
                month.partition;
            EXECUTE format('ALTER TABLE public.%I ADD CONSTRAINT %I PRIMARY KEY (id),'
                           ' ADD CONSTRAINT %I UNIQUE (message_id, create_date)',
                           month.partition, month.partition || '_pkey',
                           month.partition || '_message_id_key');
        ELSE
            PERFORM vault_month_keys(month.parent, month.partition);
        END IF;
    END LOOP;
END
$$;

-- As in 0019, with the month's keys made before it is attached, and the parents alone locked
-- (a plain LOCK TABLE also locks every month, and so waited on an autovacuum of any of them).
CREATE OR REPLACE FUNCTION vault_add_month(p_month date) RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, public, pg_temp
    SET lock_timeout = '5s'
AS $$
DECLARE
    starts date := date_trunc('month', p_month)::date;
    ends date := (date_trunc('month', p_month) + interval '1 month')::date;
    added boolean := false;
    parent text;
    partition text;
BEGIN
    IF NOT pg_has_role(session_user, current_user, 'MEMBER')
       AND NOT pg_has_role(session_user, 'pii_vault_keyadmin', 'MEMBER') THEN
        RAISE EXCEPTION 'adding months is for the key admin (pii_vault_keyadmin)'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF p_month IS NULL OR p_month < date '2000-01-01'
       OR p_month >= date_trunc('month', current_date) + interval '25 months' THEN
        RAISE EXCEPTION 'a month from 2000-01 to 24 months ahead, not %', p_month
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF EXISTS (SELECT 1 FROM retention_windows w
               WHERE w.starts = date_trunc('month', p_month) AND w.state <> 'active') THEN
        RAISE EXCEPTION 'the retention window of % has expired: its logins are not stored',
            to_char(starts, 'YYYY-MM') USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- One adder at a time (two racing on one month would both find it missing), by the mode
    -- ATTACH takes anyway: it conflicts with itself and with no reader or writer.
    LOCK TABLE ONLY user_logins, ONLY login_vault IN SHARE UPDATE EXCLUSIVE MODE;
    FOREACH parent IN ARRAY ARRAY['user_logins', 'login_vault'] LOOP
        partition := parent || '_' || to_char(starts, 'YYYY_MM');
        CONTINUE WHEN to_regclass('public.' || partition) IS NOT NULL;
        EXECUTE format('CREATE TABLE public.%I (LIKE public.%I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                       partition, parent);
        PERFORM vault_month_keys(parent, partition);
        EXECUTE format('ALTER TABLE public.%I ATTACH PARTITION public.%I FOR VALUES FROM (%L) TO (%L)',
                       parent, partition, starts, ends);
        added := true;
    END LOOP;
    RETURN added;
END
$$;
