-- Erasures that last: an erasure survives token-key rotation, a restore, and typos.
-- (0006 and 0009 describe the erasure door as it was; its current definition is here.)
--
-- * An erasure record keeps, beside the token of the user id, the user id sealed under a key
--   derived from the same token key (`sealed_user_id`, docs/FORMAT.md §9), bound to the token.
--   A token-key rotation opens it and carries the record to the new key
--   (`vault_carry_erasures`); without it a record under a destroyed key would name nobody.
--   The ingester reads the tokens, never the sealed ids.
-- * Quarantined messages' user tokens move to the new token key too ('retokenize' pages of
--   the quarantine door, written by `vault_retokenize_quarantine`).
-- * No key is destroyed while anything names it: a trigger refuses to destroy a key that a
--   login, a sealed value, a quarantined message or an erasure record still names.
-- * The erasure door refuses a user id that names nothing (a typo would otherwise succeed,
--   irreversibly, in silence) unless the caller says the erasure is for messages still in
--   flight; it answers a dry run without changing anything; and it takes the erasure time of
--   a witnessed erasure re-applied after a restore (`rotate-keys reapply-erasures`).

ALTER TABLE erasures
    ADD COLUMN sealed_user_id bytea,
    ADD COLUMN tokens_kept boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN erasures.sealed_user_id IS
    'the user id sealed under the record''s token key (FORMAT.md §9); NULL for records made before 0014';

-- The ingester needs the tokens and the times, not the sealed ids.
REVOKE SELECT ON erasures FROM pii_vault_ingester;
GRANT SELECT (id, token_key_id, user_token, erased_at) ON erasures TO pii_vault_ingester;
GRANT DELETE ON erasures TO pii_vault_door;
GRANT UPDATE (user_token, token_key_id) ON quarantine TO pii_vault_door;

-- ----------------------------------------------------------- no key destroyed while named

-- Whether anything stored still names key `p_key`.
CREATE FUNCTION vault_key_named(p_key bigint) RETURNS boolean
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
    SELECT EXISTS (SELECT 1 FROM user_logins WHERE token_key_id = p_key)
        OR EXISTS (SELECT 1 FROM login_vault WHERE data_key_id = p_key)
        OR EXISTS (SELECT 1 FROM quarantine WHERE data_key_id = p_key OR token_key_id = p_key)
        OR EXISTS (SELECT 1 FROM erasures WHERE token_key_id = p_key)
$$;

CREATE FUNCTION vault_keys_named_are_kept() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
BEGIN
    IF NEW.state = 'destroyed' AND OLD.state <> 'destroyed' AND vault_key_named(OLD.id) THEN
        RAISE EXCEPTION 'key % is still named by stored rows or erasure records: it cannot be destroyed',
            OLD.id USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER vault_keys_named_are_kept BEFORE UPDATE OF state ON vault_keys
    FOR EACH ROW EXECUTE FUNCTION vault_keys_named_are_kept();

-- ------------------------------------------------------------------------- the erasure door

DROP FUNCTION vault_erase_user(text, text, text, boolean, bigint[], text[]);

-- Erasure (rotate-keys erase): removes a user's sealed values, their tokens unless kept
-- (`p_keep_tokens`: a legal hold), and the quarantined bodies that name them; records the
-- erasure under each (token key, token, sealed user id) the caller computed; audits it; all in
-- one transaction.
-- * A user id that no login and no quarantined message names is refused, unless `p_in_flight`
--   (an erasure recorded for messages still on the queue).
-- * `p_dry_run`: the counts only; nothing changes, nothing is locked or audited.
-- * `p_erased_at`: the time of the erasure (NULL: now); an earlier one re-applies a witnessed
--   erasure after a restore. Never later than now.
CREATE FUNCTION vault_erase_user(p_user_id text, p_reason text, p_actor text,
                                 p_keep_tokens boolean, p_token_keys bigint[],
                                 p_user_tokens text[], p_sealed_user_ids bytea[],
                                 p_in_flight boolean, p_dry_run boolean,
                                 p_erased_at timestamptz)
    RETURNS TABLE (audit_id bigint, logins bigint, tokens bigint, quarantined bigint,
                   erased_at timestamptz)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    ids bigint[];
    keys bigint[];
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
        FROM user_logins l LEFT JOIN login_vault v ON v.login_id = l.id
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

