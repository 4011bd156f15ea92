-- Erasure that erases: a user's sealed values, tokens and quarantined bodies go, and a record
-- of the erasure stops messages sent before it (in flight, or in the dead-letter queue) from
-- bringing them back.
--
-- * `erasures` holds, per erasure, the user's token under each token key that could be in use
--   (never the user id in clear): `user_token = token of the user id` (field `user_id`, see
--   src/vault/token.rs) under `token_key_id`. An ingester drops the personal fields of a
--   login whose user has a record erased after the login was sent.
-- * Quarantined messages carry the token of the user id their body names, where the body is
--   JSON with a string `user_id`, so an erasure finds them without opening every body.
-- * An erasure holds the erasure lock exclusively; each ingester batch holds it shared and
--   checks that no erasure arrived since the batch was made (src/ingest/writer.rs), so no
--   batch made before an erasure commits after it.

CREATE TABLE erasures (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    token_key_id  bigint NOT NULL,
    user_token    text NOT NULL,
    erased_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- The audit row of the erasure (the user id is there, as in user_logins).
    audit_id      bigint NOT NULL
);

ALTER TABLE quarantine
    ADD COLUMN user_token text,
    ADD COLUMN token_key_id bigint;
CREATE INDEX quarantine_user_token ON quarantine USING hash (user_token);

GRANT SELECT ON erasures TO pii_vault_ingester, pii_vault_keyadmin, pii_vault_door;
GRANT INSERT ON erasures TO pii_vault_door;
GRANT DELETE ON quarantine TO pii_vault_door;
GRANT SELECT (user_token, token_key_id) ON quarantine TO pii_vault_keyadmin;

-- Erasure (rotate-keys erase): removes a user's sealed values, their tokens unless kept
-- (`p_keep_tokens`: a documented legal hold), and the quarantined bodies that name them;
-- records the erasure under each (token key, token of the user id) pair the caller computed;
-- audits it; all in one transaction. Returns the audit row and the counts.
CREATE FUNCTION vault_erase_user(p_user_id text, p_reason text, p_actor text,
                                 p_keep_tokens boolean, p_token_keys bigint[],
                                 p_user_tokens text[])
    RETURNS TABLE (audit_id bigint, logins bigint, tokens bigint, quarantined bigint)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    ids bigint[];
    keys bigint[];
    n_tokens bigint := 0;
    n_quarantined bigint;
    audit bigint;
BEGIN
    IF NOT pg_has_role(session_user, 'pii_vault_keyadmin', 'MEMBER') THEN
        RAISE EXCEPTION 'erasure is for the key admin (pii_vault_keyadmin)'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF p_reason IS NULL OR btrim(p_reason) = '' THEN
        RAISE EXCEPTION 'an erasure needs a reason';
    END IF;
    IF cardinality(p_token_keys) IS DISTINCT FROM cardinality(p_user_tokens)
       OR cardinality(p_token_keys) = 0 THEN
        RAISE EXCEPTION 'an erasure needs the user''s token under each token key';
    END IF;
    -- Waits for every ingester batch in progress; later ones see this erasure.
    PERFORM pg_advisory_xact_lock(1886086522, 0);
    WITH erased AS (
        DELETE FROM login_vault v USING user_logins l
        WHERE l.id = v.login_id AND l.user_id = p_user_id
        RETURNING v.login_id, v.data_key_id)
    SELECT coalesce(array_agg(e.login_id ORDER BY e.login_id), '{}'),
           coalesce(array_agg(DISTINCT e.data_key_id), '{}')
    INTO ids, keys FROM erased e;
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
                          format('erase user_id = %s: sealed values of %s logins, tokens of %s, %s quarantined messages%s',
                                 p_user_id, cardinality(ids), n_tokens, n_quarantined,
                                 CASE WHEN p_keep_tokens THEN ' (tokens kept: legal hold)' ELSE '' END),
                          cardinality(ids), 'erased', ids, keys);
    INSERT INTO erasures (token_key_id, user_token, audit_id)
    SELECT t.key_id, t.token, audit FROM unnest(p_token_keys, p_user_tokens) AS t(key_id, token);
    RETURN QUERY SELECT audit, cardinality(ids)::bigint, n_tokens, n_quarantined;
END
$$;

GRANT CREATE ON SCHEMA public TO pii_vault_door;
ALTER FUNCTION vault_erase_user(text, text, text, boolean, bigint[], text[]) OWNER TO pii_vault_door;
REVOKE CREATE ON SCHEMA public FROM pii_vault_door;
REVOKE EXECUTE ON FUNCTION vault_erase_user(text, text, text, boolean, bigint[], text[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION vault_erase_user(text, text, text, boolean, bigint[], text[])
    TO pii_vault_keyadmin;
