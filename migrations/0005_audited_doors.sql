-- The vault enforces its own promises: sealed values leave the database only through audited
-- door functions, and the audit chain is computed by the server.
--
-- * Doors are SECURITY DEFINER functions owned by `pii_vault_door`, a NOLOGIN role nobody
--   logs in as (erasure's door comes with the erasure records, in 0006). In one transaction a door checks its caller, appends the audit row (which
--   names every login it hands out), and only then returns sealed values and wrapped keys.
-- * No application role keeps SELECT on a sealed column (login_vault.sealed_*,
--   quarantine.sealed_body) nor on the wrapped keys the compliance officer would need to open
--   them. The key admin still reads vault_keys (it re-wraps keys), but reads no sealed value.
-- * Audit rows (format 2) get their id, time (clock_timestamp()), database user
--   (session_user), previous hash and hash inside the database, under the append lock. Only
--   the door role may insert; UPDATE, DELETE and TRUNCATE are refused for everyone, the table
--   owner included. What the owner can still do (disable the triggers) is caught by signed
--   checkpoints (`audit_checkpoints`, `unmask audit-checkpoint` / `verify-audit`).
--
-- The door role must own the functions, so whoever migrates must be a member of it:
-- scripts/services grants it to the migrating user; the block below does where it can.

DO $$
BEGIN
    CREATE ROLE pii_vault_door NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END $$;

DO $$
BEGIN
    IF NOT pg_has_role(current_user, 'pii_vault_door', 'MEMBER') THEN
        EXECUTE format('GRANT pii_vault_door TO %I', current_user);
    END IF;
END $$;

-- ---------------------------------------------------------------------- the audit, format 2

ALTER TABLE unmask_audit
    ADD COLUMN format     smallint NOT NULL DEFAULT 1,
    -- Why, from a fixed list (reveals), or the administrative duty (rotation, erasure).
    ADD COLUMN purpose    text,
    -- The logins whose sealed values were handed out (or erased), and the keys involved.
    ADD COLUMN login_ids  bigint[],
    ADD COLUMN key_ids    bigint[],
    DROP CONSTRAINT unmask_audit_reason_check,
    ADD CONSTRAINT unmask_audit_v2_complete CHECK (
        format = 1 AND btrim(reason) <> ''
        OR format = 2 AND purpose IS NOT NULL AND login_ids IS NOT NULL AND key_ids IS NOT NULL);
ALTER TABLE unmask_audit ALTER COLUMN format SET DEFAULT 2;

-- Reveal purposes an officer may name (`unmask --purpose`).
CREATE FUNCTION audit_reveal_purposes() RETURNS text[]
    LANGUAGE sql IMMUTABLE
    RETURN ARRAY['data-subject-access', 'fraud-investigation', 'security-incident',
                 'legal-request', 'account-recovery'];

-- One length-prefixed part: a u32 big-endian length, then the bytes (docs: audit encoding).
CREATE FUNCTION audit_part(part bytea) RETURNS bytea
    LANGUAGE sql IMMUTABLE STRICT
    RETURN int4send(octet_length(part)) || part;

CREATE FUNCTION audit_text(part text) RETURNS bytea
    LANGUAGE sql IMMUTABLE STRICT
    RETURN audit_part(convert_to(part, 'UTF8'));

-- Ids as consecutive i64 big-endian values, in array order.
CREATE FUNCTION audit_ids(ids bigint[]) RETURNS bytea
    LANGUAGE sql IMMUTABLE STRICT
    RETURN audit_part(coalesce(
        (SELECT string_agg(int8send(id), ''::bytea ORDER BY n) FROM unnest(ids) WITH ORDINALITY AS u(id, n)),
        ''::bytea));

-- SHA-256 of a format-2 row; src/audit.rs computes the same to verify.
CREATE FUNCTION audit_hash_v2(prev_hash bytea, at timestamptz, actor text, db_user text,
                              purpose text, reason text, question text, values_revealed integer,
                              outcome text, login_ids bigint[], key_ids bigint[])
    RETURNS bytea
    LANGUAGE sql IMMUTABLE STRICT
    RETURN sha256(
        audit_text('pii-vault/audit/v2')
        || audit_part(prev_hash)
        || audit_part(int8send((extract(epoch FROM at) * 1000000)::bigint))
        || audit_text(actor) || audit_text(db_user) || audit_text(purpose)
        || audit_text(reason) || audit_text(question)
        || audit_part(int4send(values_revealed)) || audit_text(outcome)
        || audit_ids(login_ids) || audit_ids(key_ids));

