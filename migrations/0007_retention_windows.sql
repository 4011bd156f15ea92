-- Retention by crypto-shredding: personal values expire by destroying whole keys.
--
-- A retention window is a calendar month (UTC) of login dates with a KMS key of its own. The
-- data keys that seal values of logins in that month are wrapped under the window's KMS key
-- (`vault_keys.window_starts`). `rotate-keys expire` deletes the sealed values of a window
-- older than the horizon, destroys its data keys and schedules its KMS key for deletion: from
-- then on KMS refuses to unwrap those data keys, so every backup taken earlier can no longer
-- open that window either. Logins of a month with no window are sealed under the default KMS
-- key and can be deleted, not shredded (`rotate-keys status` names them).

CREATE TABLE retention_windows (
    -- The window covers logins dated [starts, ends).
    starts      date PRIMARY KEY CHECK (extract(day FROM starts) = 1),
    ends        date NOT NULL,
    -- ARN of the KMS key that wraps this window's data keys, as KMS reported it.
    kms_key_id  text NOT NULL UNIQUE,
    -- active: data keys are made under it; expiring: an expiry is under way (ingesters seal
    -- nothing more into it); expired: its values deleted, its keys destroyed.
    state       text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'expiring', 'expired')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    expired_at  timestamptz,
    CHECK (ends = (starts + interval '1 month')::date)
);

ALTER TABLE vault_keys ADD COLUMN window_starts date;

GRANT SELECT ON retention_windows TO pii_vault_ingester, pii_vault_compliance, pii_vault_door;
GRANT SELECT, INSERT, UPDATE ON retention_windows TO pii_vault_keyadmin;

-- Expiry (rotate-keys expire): deletes the sealed values (and, with p_drop_tokens, the tokens)
-- of the next page of logins dated [p_starts, p_ends) after login p_after, in login id order,
-- and the quarantined bodies sealed under p_keys (the window's data keys). One audit row per
-- page; returns how many rows the page touched and the last login id it walked past (NULL at
-- the end of the table).
CREATE FUNCTION vault_expire_page(p_starts date, p_ends date, p_after bigint, p_limit bigint,
                                  p_drop_tokens boolean, p_keys bigint[])
    RETURNS TABLE (touched bigint, walked_to bigint)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    ids bigint[];
    keys bigint[];
    n_quarantined bigint;
    last_id bigint;
BEGIN
    IF NOT pg_has_role(session_user, 'pii_vault_keyadmin', 'MEMBER') THEN
        RAISE EXCEPTION 'expiry is for the key admin (pii_vault_keyadmin)'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    -- Walks the primary key: every row is looked at once over the whole expiry.
    SELECT max(page.id), coalesce(array_agg(page.id ORDER BY page.id)
                                      FILTER (WHERE page.in_window), '{}')
    INTO last_id, ids
    FROM (SELECT l.id,
                 l.create_date >= p_starts AND l.create_date < p_ends
                 AND (EXISTS (SELECT 1 FROM login_vault v WHERE v.login_id = l.id)
                      OR p_drop_tokens AND (l.masked_ip IS NOT NULL
                                            OR l.masked_device_id IS NOT NULL)) AS in_window
          FROM user_logins l WHERE l.id > p_after
          ORDER BY l.id LIMIT p_limit FOR UPDATE SKIP LOCKED) AS page;
    WITH gone AS (DELETE FROM login_vault v WHERE v.login_id = ANY (ids) RETURNING v.data_key_id)
    SELECT coalesce(array_agg(DISTINCT g.data_key_id), '{}') INTO keys FROM gone g;
    IF p_drop_tokens THEN
        UPDATE user_logins SET masked_ip = NULL, masked_device_id = NULL
        WHERE id = ANY (ids);
    END IF;
    DELETE FROM quarantine q WHERE q.data_key_id = ANY (p_keys);
    GET DIAGNOSTICS n_quarantined = ROW_COUNT;
    IF cardinality(ids) > 0 OR n_quarantined > 0 THEN
        PERFORM audit_append(session_user, 'retention', 'rotate-keys expire',
                             format('expire logins dated %s..%s: %s logins, %s quarantined messages%s',
                                    p_starts, p_ends - 1, cardinality(ids), n_quarantined,
                                    CASE WHEN p_drop_tokens THEN ', tokens too' ELSE '' END),
                             cardinality(ids), 'expired', ids, keys);
    END IF;
    RETURN QUERY SELECT cardinality(ids) + n_quarantined, last_id;
END
$$;

GRANT CREATE ON SCHEMA public TO pii_vault_door;
ALTER FUNCTION vault_expire_page(date, date, bigint, bigint, boolean, bigint[]) OWNER TO pii_vault_door;
REVOKE CREATE ON SCHEMA public FROM pii_vault_door;
REVOKE EXECUTE ON FUNCTION vault_expire_page(date, date, bigint, bigint, boolean, bigint[])
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION vault_expire_page(date, date, bigint, bigint, boolean, bigint[])
    TO pii_vault_keyadmin;
