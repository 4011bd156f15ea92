-- Doors read each login in its own month.
--
-- Since 0017 a login is found by (id, create_date); its id alone names no partition. The
-- reveal and rotation doors handed out logins by id (`l.id = ANY (ids)`, `v.login_id = l.id`),
-- so every id was looked for in every month, and with a few months of small partitions the
-- planner joined the vault by hashing all of it: a user's 240 logins spread over 24 months
-- took 7 times as long to hand out as the same logins in one month (scripts/bench-months).
--
-- A request now records, beside each login id, the login's month (`door_requests.days`, same
-- order as `ids`), and the hand-outs and the data keys' look-up read each login and its vault
-- row by (id, create_date), one partition each. A request made before this migration has no
-- days: its hand-out finds them by id, as before.
--
-- These doors also run without JIT compilation (`SET jit = off`): the planner prices a look-up
-- per login as a probe of every month (it cannot know that each is pruned to one as it runs),
-- so with enough months the estimate passes jit_above_cost and compiling the plan took 2.4 s
-- of a 10 ms hand-out.

ALTER TABLE door_requests ADD COLUMN days date[] NOT NULL DEFAULT '{}';
COMMENT ON COLUMN door_requests.days IS
    'create_date of each login in ids, in the same order (empty for requests made before 0018)';

-- The logins of a request, each with its month: the recorded days, or for a request made
-- before 0018, found by id.
CREATE FUNCTION door_logins(r door_requests) RETURNS TABLE(id bigint, day date)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, public, pg_temp
AS $$
BEGIN
    IF cardinality(r.days) = cardinality(r.ids) THEN
        RETURN QUERY SELECT h.id, h.day FROM unnest(r.ids, r.days) AS h(id, day);
    ELSE
        RETURN QUERY SELECT l.id, l.create_date FROM user_logins l WHERE l.id = ANY (r.ids)
                     ORDER BY l.id;
    END IF;
END
$$;

-- The data keys sealing the vault rows of these logins. OFFSET 0 keeps each look-up a probe
-- of one month's primary key (pruned as it runs) instead of a join the planner may answer by
-- reading every month.
CREATE FUNCTION door_data_keys(p_ids bigint[], p_days date[]) RETURNS bigint[]
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, public, pg_temp
AS $$
    SELECT coalesce(array_agg(DISTINCT v.data_key_id), '{}')
    FROM unnest(p_ids, p_days) AS h(id, day)
    CROSS JOIN LATERAL (SELECT v.data_key_id FROM login_vault v
                        WHERE v.login_id = h.id AND v.create_date = h.day OFFSET 0) AS v
$$;

CREATE OR REPLACE FUNCTION vault_reveal_request(p_question text, p_value text, p_purpose text,
                                                p_reason text, p_actor text) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, public, pg_temp
    SET jit = off
AS $$
DECLARE
    lim record := audit_limits();
    question text := format('%s = %s', coalesce(left(p_question, 64), '(none)'),
                            coalesce(left(p_value, lim.value), '(none)'));
    refusal text;
    ids bigint[] := '{}';
    days date[] := '{}';
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
        SELECT coalesce(array_agg(l.id ORDER BY l.id), '{}'),
               coalesce(array_agg(l.create_date ORDER BY l.id), '{}'),
               coalesce(array_agg(DISTINCT l.token_key_id), '{}')
          INTO ids, days, keys
        FROM user_logins l
        WHERE CASE p_question
                WHEN 'user_id' THEN l.user_id = p_value
                WHEN 'masked_ip' THEN l.masked_ip = p_value
                ELSE l.masked_device_id = p_value
              END;
        SELECT coalesce(array_agg(DISTINCT k ORDER BY k), '{}') INTO keys
        FROM unnest(keys || door_data_keys(ids, days)) AS used(k);
    END IF;
    outcome := coalesce(refusal, CASE WHEN cardinality(ids) = 0 THEN 'nothing-found'
                                      ELSE 'handed-out' END);
    audit := audit_append(left(coalesce(p_actor, ''), lim.actor), coalesce(left(p_purpose, 64), ''),
                          left(coalesce(p_reason, ''), lim.reason), question, 0, outcome, ids, keys);
    INSERT INTO door_requests (door, operation, audit_id, outcome, ids, days, keys)
    VALUES ('reveal', 'reveal', audit, outcome, ids, days, keys)
    RETURNING id INTO request;
    RAISE LOG 'pii-vault: reveal request % by %: %, audit row %', request, session_user, outcome,
        audit;
    RETURN request;