-- Appends one row and returns its id. Callable only by the door role (its owner): the doors
-- call it. Serialized by a transaction-scoped advisory lock, so concurrent doors form one chain.
CREATE FUNCTION audit_append(p_actor text, p_purpose text, p_reason text, p_question text,
                             p_values integer, p_outcome text, p_login_ids bigint[],
                             p_key_ids bigint[])
    RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    prev bytea;
    at_now timestamptz;
    new_id bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(8100121361964690548); -- "piivault", as in format 1
    SELECT hash INTO prev FROM unmask_audit ORDER BY id DESC LIMIT 1;
    prev := coalesce(prev, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea);
    at_now := clock_timestamp();
    INSERT INTO unmask_audit (format, at, actor, db_user, purpose, reason, question,
                              values_revealed, outcome, login_ids, key_ids, prev_hash, hash)
    VALUES (2, at_now, p_actor, session_user, p_purpose, p_reason, p_question, p_values,
            p_outcome, p_login_ids, p_key_ids, prev,
            audit_hash_v2(prev, at_now, p_actor, session_user, p_purpose, p_reason, p_question,
                          p_values, p_outcome, p_login_ids, p_key_ids))
    RETURNING id INTO new_id;
    RETURN new_id;
END
$$;

-- Append-only, for everyone: rows come from the door role; nothing is changed or removed.
CREATE FUNCTION audit_refuse_change() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE FUNCTION audit_only_through_doors() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    IF current_user <> 'pii_vault_door' THEN
        RAISE EXCEPTION 'unmask_audit rows are appended only by the vault''s door functions'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER unmask_audit_only_through_doors BEFORE INSERT ON unmask_audit
    FOR EACH ROW EXECUTE FUNCTION audit_only_through_doors();
CREATE TRIGGER unmask_audit_append_only BEFORE UPDATE OR DELETE ON unmask_audit
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER unmask_audit_no_truncate BEFORE TRUNCATE ON unmask_audit
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();

-- Checkpoints: (last audit id, its hash, time) signed with a KMS asymmetric key
-- (ECC_NIST_P256) that only the checkpoint signer may use. Anyone who can read the audit may
-- add one: a row whose signature does not verify under the pinned public key counts as
-- tampering, so the right to insert gives nothing.
CREATE TABLE audit_checkpoints (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    last_audit_id  bigint NOT NULL,
    head_hash      bytea NOT NULL,
    signed_at      timestamptz NOT NULL,
    kms_key_id     text NOT NULL,
    -- DER-encoded ECDSA P-256 signature over the canonical encoding (docs: audit encoding).
    signature      bytea NOT NULL,
    created_by     text NOT NULL DEFAULT session_user
);
CREATE TRIGGER audit_checkpoints_append_only BEFORE UPDATE OR DELETE ON audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER audit_checkpoints_no_truncate BEFORE TRUNCATE ON audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();

-- -------------------------------------------------------------------------------- the doors

-- A compliance officer's reveal. Anyone may call it; every call leaves an audit row. A
-- refused call (role, purpose, reason) or one that finds nothing returns one row with its
-- outcome and NULL values; a granted one returns each matching login with its sealed values
-- and the wrapped keys needed to open them, outcome 'handed-out'. The caller then records
-- what came of it with vault_reveal_outcome.
CREATE FUNCTION vault_reveal(p_question text, p_value text, p_purpose text, p_reason text,
                             p_actor text)
    RETURNS TABLE (audit_id bigint, outcome text, login_id bigint, message_id text,
                   user_id text, device_type text, create_date date, masked_ip text,
                   masked_device_id text, token_key_id bigint, token_key_kms text,
                   token_key_wrapped bytea, data_key_id bigint, data_key_kms text,
                   data_key_wrapped bytea, sealed_ip bytea, sealed_device_id bytea)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    question text := format('%s = %s', p_question, p_value);
    refusal text;
    ids bigint[];
    keys bigint[];
    audit bigint;
