-- A hand-out leaves its audit row or nothing: the doors that hand out sealed values or wrapped
-- keys work in two steps, the audit chain cannot fork, and the locks the vault depends on can
-- be taken only by the roles that need them. (0005-0008 describe the doors as they were; this
-- file is where their current definitions live.)
--
-- * Two steps. Step one (`vault_reveal_request`, `vault_rotation_request`,
--   `vault_quarantine_request`) decides, appends the audit row naming every login it will hand
--   out, and returns only a request id. Step two (`vault_reveal`, `vault_rotation_page`,
--   `vault_quarantine_page`) hands out only against a request of the same database user whose
--   transaction committed before (`pg_xact_status`), within two minutes, once. A caller who
--   rolls back step one has learnt nothing, and whatever step two says (a hand-out or a
--   refusal) stands on an audit row that already committed. A hand-out whose own transaction
--   is rolled back may be asked again until the request expires: it hands out the same logins
--   under the same committed audit row.
-- * Knocks. A caller who holds no compliance role appends nothing to the chain (so cannot hold
--   its lock): its request is recorded in `door_requests` (bounded in size), and step two
--   answers `refused-role` only once that record committed. Every reveal request, knock or
--   not, also goes to the server log (RAISE LOG), which a rollback does not take back.
-- * One chain. `audit_append` takes the single row of `audit_head` FOR UPDATE: under READ
--   COMMITTED appends queue behind each other; under REPEATABLE READ or SERIALIZABLE a caller
--   whose snapshot predates the newest append gets a serialization failure instead of forking
--   the chain. A unique index on `prev_hash` makes a second successor of one row impossible
--   even past the function.
-- * Writes by the key admin. It keeps no UPDATE on user_logins, login_vault or quarantine:
--   re-sealed values and recomputed tokens go through `vault_reseal_logins`,
--   `vault_retokenize_logins` and `vault_reseal_quarantine`, which accept only logins the
--   caller holds in hand (handed out by step two in the same transaction) and audit the write.
-- * Locks. No advisory lock remains (any login may take any advisory lock): the erasure gate
--   and the key-use lock are row locks on tables only the vault's roles may lock, taken
--   through `vault_hold_erasures` and `vault_hold_keys` by the ingester.
-- * Inputs. Reason at most 1000 characters, actor at most 128, a question's value at most 256;
--   a NULL or unknown question is refused and audited.

-- ------------------------------------------------------------------------ the chain's head