-- ------------------------------------------------------------- carrying to a new token key

-- Erasure records `p_ids` (under retiring token keys) carried to the active token key
-- `p_token_key`: the user's token and sealed id under it, computed by the caller from the
-- opened records. The new records keep the erasure's time and audit row; the old ones go, so
-- nothing names the retiring key any more. Ingester batches made before are refused (the
-- gate), as after an erasure.
CREATE FUNCTION vault_carry_erasures(p_token_key bigint, p_ids bigint[], p_user_tokens text[],
                                     p_sealed_user_ids bytea[])
    RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    IF NOT pg_has_role(session_user, 'pii_vault_keyadmin', 'MEMBER') THEN
        RAISE EXCEPTION 'erasure records are carried by the key admin (pii_vault_keyadmin)'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF cardinality(p_ids) IS DISTINCT FROM cardinality(p_user_tokens)
       OR cardinality(p_ids) IS DISTINCT FROM cardinality(p_sealed_user_ids)
       OR cardinality(p_ids) NOT BETWEEN 1 AND 10000
       OR array_position(p_sealed_user_ids, NULL) IS NOT NULL
       OR array_position(p_user_tokens, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'carry 1 to 10000 records, each with its token and sealed id'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM door_check_new_keys(ARRAY[p_token_key], 'token');
    UPDATE erasure_gate SET erasures = erasures + 1;
    IF (SELECT count(*) FROM erasures e
        WHERE e.id = ANY (p_ids) AND e.token_key_id <> p_token_key) <> cardinality(p_ids) THEN
        RAISE EXCEPTION 'only erasure records under another token key are carried, each once'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- A record already under the new key (an erasure made during the rotation) is kept once.
    INSERT INTO erasures (token_key_id, user_token, sealed_user_id, tokens_kept, erased_at,
                          audit_id)
    SELECT p_token_key, u.token, u.sealed, e.tokens_kept, e.erased_at, e.audit_id
    FROM unnest(p_ids, p_user_tokens, p_sealed_user_ids) AS u(id, token, sealed)
    JOIN erasures e ON e.id = u.id
    WHERE NOT EXISTS (SELECT 1 FROM erasures x
                      WHERE x.token_key_id = p_token_key AND x.user_token = u.token
                        AND x.erased_at >= e.erased_at)
    ORDER BY u.id;
    DELETE FROM erasures e WHERE e.id = ANY (p_ids);
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM audit_append(session_user, 'key-administration', 'rotate-keys token-key',
                         format('carried %s erasure records to token key %s', n, p_token_key),
                         0, 'carried-erasures', '{}', ARRAY[p_token_key]);
    RETURN n;
END
$$;

-- Step one over quarantined messages: 'reseal' and 'verify' as before, and 'retokenize': the
-- messages whose user token is under `p_keys` (their bodies are opened to recompute it).
CREATE OR REPLACE FUNCTION vault_quarantine_request(p_operation text, p_after bigint,
                                                    p_limit bigint, p_keys bigint[])
    RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    ids bigint[];
    keys bigint[];
    audit bigint;
    request bigint;
BEGIN
    IF NOT pg_has_role(session_user, 'pii_vault_keyadmin', 'MEMBER') THEN
        RAISE EXCEPTION 'rotation doors are for the key admin (pii_vault_keyadmin)'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF p_operation IN ('reseal', 'verify') THEN
        SELECT coalesce(array_agg(page.id ORDER BY page.id), '{}') INTO ids
        FROM (SELECT q.id FROM quarantine q WHERE q.id > p_after AND q.data_key_id = ANY (p_keys)
              ORDER BY q.id LIMIT p_limit FOR UPDATE SKIP LOCKED) AS page;
    ELSIF p_operation = 'retokenize' THEN
        SELECT coalesce(array_agg(page.id ORDER BY page.id), '{}') INTO ids
        FROM (SELECT q.id FROM quarantine q WHERE q.id > p_after AND q.token_key_id = ANY (p_keys)
              ORDER BY q.id LIMIT p_limit FOR UPDATE SKIP LOCKED) AS page;
    ELSE
        RAISE EXCEPTION 'unknown quarantine operation %', p_operation
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF cardinality(ids) = 0 THEN
        RETURN NULL;
    END IF;
    -- The keys the page's bodies are under (not the caller's list, which is unbounded).
    SELECT array_agg(DISTINCT q.data_key_id ORDER BY q.data_key_id) INTO keys
    FROM quarantine q WHERE q.id = ANY (ids);
    audit := audit_append(session_user, 'key-administration', 'rotate-keys ' || p_operation,
                          format('%s quarantine %s..%s', p_operation, ids[1], ids[cardinality(ids)]),
                          cardinality(ids), p_operation || '-quarantine', '{}', keys);
    INSERT INTO door_requests (door, operation, audit_id, outcome, ids, keys)
    VALUES ('quarantine', p_operation, audit, p_operation, ids, keys)
    RETURNING id INTO request;
    RETURN request;