BEGIN
    IF NOT pg_has_role(session_user, 'pii_vault_compliance', 'MEMBER') THEN
        refusal := 'refused-role';
    ELSIF p_purpose IS NULL OR NOT p_purpose = ANY (audit_reveal_purposes()) THEN
        refusal := 'refused-purpose';
    ELSIF p_reason IS NULL OR btrim(p_reason) = '' THEN
        refusal := 'refused-reason';
    ELSIF p_question NOT IN ('user_id', 'masked_ip', 'masked_device_id') OR p_value IS NULL THEN
        refusal := 'refused-question';
    END IF;
    IF refusal IS NOT NULL THEN
        audit := audit_append(coalesce(p_actor, ''), coalesce(p_purpose, ''),
                              coalesce(p_reason, ''), question, 0, refusal, '{}', '{}');
        RETURN QUERY SELECT audit, refusal, NULL::bigint, NULL::text, NULL::text, NULL::text,
            NULL::date, NULL::text, NULL::text, NULL::bigint, NULL::text, NULL::bytea,
            NULL::bigint, NULL::text, NULL::bytea, NULL::bytea, NULL::bytea;
        RETURN;
    END IF;

    SELECT coalesce(array_agg(l.id ORDER BY l.id), '{}') INTO ids
    FROM user_logins l
    WHERE CASE p_question
            WHEN 'user_id' THEN l.user_id = p_value
            WHEN 'masked_ip' THEN l.masked_ip = p_value
            ELSE l.masked_device_id = p_value
          END;
    SELECT coalesce(array_agg(DISTINCT k ORDER BY k), '{}') INTO keys
    FROM (SELECT l.token_key_id FROM user_logins l WHERE l.id = ANY (ids)
          UNION SELECT v.data_key_id FROM login_vault v WHERE v.login_id = ANY (ids)) AS used(k);

    IF cardinality(ids) = 0 THEN
        audit := audit_append(p_actor, p_purpose, p_reason, question, 0, 'nothing-found',
                              '{}', '{}');
        RETURN QUERY SELECT audit, 'nothing-found'::text, NULL::bigint, NULL::text, NULL::text,
            NULL::text, NULL::date, NULL::text, NULL::text, NULL::bigint, NULL::text,
            NULL::bytea, NULL::bigint, NULL::text, NULL::bytea, NULL::bytea, NULL::bytea;
        RETURN;
    END IF;

    audit := audit_append(p_actor, p_purpose, p_reason, question, 0, 'handed-out', ids, keys);
    RETURN QUERY
        SELECT audit, 'handed-out'::text, l.id, l.message_id, l.user_id::text,
               l.device_type::text, l.create_date, l.masked_ip::text, l.masked_device_id::text,
               l.token_key_id, tk.kms_key_id, tk.wrapped_key, v.data_key_id, dk.kms_key_id,
               dk.wrapped_key, v.sealed_ip, v.sealed_device_id
        FROM user_logins l
        JOIN vault_keys tk ON tk.id = l.token_key_id
        LEFT JOIN login_vault v ON v.login_id = l.id
        LEFT JOIN vault_keys dk ON dk.id = v.data_key_id
        WHERE l.id = ANY (ids)
        ORDER BY l.create_date, l.id;
END
$$;

-- What came of a reveal: 'revealed' (with how many values), or why nothing was shown
-- ('integrity-failure', 'kms-refused', 'keys-unavailable'). Only the officer who received
-- the hand-out may record its outcome, once.
CREATE FUNCTION vault_reveal_outcome(p_handout bigint, p_outcome text, p_values integer)
    RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    handout unmask_audit%ROWTYPE;
BEGIN
    SELECT * INTO handout FROM unmask_audit WHERE id = p_handout;
    IF NOT FOUND OR handout.outcome <> 'handed-out' OR handout.db_user <> session_user THEN
        RAISE EXCEPTION 'audit row % is not a hand-out to %', p_handout, session_user
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_outcome NOT IN ('revealed', 'integrity-failure', 'kms-refused', 'keys-unavailable') THEN
        RAISE EXCEPTION 'unknown reveal outcome %', p_outcome;
    END IF;
    IF EXISTS (SELECT 1 FROM unmask_audit
               WHERE question = format('outcome of audit row %s', p_handout)) THEN
        RAISE EXCEPTION 'the outcome of audit row % is already recorded', p_handout;
    END IF;
    RETURN audit_append(handout.actor, handout.purpose, handout.reason,
                        format('outcome of audit row %s', p_handout),
                        CASE WHEN p_outcome = 'revealed' THEN p_values ELSE 0 END, p_outcome,
                        CASE WHEN p_outcome = 'revealed' THEN handout.login_ids ELSE '{}' END,
                        handout.key_ids);
END
$$;