CREATE TABLE audit_head (
    only_row  boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    last_id   bigint,
    hash      bytea NOT NULL
);
INSERT INTO audit_head (last_id, hash)
SELECT max(id),
       coalesce((SELECT hash FROM unmask_audit ORDER BY id DESC LIMIT 1),
                '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea)
FROM unmask_audit;

-- Rows appended from now on: one successor per row, whoever inserts.
DO $$
BEGIN
    EXECUTE format('CREATE UNIQUE INDEX unmask_audit_one_successor ON unmask_audit (prev_hash)
                    WHERE id > %s', coalesce((SELECT max(id) FROM unmask_audit), 0));
END $$;

-- Sizes an audit row accepts (README, "Audit").
CREATE FUNCTION audit_limits(OUT reason integer, OUT actor integer, OUT value integer)
    LANGUAGE sql IMMUTABLE
AS $$ SELECT 1000, 128, 256 $$;

CREATE OR REPLACE FUNCTION audit_append(p_actor text, p_purpose text, p_reason text,
                                        p_question text, p_values integer, p_outcome text,
                                        p_login_ids bigint[], p_key_ids bigint[])
    RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    prev bytea;
    at_now timestamptz;
    new_hash bytea;
    new_id bigint;
BEGIN
    IF length(p_reason) > (audit_limits()).reason OR length(p_actor) > (audit_limits()).actor THEN
        RAISE EXCEPTION 'an audit reason takes at most % characters, an actor %',
            (audit_limits()).reason, (audit_limits()).actor
            USING ERRCODE = 'string_data_right_truncation';
    END IF;
    SELECT hash INTO prev FROM audit_head FOR UPDATE;
    at_now := clock_timestamp();
    new_hash := audit_hash_v2(prev, at_now, p_actor, session_user, p_purpose, p_reason,
                              p_question, p_values, p_outcome, p_login_ids, p_key_ids);
    INSERT INTO unmask_audit (format, at, actor, db_user, purpose, reason, question,
                              values_revealed, outcome, login_ids, key_ids, prev_hash, hash)
    VALUES (2, at_now, p_actor, session_user, p_purpose, p_reason, p_question, p_values,
            p_outcome, p_login_ids, p_key_ids, prev, new_hash)
    RETURNING id INTO new_id;
    UPDATE audit_head SET last_id = new_id, hash = new_hash;
    RETURN new_id;
END
$$;

-- --------------------------------------------------------------------------------- requests

-- Every request to a door that hands out: who asked, what was decided, the audit row that
-- records it (NULL for a knock by a caller without the door's role, kept here instead), and
-- what may be handed out against it.
CREATE TABLE door_requests (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    door        text NOT NULL CHECK (door IN ('reveal', 'rotation', 'quarantine')),
    operation   text NOT NULL,
    db_user     text NOT NULL DEFAULT session_user,
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    xact        xid8 NOT NULL DEFAULT pg_current_xact_id(),
    expires_at  timestamptz NOT NULL DEFAULT clock_timestamp() + interval '2 minutes',
    audit_id    bigint,
    -- The decision: 'handed-out' (or a rotation operation), or why not.
    outcome     text NOT NULL,
    ids         bigint[] NOT NULL DEFAULT '{}',
    keys        bigint[] NOT NULL DEFAULT '{}',
    -- A knock's question, bounded.
    detail      text CHECK (length(detail) <= 2000),
    -- The transaction that received the hand-out.
    used_xact   xid8
);

-- Rows of a table the doors alone write.
CREATE FUNCTION vault_only_through_doors() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    IF current_user <> 'pii_vault_door' THEN
        RAISE EXCEPTION '% rows are written only by the vault''s door functions', TG_TABLE_NAME
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER door_requests_only_through_doors BEFORE INSERT OR UPDATE ON door_requests
    FOR EACH ROW EXECUTE FUNCTION vault_only_through_doors();
CREATE TRIGGER door_requests_kept BEFORE DELETE ON door_requests
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER door_requests_no_truncate BEFORE TRUNCATE ON door_requests
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();

-- The request `p_request` of `p_door`, for the caller, checked to be handed out now: it is the
-- caller's, its transaction committed before this one, it has not expired, and no committed
-- transaction received it. Marks it received by this transaction.
CREATE FUNCTION door_hand_out(p_request bigint, p_door text) RETURNS door_requests
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    r door_requests;
BEGIN
    SELECT * INTO r FROM door_requests WHERE id = p_request AND door = p_door FOR UPDATE;
    IF NOT FOUND OR r.db_user <> session_user THEN
        RAISE EXCEPTION 'request % is not a % request of %', p_request, p_door, session_user
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF clock_timestamp() > r.expires_at THEN
        RAISE EXCEPTION 'request % has expired: ask again', p_request
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF pg_xact_status(r.xact) IS DISTINCT FROM 'committed' THEN
        RAISE EXCEPTION 'request % has not committed: commit it, then ask for the hand-out', p_request
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF r.used_xact IS NOT NULL THEN
        RAISE EXCEPTION 'request % was handed out already', p_request
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE door_requests SET used_xact = pg_current_xact_id() WHERE id = p_request;
    RETURN r;
END
$$;

-- The request `p_request` of `p_door` and `p_operation`, handed out in this transaction, with
-- `p_ids` among the rows it named: what a write door may change.
CREATE FUNCTION door_in_hand(p_request bigint, p_door text, p_operation text, p_ids bigint[])
    RETURNS door_requests
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    r door_requests;
BEGIN
    SELECT * INTO r FROM door_requests WHERE id = p_request;
    -- A request never handed out has no used_xact, and a transaction that has written nothing
    -- yet has no id: both NULL, which must not count as a match.
    IF NOT FOUND OR r.door <> p_door OR r.operation <> p_operation OR r.db_user <> session_user
       OR NOT coalesce(r.used_xact = pg_current_xact_id_if_assigned(), false)
       OR clock_timestamp() > r.expires_at THEN
        RAISE EXCEPTION 'request % was not handed out to this transaction for %', p_request,
            p_operation USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_ids IS NULL OR NOT p_ids <@ r.ids OR cardinality(p_ids) > cardinality(r.ids) THEN
        RAISE EXCEPTION 'only rows handed out by request % may be written, each once', p_request
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN r;
END
$$;

-- ---------------------------------------------------------------------------- the reveal

DROP FUNCTION vault_reveal(text, text, text, text, text);

-- Step one of a reveal. Anyone may call it; it returns a request id and nothing else.
CREATE FUNCTION vault_reveal_request(p_question text, p_value text, p_purpose text,
                                     p_reason text, p_actor text)
    RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    lim record := audit_limits();
    question text := format('%s = %s', coalesce(left(p_question, 64), '(none)'),
                            coalesce(left(p_value, lim.value), '(none)'));
    refusal text;
    ids bigint[] := '{}';
    keys bigint[] := '{}';
    outcome text;
    audit bigint;
    request bigint;
BEGIN
    IF NOT pg_has_role(session_user, 'pii_vault_compliance', 'MEMBER') THEN
        INSERT INTO door_requests (door, operation, outcome, detail)
        VALUES ('reveal', 'reveal', 'refused-role',
                left(format('%s; purpose %s; reason %s; actor %s', question,
                            left(p_purpose, 64), left(p_reason, lim.reason),
                            left(p_actor, lim.actor)), 2000))
        RETURNING id INTO request;
        -- The server log keeps it even if the caller rolls back.
        RAISE LOG 'pii-vault: reveal request % by %: refused-role', request, session_user;
        RETURN request;
    END IF;

    IF length(p_reason) > lim.reason OR length(p_actor) > lim.actor
       OR length(p_value) > lim.value THEN
        refusal := 'refused-input';
    ELSIF p_purpose IS NULL OR NOT p_purpose = ANY (audit_reveal_purposes()) THEN
        refusal := 'refused-purpose';
    ELSIF p_reason IS NULL OR btrim(p_reason) = '' THEN
        refusal := 'refused-reason';
    ELSIF p_question IS NULL OR p_question NOT IN ('user_id', 'masked_ip', 'masked_device_id')
          OR p_value IS NULL THEN
        refusal := 'refused-question';
    END IF;

    IF refusal IS NULL THEN
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
    END IF;
    outcome := coalesce(refusal, CASE WHEN cardinality(ids) = 0 THEN 'nothing-found'
                                      ELSE 'handed-out' END);
    audit := audit_append(left(coalesce(p_actor, ''), lim.actor), coalesce(left(p_purpose, 64), ''),
                          left(coalesce(p_reason, ''), lim.reason), question, 0, outcome, ids, keys);
    INSERT INTO door_requests (door, operation, audit_id, outcome, ids, keys)
    VALUES ('reveal', 'reveal', audit, outcome, ids, keys)
    RETURNING id INTO request;
    RAISE LOG 'pii-vault: reveal request % by %: %, audit row %', request, session_user, outcome,
        audit;
    RETURN request;
END
$$;

-- Step two of a reveal: the decision of a committed request, and for a hand-out each login it
-- names with its sealed values and the wrapped keys that open them. The caller then records
-- what came of it with vault_reveal_outcome(audit_id, ...).
CREATE FUNCTION vault_reveal(p_request bigint)
    RETURNS TABLE (audit_id bigint, outcome text, login_id bigint, message_id text,
                   user_id text, device_type text, create_date date, masked_ip text,
                   masked_device_id text, token_key_id bigint, token_key_kms text,
                   token_key_wrapped bytea, data_key_id bigint, data_key_kms text,
                   data_key_wrapped bytea, sealed_ip bytea, sealed_device_id bytea)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    r door_requests := door_hand_out(p_request, 'reveal');
BEGIN
    IF r.outcome <> 'handed-out' THEN
        RETURN QUERY SELECT r.audit_id, r.outcome, NULL::bigint, NULL::text, NULL::text,
            NULL::text, NULL::date, NULL::text, NULL::text, NULL::bigint, NULL::text,
            NULL::bytea, NULL::bigint, NULL::text, NULL::bytea, NULL::bytea, NULL::bytea;
        RETURN;
    END IF;
    RETURN QUERY
        SELECT r.audit_id, 'handed-out'::text, l.id,
               coalesce(l.message_id_text, l.message_id::text), l.user_id::text,
               l.device_type::text, l.create_date, l.masked_ip::text, l.masked_device_id::text,
               l.token_key_id, tk.kms_key_id, tk.wrapped_key, v.data_key_id, dk.kms_key_id,
               dk.wrapped_key, v.sealed_ip, v.sealed_device_id
        FROM user_logins l
        JOIN vault_keys tk ON tk.id = l.token_key_id
        LEFT JOIN login_vault v ON v.login_id = l.id
        LEFT JOIN vault_keys dk ON dk.id = v.data_key_id
        WHERE l.id = ANY (r.ids)
        ORDER BY l.create_date, l.id;
END
$$;

-- ------------------------------------------------------------------- the key admin's walks

DROP FUNCTION vault_rotation_page(text, bigint, bigint, bigint[]);
DROP FUNCTION vault_quarantine_page(text, bigint, bigint, bigint[]);

-- Step one of a rotation page: 'reseal' picks the logins sealed under `p_keys`, 'retokenize'
-- the logins tokenized under `p_keys`, 'verify' every login, after login `p_after`, at most
-- `p_limit`, skipping rows a writer holds (left to a later pass). Appends the page's audit row;
-- NULL when the page is empty.
CREATE FUNCTION vault_rotation_request(p_operation text, p_after bigint, p_limit bigint,
                                       p_keys bigint[])
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
        RAISE EXCEPTION 'unknown rotation operation %', p_operation
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF cardinality(ids) = 0 THEN
        RETURN NULL;
    END IF;
    SELECT coalesce(array_agg(DISTINCT k ORDER BY k), '{}') INTO keys
    FROM (SELECT l.token_key_id FROM user_logins l WHERE l.id = ANY (ids)
          UNION SELECT v.data_key_id FROM login_vault v WHERE v.login_id = ANY (ids)) AS used(k);
    audit := audit_append(session_user, 'key-administration', 'rotate-keys ' || p_operation,
                          format('%s logins %s..%s', p_operation, ids[1], ids[cardinality(ids)]),
                          cardinality(ids), p_operation, ids, keys);
    INSERT INTO door_requests (door, operation, audit_id, outcome, ids, keys)
    VALUES ('rotation', p_operation, audit, p_operation, ids, keys)
    RETURNING id INTO request;
    RETURN request;
END
$$;

-- Step two: the page's logins with their sealed values (NULL where erased). A 'reseal' page
-- holds the vault rows, a 'retokenize' page the login rows, until the caller's transaction
-- ends: the write door for the page runs in the same transaction.
CREATE FUNCTION vault_rotation_page(p_request bigint)
    RETURNS TABLE (audit_id bigint, login_id bigint, message_id text, user_id text,
                   create_date date, masked_ip text, masked_device_id text,
                   token_key_id bigint, data_key_id bigint, sealed_ip bytea,
                   sealed_device_id bytea)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    r door_requests := door_hand_out(p_request, 'rotation');
BEGIN
    IF r.operation = 'reseal' THEN
        PERFORM 1 FROM login_vault v WHERE v.login_id = ANY (r.ids) ORDER BY v.login_id FOR UPDATE;
    ELSIF r.operation = 'retokenize' THEN
        PERFORM 1 FROM user_logins l WHERE l.id = ANY (r.ids) ORDER BY l.id FOR UPDATE;
    END IF;
    RETURN QUERY
        SELECT r.audit_id, l.id, coalesce(l.message_id_text, l.message_id::text),
               l.user_id::text, l.create_date, l.masked_ip::text, l.masked_device_id::text,
               l.token_key_id, v.data_key_id, v.sealed_ip, v.sealed_device_id
        FROM user_logins l LEFT JOIN login_vault v ON v.login_id = l.id
        WHERE l.id = ANY (r.ids)
        ORDER BY l.id;
END
$$;

-- Step one over quarantined bodies sealed under `p_keys`: 'reseal' or 'verify'.
CREATE FUNCTION vault_quarantine_request(p_operation text, p_after bigint, p_limit bigint,
                                         p_keys bigint[])
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
    IF p_operation NOT IN ('reseal', 'verify') THEN
        RAISE EXCEPTION 'unknown quarantine operation %', p_operation
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT coalesce(array_agg(page.id ORDER BY page.id), '{}') INTO ids
    FROM (SELECT q.id FROM quarantine q WHERE q.id > p_after AND q.data_key_id = ANY (p_keys)
          ORDER BY q.id LIMIT p_limit FOR UPDATE SKIP LOCKED) AS page;
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

CREATE FUNCTION vault_quarantine_page(p_request bigint)
    RETURNS TABLE (audit_id bigint, id bigint, message_id text, data_key_id bigint,
                   sealed_body bytea)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    r door_requests := door_hand_out(p_request, 'quarantine');
BEGIN
    IF r.operation = 'reseal' THEN
        PERFORM 1 FROM quarantine q WHERE q.id = ANY (r.ids) ORDER BY q.id FOR UPDATE;
    END IF;
    RETURN QUERY
        SELECT r.audit_id, q.id, q.message_id, q.data_key_id, q.sealed_body
        FROM quarantine q WHERE q.id = ANY (r.ids) ORDER BY q.id;
END
$$;

-- ------------------------------------------------------------------- the key admin's writes

-- The new keys of a write: each must be active, of `p_purpose`.
CREATE FUNCTION door_check_new_keys(p_keys bigint[], p_purpose text) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM unnest(p_keys) AS k(id)
               WHERE NOT EXISTS (SELECT 1 FROM vault_keys vk WHERE vk.id = k.id
                                   AND vk.purpose = p_purpose AND vk.state = 'active')) THEN
        RAISE EXCEPTION 'rows may be rewritten only under an active % key', p_purpose
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;

-- Re-sealed values of logins handed out by a 'reseal' page in this transaction.
CREATE FUNCTION vault_reseal_logins(p_request bigint, p_ids bigint[], p_data_keys bigint[],
                                    p_sealed_ip bytea[], p_sealed_device_id bytea[])
    RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    r door_requests := door_in_hand(p_request, 'rotation', 'reseal', p_ids);
    n bigint;
    new_keys bigint[];
BEGIN
    SELECT coalesce(array_agg(DISTINCT k ORDER BY k), '{}') INTO new_keys FROM unnest(p_data_keys) k;
    PERFORM door_check_new_keys(new_keys, 'data');
    UPDATE login_vault v
    SET data_key_id = u.data_key_id, sealed_ip = u.sealed_ip, sealed_device_id = u.sealed_device_id
    FROM unnest(p_ids, p_data_keys, p_sealed_ip, p_sealed_device_id)
         AS u(login_id, data_key_id, sealed_ip, sealed_device_id)
    WHERE v.login_id = u.login_id;
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM audit_append(session_user, 'key-administration', 'rotate-keys reseal',
                         format('resealed %s logins of audit row %s', n, r.audit_id),
                         n::integer, 'resealed', p_ids, new_keys);
    RETURN n;
END
$$;

-- Recomputed tokens of logins handed out by a 'retokenize' page in this transaction (NULL
-- tokens where the values were erased).
CREATE FUNCTION vault_retokenize_logins(p_request bigint, p_token_key bigint, p_ids bigint[],
                                        p_masked_ip text[], p_masked_device_id text[])
    RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    r door_requests := door_in_hand(p_request, 'rotation', 'retokenize', p_ids);
    n bigint;
BEGIN
    PERFORM door_check_new_keys(ARRAY[p_token_key], 'token');
    UPDATE user_logins l
    SET masked_ip = u.masked_ip, masked_device_id = u.masked_device_id, token_key_id = p_token_key
    FROM unnest(p_ids, p_masked_ip, p_masked_device_id) AS u(id, masked_ip, masked_device_id)
    WHERE l.id = u.id;
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM audit_append(session_user, 'key-administration', 'rotate-keys retokenize',
                         format('retokenized %s logins of audit row %s', n, r.audit_id),
                         n::integer, 'retokenized', p_ids, ARRAY[p_token_key]);
    RETURN n;
END
$$;

-- Re-sealed bodies of quarantined messages handed out by a 'reseal' page in this transaction.
CREATE FUNCTION vault_reseal_quarantine(p_request bigint, p_ids bigint[], p_data_keys bigint[],
                                        p_sealed_body bytea[])
    RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    r door_requests := door_in_hand(p_request, 'quarantine', 'reseal', p_ids);
    n bigint;
    new_keys bigint[];
BEGIN
    SELECT coalesce(array_agg(DISTINCT k ORDER BY k), '{}') INTO new_keys FROM unnest(p_data_keys) k;
    PERFORM door_check_new_keys(new_keys, 'data');
    UPDATE quarantine q SET data_key_id = u.data_key_id, sealed_body = u.sealed_body
    FROM unnest(p_ids, p_data_keys, p_sealed_body) AS u(id, data_key_id, sealed_body)
    WHERE q.id = u.id;
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM audit_append(session_user, 'key-administration', 'rotate-keys reseal',
                         format('resealed %s quarantined messages of audit row %s', n, r.audit_id),
                         n::integer, 'resealed-quarantine', '{}', new_keys);
    RETURN n;
END
$$;

-- ------------------------------------------------------------------------------- the locks

-- The erasure gate: an erasure updates its row (waiting for every ingester batch in progress);
-- each batch holds it shared through vault_hold_erasures, then checks the newest erasure.
CREATE TABLE erasure_gate (
    only_row  boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    erasures  bigint NOT NULL DEFAULT 0
);
INSERT INTO erasure_gate DEFAULT VALUES;

-- Held by an ingester batch until it commits: the gate shared, and the newest erasure record.
CREATE FUNCTION vault_hold_erasures() RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
BEGIN
    PERFORM 1 FROM erasure_gate FOR SHARE;
    RETURN (SELECT coalesce(max(id), 0) FROM erasures);
END
$$;

-- Held by a writer until it commits: the rows of the keys it writes under, shared, so that a
-- rotation (which locks them FOR UPDATE to retire them) waits for it. Returns how many of
-- `p_keys` new rows may still use.
CREATE FUNCTION vault_hold_keys(p_keys bigint[]) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    usable bigint;
BEGIN
    SELECT count(*) INTO usable
    FROM (SELECT 1 FROM vault_keys WHERE id = ANY (p_keys) AND state IN ('active', 'retiring')
          ORDER BY id FOR SHARE) AS held;
    RETURN usable;
END
$$;

CREATE OR REPLACE FUNCTION vault_erase_user(p_user_id text, p_reason text, p_actor text,
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
    IF length(p_user_id) > (audit_limits()).value THEN
        RAISE EXCEPTION 'a user id takes at most % characters', (audit_limits()).value
            USING ERRCODE = 'string_data_right_truncation';
    END IF;
    IF cardinality(p_token_keys) IS DISTINCT FROM cardinality(p_user_tokens)
       OR cardinality(p_token_keys) = 0 OR cardinality(p_token_keys) > 1000 THEN
        RAISE EXCEPTION 'an erasure needs the user''s token under each token key';
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
                          format('erase user_id = %s: sealed values of %s logins, tokens of %s, %s quarantined messages%s',
                                 p_user_id, cardinality(ids), n_tokens, n_quarantined,
                                 CASE WHEN p_keep_tokens THEN ' (tokens kept: legal hold)' ELSE '' END),
                          cardinality(ids), 'erased', ids, keys);
    INSERT INTO erasures (token_key_id, user_token, audit_id)
    SELECT t.key_id, t.token, audit FROM unnest(p_token_keys, p_user_tokens) AS t(key_id, token);
    RETURN QUERY SELECT audit, cardinality(ids)::bigint, n_tokens, n_quarantined;
END
$$;

-- ------------------------------------------------------------------------------ privileges

GRANT SELECT, UPDATE ON audit_head TO pii_vault_door;
GRANT SELECT, INSERT ON door_requests TO pii_vault_door;
GRANT UPDATE (used_xact) ON door_requests TO pii_vault_door;
GRANT SELECT ON door_requests TO pii_vault_compliance, pii_vault_keyadmin;
GRANT SELECT, UPDATE ON erasure_gate TO pii_vault_door;
-- FOR SHARE (vault_hold_keys) needs an UPDATE right; the door's functions never update a key.
GRANT UPDATE (state) ON vault_keys TO pii_vault_door;
GRANT UPDATE (masked_ip, masked_device_id, token_key_id) ON user_logins TO pii_vault_door;
GRANT UPDATE (data_key_id, sealed_ip, sealed_device_id) ON login_vault TO pii_vault_door;
GRANT UPDATE (data_key_id, sealed_body) ON quarantine TO pii_vault_door;

-- The key admin writes logins and sealed values only through the write doors.
-- (A table-level REVOKE takes the column-level grants of 0005 with it.)
REVOKE UPDATE ON user_logins, login_vault, quarantine FROM pii_vault_keyadmin;

GRANT CREATE ON SCHEMA public TO pii_vault_door;
ALTER FUNCTION vault_reveal_request(text, text, text, text, text) OWNER TO pii_vault_door;
ALTER FUNCTION vault_reveal(bigint) OWNER TO pii_vault_door;
ALTER FUNCTION vault_rotation_request(text, bigint, bigint, bigint[]) OWNER TO pii_vault_door;
ALTER FUNCTION vault_rotation_page(bigint) OWNER TO pii_vault_door;
ALTER FUNCTION vault_quarantine_request(text, bigint, bigint, bigint[]) OWNER TO pii_vault_door;
ALTER FUNCTION vault_quarantine_page(bigint) OWNER TO pii_vault_door;
ALTER FUNCTION vault_reseal_logins(bigint, bigint[], bigint[], bytea[], bytea[]) OWNER TO pii_vault_door;
ALTER FUNCTION vault_retokenize_logins(bigint, bigint, bigint[], text[], text[]) OWNER TO pii_vault_door;
ALTER FUNCTION vault_reseal_quarantine(bigint, bigint[], bigint[], bytea[]) OWNER TO pii_vault_door;
ALTER FUNCTION door_hand_out(bigint, text) OWNER TO pii_vault_door;
ALTER FUNCTION door_in_hand(bigint, text, text, bigint[]) OWNER TO pii_vault_door;
ALTER FUNCTION door_check_new_keys(bigint[], text) OWNER TO pii_vault_door;
ALTER FUNCTION vault_hold_erasures() OWNER TO pii_vault_door;
ALTER FUNCTION vault_hold_keys(bigint[]) OWNER TO pii_vault_door;
-- The trigger functions that keep the audit append-only belong to the door role too, so the
-- table owner cannot replace them with ones that let a change through.
ALTER FUNCTION audit_refuse_change() OWNER TO pii_vault_door;
ALTER FUNCTION audit_only_through_doors() OWNER TO pii_vault_door;
ALTER FUNCTION vault_only_through_doors() OWNER TO pii_vault_door;
REVOKE CREATE ON SCHEMA public FROM pii_vault_door;

REVOKE EXECUTE ON FUNCTION
    door_hand_out(bigint, text), door_in_hand(bigint, text, text, bigint[]),
    door_check_new_keys(bigint[], text), vault_reveal(bigint),
    vault_rotation_request(text, bigint, bigint, bigint[]), vault_rotation_page(bigint),
    vault_quarantine_request(text, bigint, bigint, bigint[]), vault_quarantine_page(bigint),
    vault_reseal_logins(bigint, bigint[], bigint[], bytea[], bytea[]),
    vault_retokenize_logins(bigint, bigint, bigint[], text[], text[]),
    vault_reseal_quarantine(bigint, bigint[], bigint[], bytea[]),
    vault_hold_erasures(), vault_hold_keys(bigint[])
    FROM PUBLIC;
-- Everyone may knock on the reveal door: a knock is recorded too.
GRANT EXECUTE ON FUNCTION vault_reveal_request(text, text, text, text, text) TO PUBLIC;
GRANT EXECUTE ON FUNCTION vault_reveal(bigint) TO PUBLIC;
GRANT EXECUTE ON FUNCTION
    vault_rotation_request(text, bigint, bigint, bigint[]), vault_rotation_page(bigint),
    vault_quarantine_request(text, bigint, bigint, bigint[]), vault_quarantine_page(bigint),
    vault_reseal_logins(bigint, bigint[], bigint[], bytea[], bytea[]),
    vault_retokenize_logins(bigint, bigint, bigint[], text[], text[]),
    vault_reseal_quarantine(bigint, bigint[], bigint[], bytea[])
    TO pii_vault_keyadmin;
-- The owner may ingest too (the demo and the tests do): it owns the tables the locks are on.
GRANT EXECUTE ON FUNCTION vault_hold_erasures(), vault_hold_keys(bigint[])
    TO pii_vault_ingester, CURRENT_USER;
