-- Expiry drops a month.
--
-- Expiring a retention window deleted its logins' sealed values page by page through
-- `vault_expire_page` (229,590 rows/s: two hours for a month of 1.5 billion logins, and the
-- disk back only after VACUUM). The window's month is a partition of each table since 0017,
-- so expiry now drops the two partitions: one catalog change, the disk back at commit.
--
-- Policy: the analysts' rows of an expired month go with it. Their tokens are personal data
-- (equal values give equal tokens), and a row without them says little; keeping rows without
-- tokens would mean rewriting the month row by row, which is what this removes. A login of an
-- expiring or expired window that arrives late is not stored: ingest quarantines it with its
-- body withheld ('window-expired'), so its arrival is recorded and nothing of it is kept.
--
-- - `vault_drop_month(month)`: owned by the tables' owner (only an owner may drop a
--   partition), callable by the door role alone. It drops the month's two partitions if the
--   month's window is expiring or expired and has ended, and answers what it dropped. DROP
--   locks each parent table exclusively, so it waits for every open transaction that read or
--   wrote logins; it gives up after 2 s (SQLSTATE 55P03) rather than queue every reader behind
--   it, and `rotate-keys expire` tries again.
-- - `vault_expire_month(starts, keys)`: the key admin's door. Deletes the window's sealed
--   quarantined bodies (as the page door did), drops the month, and appends one audit row
--   with the count and the id range of what went; answers the logins and the quarantined
--   messages it took. Resumable: run again, it finds nothing left and appends nothing.
-- - `vault_add_month` refuses the month of an expiring or expired window, so no partition of
--   an expired month comes back.
-- - `vault_expire_page` is gone.

CREATE FUNCTION vault_drop_month(p_month date)
    RETURNS TABLE(logins bigint, first_id bigint, last_id bigint)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, public, pg_temp
    SET lock_timeout = '2s'
AS $$
DECLARE
    logins_partition text := 'user_logins_' || to_char(p_month, 'YYYY_MM');
    vault_partition text := 'login_vault_' || to_char(p_month, 'YYYY_MM');
    estimate real;
BEGIN
    IF p_month IS NULL OR p_month <> date_trunc('month', p_month)
       OR NOT EXISTS (SELECT 1 FROM retention_windows w
                      WHERE w.starts = p_month AND w.state IN ('expiring', 'expired')
                        AND w.ends <= current_date) THEN
        RAISE EXCEPTION 'only the month of an expiring window that has ended is dropped, not %',
            p_month USING ERRCODE = 'invalid_parameter_value';
    END IF;
    logins := 0;
    IF to_regclass('public.' || logins_partition) IS NULL
       AND to_regclass('public.' || vault_partition) IS NULL THEN
        RETURN NEXT;
        RETURN;
    END IF;
    -- Parents first, in the order writers take them (logins, then the vault): no deadlock.
    LOCK TABLE user_logins, login_vault IN ACCESS EXCLUSIVE MODE;
    IF to_regclass('public.' || logins_partition) IS NOT NULL THEN
        -- A partition never analyzed (a small one) is counted; a large one has statistics.
        SELECT c.reltuples INTO estimate FROM pg_class c
        WHERE c.oid = ('public.' || logins_partition)::regclass;
        IF estimate < 0 THEN
            EXECUTE format('SELECT count(*) FROM public.%I', logins_partition) INTO logins;
        ELSE
            logins := estimate::bigint;
        END IF;
        EXECUTE format('SELECT min(id), max(id) FROM public.%I', logins_partition)
            INTO first_id, last_id;
    END IF;
    EXECUTE format('DROP TABLE IF EXISTS public.%I, public.%I', vault_partition,
                   logins_partition);
    RETURN NEXT;
END
$$;

CREATE FUNCTION vault_expire_month(p_starts date, p_keys bigint[])
    RETURNS TABLE(logins bigint, quarantined bigint)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    dropped record;
    n_quarantined bigint;
BEGIN
    IF NOT pg_has_role(session_user, 'pii_vault_keyadmin', 'MEMBER') THEN
        RAISE EXCEPTION 'expiry is for the key admin (pii_vault_keyadmin)'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    DELETE FROM quarantine q
    WHERE q.data_key_id = ANY (p_keys)
       OR (q.sealed_body IS NOT NULL
           AND q.sent_at >= p_starts::timestamp AT TIME ZONE 'UTC'
           AND q.sent_at < (p_starts + interval '1 month') AT TIME ZONE 'UTC');
    GET DIAGNOSTICS n_quarantined = ROW_COUNT;
    SELECT * INTO dropped FROM vault_drop_month(p_starts);
    IF dropped.first_id IS NOT NULL OR n_quarantined > 0 THEN
        PERFORM audit_append(session_user, 'retention', 'rotate-keys expire',
                             format('expire logins dated %s..%s: dropped the month''s %s logins (ids %s..%s) and their sealed values, %s quarantined messages',
                                    p_starts, (p_starts + interval '1 month')::date - 1,
                                    dropped.logins, coalesce(dropped.first_id::text, '-'),
                                    coalesce(dropped.last_id::text, '-'), n_quarantined),
                             least(dropped.logins, 2147483647)::integer, 'expired', '{}',
                             coalesce(p_keys, '{}'));
    END IF;
    RETURN QUERY SELECT dropped.logins, n_quarantined;
END
$$;

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
    LOCK TABLE user_logins, login_vault IN SHARE UPDATE EXCLUSIVE MODE;
    FOREACH parent IN ARRAY ARRAY['user_logins', 'login_vault'] LOOP
        partition := parent || '_' || to_char(starts, 'YYYY_MM');
        CONTINUE WHEN to_regclass('public.' || partition) IS NOT NULL;
        EXECUTE format('CREATE TABLE public.%I (LIKE public.%I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                       partition, parent);
        EXECUTE format('ALTER TABLE public.%I ATTACH PARTITION public.%I FOR VALUES FROM (%L) TO (%L)',
                       parent, partition, starts, ends);
        added := true;
    END LOOP;
    RETURN added;
END
$$;

DROP FUNCTION vault_expire_page(date, date, bigint, bigint, boolean, bigint[]);

-- vault_drop_month stays the owner's; the door's function belongs to the door role.
GRANT CREATE ON SCHEMA public TO pii_vault_door;
ALTER FUNCTION vault_expire_month(date, bigint[]) OWNER TO pii_vault_door;
REVOKE CREATE ON SCHEMA public FROM pii_vault_door;

REVOKE EXECUTE ON FUNCTION vault_drop_month(date), vault_expire_month(date, bigint[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION vault_drop_month(date) TO pii_vault_door;
GRANT EXECUTE ON FUNCTION vault_expire_month(date, bigint[]) TO pii_vault_keyadmin;