-- The key admin's walks over sealed logins, one page per call (rotate-keys): 'reseal' pages
-- through the logins sealed under `p_keys` and locks their vault rows; 'retokenize' pages
-- through the logins tokenized under `p_keys` (with their sealed values where not erased)
-- and locks the login rows; 'verify' pages through every login. Locks are SKIP LOCKED: rows
-- an ingester is writing are left to a later pass. One audit row per page.
CREATE FUNCTION vault_rotation_page(p_operation text, p_after bigint, p_limit bigint,
                                    p_keys bigint[])
    RETURNS TABLE (audit_id bigint, login_id bigint, message_id text, user_id text,
                   create_date date, masked_ip text, masked_device_id text,
                   token_key_id bigint, data_key_id bigint, sealed_ip bytea,
                   sealed_device_id bytea)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    ids bigint[];
    keys bigint[];
    audit bigint;
BEGIN
    IF NOT pg_has_role(session_user, 'pii_vault_keyadmin', 'MEMBER') THEN
        RAISE EXCEPTION 'rotation doors are for the key admin (pii_vault_keyadmin)'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF p_operation = 'reseal' THEN
        SELECT coalesce(array_agg(page.login_id ORDER BY page.login_id), '{}') INTO ids
        FROM (SELECT v.login_id FROM login_vault v
              WHERE v.login_id > p_after AND v.data_key_id = ANY (p_keys)
              ORDER BY v.login_id LIMIT p_limit FOR UPDATE SKIP LOCKED) AS page;
    ELSIF p_operation = 'retokenize' THEN
        SELECT coalesce(array_agg(page.id ORDER BY page.id), '{}') INTO ids
        FROM (SELECT l.id FROM user_logins l
              WHERE l.id > p_after AND l.token_key_id = ANY (p_keys)
              ORDER BY l.id LIMIT p_limit FOR UPDATE SKIP LOCKED) AS page;
    ELSIF p_operation = 'verify' THEN
        SELECT coalesce(array_agg(page.id ORDER BY page.id), '{}') INTO ids
        FROM (SELECT l.id FROM user_logins l WHERE l.id > p_after
              ORDER BY l.id LIMIT p_limit) AS page;
    ELSE
        RAISE EXCEPTION 'unknown rotation operation %', p_operation;
    END IF;
    IF cardinality(ids) = 0 THEN
        RETURN;
    END IF;
    SELECT coalesce(array_agg(DISTINCT k ORDER BY k), '{}') INTO keys
    FROM (SELECT l.token_key_id FROM user_logins l WHERE l.id = ANY (ids)
          UNION SELECT v.data_key_id FROM login_vault v WHERE v.login_id = ANY (ids)) AS used(k);
    audit := audit_append(session_user, 'key-administration', 'rotate-keys ' || p_operation,
                          format('%s logins %s..%s', p_operation, ids[1], ids[cardinality(ids)]),
                          cardinality(ids), p_operation, ids, keys);
    RETURN QUERY
        SELECT audit, l.id, l.message_id, l.user_id::text, l.create_date, l.masked_ip::text,
               l.masked_device_id::text, l.token_key_id, v.data_key_id, v.sealed_ip,
               v.sealed_device_id
        FROM user_logins l LEFT JOIN login_vault v ON v.login_id = l.id
        WHERE l.id = ANY (ids)
        ORDER BY l.id;
END
$$;

-- The key admin's walk over quarantined bodies sealed under `p_keys`, one page per call,
-- audited: 'reseal' locks the page (SKIP LOCKED), 'verify' only reads it.
CREATE FUNCTION vault_quarantine_page(p_operation text, p_after bigint, p_limit bigint,
                                      p_keys bigint[])
    RETURNS TABLE (audit_id bigint, id bigint, message_id text, data_key_id bigint,
                   sealed_body bytea)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    ids bigint[];
    audit bigint;
BEGIN
    IF NOT pg_has_role(session_user, 'pii_vault_keyadmin', 'MEMBER') THEN
        RAISE EXCEPTION 'rotation doors are for the key admin (pii_vault_keyadmin)'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF p_operation = 'reseal' THEN
        SELECT coalesce(array_agg(page.id ORDER BY page.id), '{}') INTO ids
        FROM (SELECT q.id FROM quarantine q WHERE q.id > p_after AND q.data_key_id = ANY (p_keys)
              ORDER BY q.id LIMIT p_limit FOR UPDATE SKIP LOCKED) AS page;
    ELSIF p_operation = 'verify' THEN
        SELECT coalesce(array_agg(page.id ORDER BY page.id), '{}') INTO ids
        FROM (SELECT q.id FROM quarantine q WHERE q.id > p_after AND q.data_key_id = ANY (p_keys)
              ORDER BY q.id LIMIT p_limit) AS page;
    ELSE
        RAISE EXCEPTION 'unknown quarantine operation %', p_operation;
    END IF;
    IF cardinality(ids) = 0 THEN
        RETURN;
    END IF;
    audit := audit_append(session_user, 'key-administration', 'rotate-keys ' || p_operation,
                          format('%s quarantine %s..%s', p_operation, ids[1], ids[cardinality(ids)]),
                          cardinality(ids), p_operation || '-quarantine', '{}', p_keys);
    RETURN QUERY
        SELECT audit, q.id, q.message_id, q.data_key_id, q.sealed_body
        FROM quarantine q WHERE q.id = ANY (ids) ORDER BY q.id;