END
$$;

CREATE OR REPLACE FUNCTION vault_reveal(p_request bigint)
    RETURNS TABLE(audit_id bigint, outcome text, login_id bigint, message_id text, user_id text,
                  device_type text, create_date date, masked_ip text, masked_device_id text,
                  data_key_id bigint, data_key_format smallint, data_key_kms text,
                  data_key_wrapped bytea, sealed_ip bytea, sealed_device_id bytea)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, public, pg_temp
    SET jit = off
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
    -- OFFSET 0: see door_data_keys.
    RETURN QUERY
        SELECT r.audit_id, 'handed-out'::text, l.id,
               coalesce(l.message_id_text, l.message_id::text), l.user_id::text,
               l.device_type::text, l.create_date, l.masked_ip::text, l.masked_device_id::text,
               v.data_key_id, dk.format, dk.kms_key_id, dk.wrapped_key, v.sealed_ip,
               v.sealed_device_id
        FROM door_logins(r) AS h
        CROSS JOIN LATERAL (SELECT * FROM user_logins l
                            WHERE l.id = h.id AND l.create_date = h.day OFFSET 0) AS l
        LEFT JOIN LATERAL (SELECT * FROM login_vault v
                           WHERE v.login_id = h.id AND v.create_date = h.day OFFSET 0) AS v
               ON true
        LEFT JOIN vault_keys dk ON dk.id = v.data_key_id
        ORDER BY l.create_date, l.id;
END
$$;

CREATE OR REPLACE FUNCTION vault_rotation_request(p_operation text, p_after bigint,
                                                  p_limit bigint, p_keys bigint[])
    RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, public, pg_temp
    SET jit = off
AS $$
DECLARE
    ids bigint[];
    days date[];
    keys bigint[];
    audit bigint;
    request bigint;
BEGIN
    IF NOT pg_has_role(session_user, 'pii_vault_keyadmin', 'MEMBER') THEN
        RAISE EXCEPTION 'rotation doors are for the key admin (pii_vault_keyadmin)'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF p_operation = 'reseal' THEN
        SELECT coalesce(array_agg(page.login_id ORDER BY page.login_id), '{}'),
               coalesce(array_agg(page.create_date ORDER BY page.login_id), '{}')
          INTO ids, days
        FROM (SELECT v.login_id, v.create_date FROM login_vault v
              WHERE v.login_id > p_after AND v.data_key_id = ANY (p_keys)
              ORDER BY v.login_id LIMIT p_limit FOR UPDATE SKIP LOCKED) AS page;
    ELSIF p_operation = 'retokenize' THEN
        SELECT coalesce(array_agg(page.id ORDER BY page.id), '{}'),
               coalesce(array_agg(page.create_date ORDER BY page.id), '{}')
          INTO ids, days
        FROM (SELECT l.id, l.create_date FROM user_logins l
              WHERE l.id > p_after AND l.token_key_id = ANY (p_keys)
              ORDER BY l.id LIMIT p_limit FOR UPDATE SKIP LOCKED) AS page;
    ELSIF p_operation = 'verify' THEN
        SELECT coalesce(array_agg(page.id ORDER BY page.id), '{}'),
               coalesce(array_agg(page.create_date ORDER BY page.id), '{}')
          INTO ids, days
        FROM (SELECT l.id, l.create_date FROM user_logins l WHERE l.id > p_after
              ORDER BY l.id LIMIT p_limit) AS page;
    ELSE
        RAISE EXCEPTION 'unknown rotation operation %', p_operation
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF cardinality(ids) = 0 THEN
        RETURN NULL;
    END IF;
    SELECT coalesce(array_agg(DISTINCT k ORDER BY k), '{}') INTO keys
    FROM (SELECT l.token_key_id
          FROM unnest(ids, days) AS h(id, day)
          CROSS JOIN LATERAL (SELECT l.token_key_id FROM user_logins l
                              WHERE l.id = h.id AND l.create_date = h.day OFFSET 0) AS l
          UNION SELECT unnest(door_data_keys(ids, days))) AS used(k);
    audit := audit_append(session_user, 'key-administration', 'rotate-keys ' || p_operation,
                          format('%s logins %s..%s', p_operation, ids[1], ids[cardinality(ids)]),
                          cardinality(ids), p_operation, ids, keys);
    INSERT INTO door_requests (door, operation, audit_id, outcome, ids, days, keys)
    VALUES ('rotation', p_operation, audit, p_operation, ids, days, keys)
    RETURNING id INTO request;
    RETURN request;
