-- Expiry reaches every body of its month. (0007 describes vault_expire_page as it was; its
-- current definition is here.)
--
-- A message sent in a month and quarantined before that month's retention window was
-- registered is sealed under a data key of no window. Expiry deleted quarantined bodies by the
-- window's data keys only, so such a body outlived its month and still opened. It now also
-- deletes every sealed body sent in [p_starts, p_ends) (UTC, as ingest places a message in a
-- window by the UTC date of its send time), whatever key seals it.

CREATE OR REPLACE FUNCTION vault_expire_page(p_starts date, p_ends date, p_after bigint, p_limit bigint,
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
    DELETE FROM quarantine q
    WHERE q.data_key_id = ANY (p_keys)
       OR (q.sealed_body IS NOT NULL
           AND q.sent_at >= p_starts::timestamp AT TIME ZONE 'UTC'
           AND q.sent_at < p_ends::timestamp AT TIME ZONE 'UTC');
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

-- The key admin's plan (`rotate-keys expire` without --apply) counts those bodies too.
GRANT SELECT (sent_at) ON quarantine TO pii_vault_keyadmin;