END
$$;

-- ------------------------------------------------------------------------------- privileges

GRANT SELECT ON user_logins, login_vault, quarantine, vault_keys, unmask_audit TO pii_vault_door;
GRANT INSERT ON unmask_audit TO pii_vault_door;
GRANT UPDATE (masked_ip, masked_device_id) ON user_logins TO pii_vault_door;
GRANT DELETE ON login_vault TO pii_vault_door;
-- SELECT ... FOR UPDATE, with which the rotation doors lock their pages, needs an UPDATE right.
GRANT UPDATE (data_key_id) ON login_vault, quarantine TO pii_vault_door;

-- Owned by the door role, so they run with its rights and nobody else's. (A new owner needs
-- CREATE on the schema at the moment of the change, not after.)
GRANT CREATE ON SCHEMA public TO pii_vault_door;
ALTER FUNCTION audit_append(text, text, text, text, integer, text, bigint[], bigint[])
    OWNER TO pii_vault_door;
ALTER FUNCTION vault_reveal(text, text, text, text, text) OWNER TO pii_vault_door;
ALTER FUNCTION vault_reveal_outcome(bigint, text, integer) OWNER TO pii_vault_door;
ALTER FUNCTION vault_rotation_page(text, bigint, bigint, bigint[]) OWNER TO pii_vault_door;
ALTER FUNCTION vault_quarantine_page(text, bigint, bigint, bigint[]) OWNER TO pii_vault_door;

REVOKE CREATE ON SCHEMA public FROM pii_vault_door;

REVOKE EXECUTE ON FUNCTION audit_append(text, text, text, text, integer, text, bigint[], bigint[])
    FROM PUBLIC;
-- Everyone may knock on the reveal door: a refusal is audited too.
GRANT EXECUTE ON FUNCTION vault_reveal(text, text, text, text, text) TO PUBLIC;
REVOKE EXECUTE ON FUNCTION vault_reveal_outcome(bigint, text, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION vault_reveal_outcome(bigint, text, integer) TO pii_vault_compliance;
REVOKE EXECUTE ON FUNCTION vault_rotation_page(text, bigint, bigint, bigint[]) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION vault_quarantine_page(text, bigint, bigint, bigint[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION vault_rotation_page(text, bigint, bigint, bigint[]),
                          vault_quarantine_page(text, bigint, bigint, bigint[]) TO pii_vault_keyadmin;

-- compliance: tokens and the audit; sealed values and wrapped keys only through the door.
REVOKE ALL ON login_vault, vault_keys FROM pii_vault_compliance;
REVOKE INSERT ON unmask_audit FROM pii_vault_compliance;
GRANT SELECT ON audit_checkpoints TO pii_vault_compliance;
GRANT INSERT ON audit_checkpoints TO pii_vault_compliance;

-- key admin: keys (it re-wraps them), the non-sealed columns it walks by, and writes of
-- re-sealed values; reading a sealed value goes through the rotation doors.
REVOKE ALL ON login_vault, quarantine FROM pii_vault_keyadmin;
REVOKE INSERT ON unmask_audit FROM pii_vault_keyadmin;
GRANT SELECT (login_id, data_key_id) ON login_vault TO pii_vault_keyadmin;
GRANT UPDATE (data_key_id, sealed_ip, sealed_device_id) ON login_vault TO pii_vault_keyadmin;
GRANT SELECT (id, message_id, reason, body_bytes, data_key_id, sent_at, quarantined_at)
    ON quarantine TO pii_vault_keyadmin;
GRANT UPDATE (data_key_id, sealed_body) ON quarantine TO pii_vault_keyadmin;
GRANT SELECT, INSERT ON audit_checkpoints TO pii_vault_keyadmin;