END
$$;

CREATE OR REPLACE FUNCTION vault_rotation_page(p_request bigint)
    RETURNS TABLE(audit_id bigint, login_id bigint, message_id text, user_id text,
                  create_date date, masked_ip text, masked_device_id text, token_key_id bigint,
                  data_key_id bigint, sealed_ip bytea, sealed_device_id bytea)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, public, pg_temp
    SET jit = off
AS $$
DECLARE
    r door_requests := door_hand_out(p_request, 'rotation');
BEGIN
    -- The rows are locked in the order of the request's ids, ascending, as before 0018.
    IF r.operation = 'reseal' THEN
        PERFORM 1 FROM door_logins(r) AS h
        CROSS JOIN LATERAL (SELECT 1 FROM login_vault v
                            WHERE v.login_id = h.id AND v.create_date = h.day OFFSET 0
                            FOR UPDATE) AS v;
    ELSIF r.operation = 'retokenize' THEN
        PERFORM 1 FROM door_logins(r) AS h
        CROSS JOIN LATERAL (SELECT 1 FROM user_logins l
                            WHERE l.id = h.id AND l.create_date = h.day OFFSET 0
                            FOR UPDATE) AS l;
    END IF;
    -- OFFSET 0: see door_data_keys.
    RETURN QUERY
        SELECT r.audit_id, l.id, coalesce(l.message_id_text, l.message_id::text),
               l.user_id::text, l.create_date, l.masked_ip::text, l.masked_device_id::text,
               l.token_key_id, v.data_key_id, v.sealed_ip, v.sealed_device_id
        FROM door_logins(r) AS h
        CROSS JOIN LATERAL (SELECT * FROM user_logins l
                            WHERE l.id = h.id AND l.create_date = h.day OFFSET 0) AS l
        LEFT JOIN LATERAL (SELECT * FROM login_vault v
                           WHERE v.login_id = h.id AND v.create_date = h.day OFFSET 0) AS v
               ON true
        ORDER BY l.id;
END
$$;

-- The two helpers are the doors' own: owned by the door role, run by nobody else.
GRANT CREATE ON SCHEMA public TO pii_vault_door;
ALTER FUNCTION door_logins(door_requests) OWNER TO pii_vault_door;
ALTER FUNCTION door_data_keys(bigint[], date[]) OWNER TO pii_vault_door;
REVOKE CREATE ON SCHEMA public FROM pii_vault_door;
REVOKE EXECUTE ON FUNCTION door_logins(door_requests), door_data_keys(bigint[], date[])
    FROM PUBLIC;
