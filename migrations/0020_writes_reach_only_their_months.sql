-- Writes reach only their logins' months.
--
-- 0018 made the hand-outs read each login in its own month. The doors that write found their
-- rows by id alone: rotation's `vault_reseal_logins` and `vault_retokenize_logins`, and the
-- erasure's delete of a user's vault rows. A login's id names no partition, so each id was
-- looked for in every month (or, for a large page, the planner could read every month whole).
--
-- - The two rotation write doors update one month at a time: for each month among the logins
--   written (their days as the request recorded them, `door_logins`), one UPDATE bounded to
--   that month, so only its partition is planned and read, whatever join the planner picks.
-- - The erasure deletes the user's vault rows month by month, the months of the user's logins.
--   Its dry run joins each login to its vault row by (id, month) too.
-- - `vault_drop_month` locks the two parent tables alone (`LOCK TABLE ONLY`). A plain LOCK
--   TABLE on a partitioned table also locks every partition of every month, so it waited for
--   any lock on any month: an autovacuum of this month's partition (cancelled only after
--   deadlock_timeout) or an owner's ANALYZE. Dropping a partition takes the parent's
--   exclusive lock itself, which is what shuts out every reader and writer of logins.

CREATE OR REPLACE FUNCTION vault_reseal_logins(p_request bigint, p_ids bigint[],
                                               p_data_keys bigint[], p_sealed_ip bytea[],
                                               p_sealed_device_id bytea[]) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    r door_requests := door_in_hand(p_request, 'rotation', 'reseal', p_ids);
    n bigint := 0;
    in_month bigint;
    month date;
    new_keys bigint[];
BEGIN
    SELECT coalesce(array_agg(DISTINCT k ORDER BY k), '{}') INTO new_keys FROM unnest(p_data_keys) k;
    PERFORM door_check_new_keys(new_keys, 'data');
    FOR month IN SELECT DISTINCT date_trunc('month', h.day)::date FROM door_logins(r) h
                 WHERE h.id = ANY (p_ids) LOOP
        UPDATE login_vault v
        SET data_key_id = u.data_key_id, sealed_ip = u.sealed_ip,
            sealed_device_id = u.sealed_device_id
        FROM unnest(p_ids, p_data_keys, p_sealed_ip, p_sealed_device_id)
             AS u(login_id, data_key_id, sealed_ip, sealed_device_id)
        WHERE v.login_id = u.login_id
          AND v.create_date >= month AND v.create_date < (month + interval '1 month')::date;
        GET DIAGNOSTICS in_month = ROW_COUNT;
        n := n + in_month;
    END LOOP;
    PERFORM audit_append(session_user, 'key-administration', 'rotate-keys reseal',
                         format('resealed %s logins of audit row %s', n, r.audit_id),
                         n::integer, 'resealed', p_ids, new_keys);
    RETURN n;
END
$$;

CREATE OR REPLACE FUNCTION vault_retokenize_logins(p_request bigint, p_token_key bigint,
                                                   p_ids bigint[], p_masked_ip text[],
                                                   p_masked_device_id text[]) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    r door_requests := door_in_hand(p_request, 'rotation', 'retokenize', p_ids);
    n bigint := 0;
    in_month bigint;
    month date;
BEGIN
    PERFORM door_check_new_keys(ARRAY[p_token_key], 'token');
    FOR month IN SELECT DISTINCT date_trunc('month', h.day)::date FROM door_logins(r) h
                 WHERE h.id = ANY (p_ids) LOOP
        UPDATE user_logins l
        SET masked_ip = u.masked_ip, masked_device_id = u.masked_device_id,
            token_key_id = p_token_key
        FROM unnest(p_ids, p_masked_ip, p_masked_device_id) AS u(id, masked_ip, masked_device_id)
        WHERE l.id = u.id
          AND l.create_date >= month AND l.create_date < (month + interval '1 month')::date;
        GET DIAGNOSTICS in_month = ROW_COUNT;
        n := n + in_month;
    END LOOP;
    PERFORM audit_append(session_user, 'key-administration', 'rotate-keys retokenize',
                         format('retokenized %s logins of audit row %s', n, r.audit_id),
                         n::integer, 'retokenized', p_ids, ARRAY[p_token_key]);
    RETURN n;
END
$$;

-- As in 0014, but the vault rows are deleted month by month (see the top of this file).
CREATE OR REPLACE FUNCTION vault_erase_user(p_user_id text, p_reason text, p_actor text,
                                            p_keep_tokens boolean, p_token_keys bigint[],
                                            p_user_tokens text[], p_sealed_user_ids bytea[],
                                            p_in_flight boolean, p_dry_run boolean,
                                            p_erased_at timestamptz)
    RETURNS TABLE(audit_id bigint, logins bigint, tokens bigint, quarantined bigint,
                  erased_at timestamptz)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    ids bigint[] := '{}';
    keys bigint[] := '{}';
    month_ids bigint[];
    month_keys bigint[];
    month date;
    n_logins bigint;
    n_tokens bigint := 0;
    n_quarantined bigint;
    audit bigint;
    at_time timestamptz := coalesce(p_erased_at, clock_timestamp());
