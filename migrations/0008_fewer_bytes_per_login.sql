-- Fewer bytes per login: the same rows and the same queries, at about two thirds of the WAL
-- and disk per login (figures in README.md, "Performance").
--
-- * `user_logins.message_id` becomes a uuid: the 16-byte key of the message id. An id that is
--   a UUID in its canonical text form (SQS's, and a file line's: src/ingest/source.rs) is
--   that UUID; any other id is keyed by the first 16 bytes of its SHA-256 and keeps its text
--   in `message_id_text`. The text a value was sealed with (its associated data) is
--   therefore always `coalesce(message_id_text, message_id::text)`, and `message_key(id)`
--   finds a message by the id it was received with. The unique index shrinks from about 80
--   bytes per login (a file line's id carried its whole path) to about 40.
-- * `user_id` is only ever looked up by equality (unmask, erasure): a hash index (a 4-byte
--   hash per row) instead of a B-tree over the 36-character id.
-- * The vault's data-key index answers "which values does this key seal" (a rotation's walk,
--   and the proof that a key is unused before it is retired). Data keys are made one after
--   another as values are written, so the heap is already in key order: a BRIN index (one
--   min/max per 16 pages) answers the same questions from a few kilobytes, where the B-tree
--   cost about 70 bytes of WAL per login.
-- * Ingesters write with COPY (src/ingest/writer.rs): they reserve login ids themselves, so
--   they may use the id sequence.

CREATE FUNCTION message_key(id text) RETURNS uuid
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    SELECT CASE
        WHEN id ~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN id::uuid
        ELSE encode(substr(sha256(convert_to(id, 'UTF8')), 1, 16), 'hex')::uuid
    END
$$;

ALTER TABLE user_logins ADD COLUMN message_id_text text;
UPDATE user_logins SET message_id_text = message_id
    WHERE message_key(message_id)::text IS DISTINCT FROM message_id;
ALTER TABLE user_logins ALTER COLUMN message_id TYPE uuid USING message_key(message_id);
ALTER TABLE user_logins ADD CONSTRAINT user_logins_message_id_text_only_when_not_a_uuid
    CHECK (message_id_text IS NULL OR message_key(message_id_text) = message_id);

DROP INDEX user_logins_user_id;
CREATE INDEX user_logins_user_id ON user_logins USING hash (user_id);

DROP INDEX login_vault_data_key_id;
CREATE INDEX login_vault_data_key_id ON login_vault USING brin (data_key_id)
    WITH (pages_per_range = 16, autosummarize = on);

GRANT USAGE ON SEQUENCE user_logins_id_seq TO pii_vault_ingester;
GRANT SELECT (message_id_text) ON user_logins TO pii_vault_ingester;

-- The two doors that hand out sealed logins return the id the values were sealed with; the
-- rest of each is as in 0005.
CREATE OR REPLACE FUNCTION vault_reveal(p_question text, p_value text, p_purpose text,
                                        p_reason text, p_actor text)
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
        SELECT audit, 'handed-out'::text, l.id,
               coalesce(l.message_id_text, l.message_id::text), l.user_id::text,
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

CREATE OR REPLACE FUNCTION vault_rotation_page(p_operation text, p_after bigint, p_limit bigint,
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
        SELECT audit, l.id, coalesce(l.message_id_text, l.message_id::text), l.user_id::text,
               l.create_date, l.masked_ip::text, l.masked_device_id::text, l.token_key_id,
               v.data_key_id, v.sealed_ip, v.sealed_device_id
        FROM user_logins l LEFT JOIN login_vault v ON v.login_id = l.id
        WHERE l.id = ANY (ids)
        ORDER BY l.id;
END
$$;