END
$$;

CREATE OR REPLACE FUNCTION vault_quarantine_page(p_request bigint)
    RETURNS TABLE (audit_id bigint, id bigint, message_id text, data_key_id bigint,
                   sealed_body bytea)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    r door_requests := door_hand_out(p_request, 'quarantine');
BEGIN
    IF r.operation IN ('reseal', 'retokenize') THEN
        PERFORM 1 FROM quarantine q WHERE q.id = ANY (r.ids) ORDER BY q.id FOR UPDATE;
    END IF;
    RETURN QUERY
        SELECT r.audit_id, q.id, q.message_id, q.data_key_id, q.sealed_body
        FROM quarantine q WHERE q.id = ANY (r.ids) ORDER BY q.id;
END
$$;

-- Recomputed user tokens of quarantined messages handed out by a 'retokenize' page in this
-- transaction.
CREATE FUNCTION vault_retokenize_quarantine(p_request bigint, p_token_key bigint,
                                            p_ids bigint[], p_user_tokens text[])
    RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    r door_requests := door_in_hand(p_request, 'quarantine', 'retokenize', p_ids);
    n bigint;
BEGIN
    PERFORM door_check_new_keys(ARRAY[p_token_key], 'token');
    IF cardinality(p_ids) IS DISTINCT FROM cardinality(p_user_tokens)
       OR array_position(p_user_tokens, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'each message needs its user token' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE quarantine q SET user_token = u.token, token_key_id = p_token_key
    FROM unnest(p_ids, p_user_tokens) AS u(id, token)
    WHERE q.id = u.id;
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM audit_append(session_user, 'key-administration', 'rotate-keys retokenize',
                         format('retokenized %s quarantined messages of audit row %s', n, r.audit_id),
                         0, 'retokenized-quarantine', '{}', ARRAY[p_token_key]);
    RETURN n;
END
$$;

-- ------------------------------------------------------------------------------ privileges

GRANT CREATE ON SCHEMA public TO pii_vault_door;
ALTER FUNCTION vault_key_named(bigint) OWNER TO pii_vault_door;
ALTER FUNCTION vault_erase_user(text, text, text, boolean, bigint[], text[], bytea[], boolean,
                                boolean, timestamptz) OWNER TO pii_vault_door;
ALTER FUNCTION vault_carry_erasures(bigint, bigint[], text[], bytea[]) OWNER TO pii_vault_door;
ALTER FUNCTION vault_quarantine_request(text, bigint, bigint, bigint[]) OWNER TO pii_vault_door;
ALTER FUNCTION vault_quarantine_page(bigint) OWNER TO pii_vault_door;
ALTER FUNCTION vault_retokenize_quarantine(bigint, bigint, bigint[], text[]) OWNER TO pii_vault_door;
ALTER FUNCTION vault_keys_named_are_kept() OWNER TO pii_vault_door;
REVOKE CREATE ON SCHEMA public FROM pii_vault_door;

REVOKE EXECUTE ON FUNCTION
    vault_key_named(bigint), vault_keys_named_are_kept(),
    vault_erase_user(text, text, text, boolean, bigint[], text[], bytea[], boolean, boolean,
                     timestamptz),
    vault_carry_erasures(bigint, bigint[], text[], bytea[]),
    vault_retokenize_quarantine(bigint, bigint, bigint[], text[])
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    vault_key_named(bigint),
    vault_erase_user(text, text, text, boolean, bigint[], text[], bytea[], boolean, boolean,
                     timestamptz),
    vault_carry_erasures(bigint, bigint[], text[], bytea[]),
    vault_retokenize_quarantine(bigint, bigint, bigint[], text[])
    TO pii_vault_keyadmin;