BEGIN
    IF NOT pg_has_role(session_user, 'pii_vault_keyadmin', 'MEMBER') THEN
        RAISE EXCEPTION 'erasure is for the key admin (pii_vault_keyadmin)'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF p_reason IS NULL OR btrim(p_reason) = '' THEN
        RAISE EXCEPTION 'an erasure needs a reason' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_user_id IS NULL OR p_user_id = '' OR length(p_user_id) > (audit_limits()).value THEN
        RAISE EXCEPTION 'a user id takes 1 to % characters', (audit_limits()).value
            USING ERRCODE = 'string_data_right_truncation';
    END IF;
    IF cardinality(p_token_keys) IS DISTINCT FROM cardinality(p_user_tokens)
       OR cardinality(p_token_keys) IS DISTINCT FROM cardinality(p_sealed_user_ids)
       OR cardinality(p_token_keys) = 0 OR cardinality(p_token_keys) > 1000
       OR array_position(p_sealed_user_ids, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'an erasure needs the user''s token and sealed id under each token key'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_in_flight IS NULL OR p_dry_run IS NULL OR p_keep_tokens IS NULL
       OR at_time > clock_timestamp() THEN
        RAISE EXCEPTION 'an erasure''s flags are true or false, and its time is not in the future'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_dry_run THEN
        SELECT count(v.login_id), count(*) FILTER (WHERE l.masked_ip IS NOT NULL
                                                      OR l.masked_device_id IS NOT NULL)
        INTO n_logins, n_tokens
        FROM user_logins l
        LEFT JOIN login_vault v ON v.login_id = l.id AND v.create_date = l.create_date
        WHERE l.user_id = p_user_id;
        SELECT count(*) INTO n_quarantined FROM quarantine q
        JOIN unnest(p_token_keys, p_user_tokens) AS t(key_id, token)
          ON q.token_key_id = t.key_id AND q.user_token = t.token;
    END IF;
    IF NOT p_in_flight
       AND NOT EXISTS (SELECT 1 FROM user_logins l WHERE l.user_id = p_user_id)
       AND NOT EXISTS (SELECT 1 FROM quarantine q
                       JOIN unnest(p_token_keys, p_user_tokens) AS t(key_id, token)
                         ON q.token_key_id = t.key_id AND q.user_token = t.token) THEN
        RAISE EXCEPTION 'no login and no quarantined message names this user id; nothing was erased'
            USING ERRCODE = 'no_data_found',
                  HINT = 'check the id; to record the erasure for messages still on the queue, say it is in flight';
    END IF;
    IF p_dry_run THEN
        RETURN QUERY SELECT NULL::bigint, n_logins, n_tokens, n_quarantined, at_time;
        RETURN;
    END IF;
    -- Waits for every ingester batch in progress; later ones see this erasure.
    UPDATE erasure_gate SET erasures = erasures + 1;
    FOR month IN SELECT DISTINCT date_trunc('month', l.create_date)::date FROM user_logins l
                 WHERE l.user_id = p_user_id LOOP
        WITH erased AS (
            DELETE FROM login_vault v USING user_logins l
            WHERE l.id = v.login_id AND l.create_date = v.create_date
              AND l.user_id = p_user_id
              AND v.create_date >= month AND v.create_date < (month + interval '1 month')::date
              AND l.create_date >= month AND l.create_date < (month + interval '1 month')::date
            RETURNING v.login_id, v.data_key_id)
        SELECT coalesce(array_agg(e.login_id), '{}'), coalesce(array_agg(DISTINCT e.data_key_id), '{}')
        INTO month_ids, month_keys FROM erased e;
        ids := ids || month_ids;
        keys := keys || month_keys;
    END LOOP;
    SELECT coalesce(array_agg(i ORDER BY i), '{}') INTO ids FROM unnest(ids) i;
    SELECT coalesce(array_agg(DISTINCT k ORDER BY k), '{}') INTO keys FROM unnest(keys) k;
    IF NOT p_keep_tokens THEN
        UPDATE user_logins SET masked_ip = NULL, masked_device_id = NULL
        WHERE user_logins.user_id = p_user_id
          AND (masked_ip IS NOT NULL OR masked_device_id IS NOT NULL);
        GET DIAGNOSTICS n_tokens = ROW_COUNT;
    END IF;
    DELETE FROM quarantine q
    USING unnest(p_token_keys, p_user_tokens) AS t(key_id, token)
    WHERE q.token_key_id = t.key_id AND q.user_token = t.token;
    GET DIAGNOSTICS n_quarantined = ROW_COUNT;
    audit := audit_append(p_actor, 'erasure', p_reason,
                          format('erase user_id = %s: sealed values of %s logins, tokens of %s, %s quarantined messages%s%s',
                                 p_user_id, cardinality(ids), n_tokens, n_quarantined,
                                 CASE WHEN p_keep_tokens THEN ' (tokens kept: legal hold)' ELSE '' END,
                                 CASE WHEN p_erased_at IS NULL THEN ''
                                      ELSE format(' (re-applied: erased at %s)', p_erased_at) END),
                          cardinality(ids), 'erased', ids, keys);
    INSERT INTO erasures (token_key_id, user_token, sealed_user_id, tokens_kept, erased_at,
                          audit_id)
    SELECT t.key_id, t.token, t.sealed, p_keep_tokens, at_time, audit
    FROM unnest(p_token_keys, p_user_tokens, p_sealed_user_ids) AS t(key_id, token, sealed);
    RETURN QUERY SELECT audit, cardinality(ids)::bigint, n_tokens, n_quarantined, at_time;
END
$$;

-- As in 0019, but the parents are locked alone (see the top of this file).
CREATE OR REPLACE FUNCTION vault_drop_month(p_month date)
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
    -- Parents first, in the order writers take them (logins, then the vault): no deadlock. The
    -- parents alone: the partitions of other months are no business of this (see above).
    LOCK TABLE ONLY user_logins, ONLY login_vault IN ACCESS EXCLUSIVE MODE;
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
