-- Keys where they belong. No officer holds the token key, and every wrapped key leaves the
-- table through an audited door. (0009 describes the reveal door as it was; its current
-- definition is here.)
--
-- * Format versions. `vault_keys.format` records the format a key serves: a data key of format
--   2 seals values that carry a key commitment derived from the key itself (docs/FORMAT.md §4),
--   so opening one needs no token key; format 1 keys (every key made before this migration)
--   seal values whose commitment is their token. New data keys are made in format 2, and a
--   data-key rotation moves format 1 values to it. Token keys are format 1 (the token format).
-- * The reveal door hands out data keys only: no token key, so a compliance officer can no
--   longer test guesses against the analysts' tokens offline.
-- * Wrapped keys through a door. No login role reads `vault_keys.wrapped_key`: the ingester
--   (token keys: it must tokenize) and the key admin (any key: a rotation opens what it moves)
--   ask `vault_key_request`, which appends an audit row naming the keys, then
--   `vault_key_hand_out` against that committed request, as the other doors of 0009 do.

-- ----------------------------------------------------------------------------- key formats

ALTER TABLE vault_keys ADD COLUMN format smallint NOT NULL DEFAULT 1;
ALTER TABLE vault_keys ADD CONSTRAINT vault_keys_format_check
    CHECK (format = 1 OR (format = 2 AND purpose = 'data'));

-- ----------------------------------------------------------------- wrapped keys, audited

ALTER TABLE door_requests DROP CONSTRAINT door_requests_door_check;
ALTER TABLE door_requests ADD CONSTRAINT door_requests_door_check
    CHECK (door IN ('reveal', 'rotation', 'quarantine', 'keys'));

-- Step one: the keys `p_keys` (at most 100), for `p_reason` (what the caller is doing, e.g.
-- `rotate-keys token-key`). The ingester may ask for token keys only; the key admin, and the
-- table owner (which can read the table anyway), for any key. Appends the audit row and
-- returns the request id.
CREATE FUNCTION vault_key_request(p_keys bigint[], p_reason text)
    RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    lim record := audit_limits();
    keys bigint[];
    purposes text[];
    audit bigint;
    request bigint;
BEGIN
    IF p_keys IS NULL OR cardinality(p_keys) NOT BETWEEN 1 AND 100 THEN
        RAISE EXCEPTION 'ask for 1 to 100 keys' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_reason IS NULL OR btrim(p_reason) = '' OR length(p_reason) > lim.reason THEN
        RAISE EXCEPTION 'a key request needs a reason of at most % characters', lim.reason
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT coalesce(array_agg(k.id ORDER BY k.id), '{}'),
           coalesce(array_agg(DISTINCT k.purpose), '{}')
    INTO keys, purposes
    FROM vault_keys k WHERE k.id = ANY (p_keys);
    IF pg_has_role(session_user, 'pii_vault_keyadmin', 'MEMBER')
       OR pg_has_role(session_user, (SELECT c.relowner FROM pg_class c
                                     WHERE c.oid = 'public.vault_keys'::regclass), 'MEMBER') THEN
        NULL;
    ELSIF pg_has_role(session_user, 'pii_vault_ingester', 'MEMBER') THEN
        IF purposes <> '{}' AND purposes <> '{token}' THEN
            RAISE EXCEPTION 'the ingester may unwrap token keys only'
                USING ERRCODE = 'insufficient_privilege';
        END IF;
    ELSE
        RAISE EXCEPTION 'wrapped keys are for the ingester and the key admin'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    audit := audit_append(session_user, 'key-administration', p_reason,
                          format('unwrap keys %s', keys), 0, 'keys-handed-out', '{}', keys);
    INSERT INTO door_requests (door, operation, audit_id, outcome, keys)
    VALUES ('keys', 'unwrap', audit, 'handed-out', keys)
    RETURNING id INTO request;
    RETURN request;
END
$$;

-- Step two: the requested keys (a destroyed one with NULL wrapped bytes).
CREATE FUNCTION vault_key_hand_out(p_request bigint)
    RETURNS TABLE (audit_id bigint, key_id bigint, purpose text, format smallint,
                   kms_key_id text, wrapped_key bytea)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    r door_requests := door_hand_out(p_request, 'keys');
BEGIN
    RETURN QUERY
        SELECT r.audit_id, k.id, k.purpose, k.format, k.kms_key_id, k.wrapped_key
        FROM vault_keys k WHERE k.id = ANY (r.keys) ORDER BY k.id;
END
$$;

-- The roles that read the key table keep every column but the wrapped bytes. (A table-level
-- REVOKE takes column-level grants with it; the writes of 0002 stay.)
REVOKE SELECT ON vault_keys FROM pii_vault_ingester, pii_vault_keyadmin;
GRANT SELECT (id, purpose, state, kms_key_id, created_by, created_at, retired_at,
              window_starts, format)
    ON vault_keys TO pii_vault_ingester, pii_vault_keyadmin;

-- ----------------------------------------------------------------------------- the reveal

DROP FUNCTION vault_reveal(bigint);

-- Step two of a reveal (step one, `vault_reveal_request`, is 0009's): each login the committed
-- request names, with its sealed values and the wrapped data key that opens them, and that
-- key's format. No token key.
CREATE FUNCTION vault_reveal(p_request bigint)
    RETURNS TABLE (audit_id bigint, outcome text, login_id bigint, message_id text,
                   user_id text, device_type text, create_date date, masked_ip text,
                   masked_device_id text, data_key_id bigint, data_key_format smallint,
                   data_key_kms text, data_key_wrapped bytea, sealed_ip bytea,
                   sealed_device_id bytea)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    r door_requests := door_hand_out(p_request, 'reveal');
BEGIN
    IF r.outcome <> 'handed-out' THEN
        RETURN QUERY SELECT r.audit_id, r.outcome, NULL::bigint, NULL::text, NULL::text,
            NULL::text, NULL::date, NULL::text, NULL::text, NULL::bigint, NULL::smallint,
            NULL::text, NULL::bytea, NULL::bytea, NULL::bytea;
        RETURN;
    END IF;
    RETURN QUERY
        SELECT r.audit_id, 'handed-out'::text, l.id,
               coalesce(l.message_id_text, l.message_id::text), l.user_id::text,
               l.device_type::text, l.create_date, l.masked_ip::text, l.masked_device_id::text,
               v.data_key_id, dk.format, dk.kms_key_id, dk.wrapped_key, v.sealed_ip,
               v.sealed_device_id
        FROM user_logins l
        LEFT JOIN login_vault v ON v.login_id = l.id
        LEFT JOIN vault_keys dk ON dk.id = v.data_key_id
        WHERE l.id = ANY (r.ids)
        ORDER BY l.create_date, l.id;
END
$$;

-- ------------------------------------------------------------------------------ privileges

GRANT CREATE ON SCHEMA public TO pii_vault_door;
ALTER FUNCTION vault_key_request(bigint[], text) OWNER TO pii_vault_door;
ALTER FUNCTION vault_key_hand_out(bigint) OWNER TO pii_vault_door;
ALTER FUNCTION vault_reveal(bigint) OWNER TO pii_vault_door;
REVOKE CREATE ON SCHEMA public FROM pii_vault_door;

REVOKE EXECUTE ON FUNCTION vault_key_request(bigint[], text), vault_key_hand_out(bigint),
    vault_reveal(bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION vault_reveal(bigint) TO PUBLIC;
GRANT EXECUTE ON FUNCTION vault_key_request(bigint[], text), vault_key_hand_out(bigint)
    TO pii_vault_ingester, pii_vault_keyadmin, CURRENT_USER;
