-- Years of logins: `user_logins` and `login_vault` partitioned by login month.
--
-- A login's month is the month of its `create_date` (SQS's SentTimestamp), the month of its
-- retention window (0007). Expiring a window then drops that month's two partitions (one
-- catalog change, the disk back at once) instead of deleting its rows one by one; each index
-- is per month, so none grows forever, and a month is restored or re-indexed on its own.
--
-- What the partitioning asks of the schema:
-- - A unique index must include the partition key: the primary key is (id, create_date), the
--   idempotency key (message_id, create_date). A redelivered SQS message keeps its
--   SentTimestamp, so its date and partition are the same as the first delivery's. A file
--   line has no SentTimestamp: it is dated the day it is ingested, so a replay on a later day
--   has another date; the writer looks such lines up in every month, under `undated_gate`
--   (below), so two replays cannot both miss each other.
-- - `login_vault` gets the login's `create_date`, its partition key.
-- - There is no default partition: a login of a month without one is refused (SQLSTATE
--   23514), stays on the queue, and ingest's readiness names the month.
-- - Months are added by the key admin through `vault_add_month` (`rotate-keys window`, and
--   `rotate-keys partitions --ahead N` on a schedule). Partitions have no grants of their
--   own: every role reads and writes through the parents, with the parents' column grants.
--
-- The rows already stored are copied into the partitions, in this migration's transaction.

-- The old tables, their indexes and their identity sequence step aside.
ALTER TABLE user_logins RENAME TO user_logins_unpartitioned;
ALTER TABLE user_logins_unpartitioned RENAME CONSTRAINT user_logins_pkey TO user_logins_unpartitioned_pkey;
ALTER TABLE user_logins_unpartitioned RENAME CONSTRAINT user_logins_message_id_key TO user_logins_unpartitioned_message_id_key;
ALTER INDEX user_logins_user_id RENAME TO user_logins_unpartitioned_user_id;
ALTER INDEX user_logins_masked_ip RENAME TO user_logins_unpartitioned_masked_ip;
ALTER INDEX user_logins_masked_device_id RENAME TO user_logins_unpartitioned_masked_device_id;
ALTER SEQUENCE user_logins_id_seq RENAME TO user_logins_unpartitioned_id_seq;
ALTER TABLE login_vault RENAME TO login_vault_unpartitioned;
ALTER TABLE login_vault_unpartitioned RENAME CONSTRAINT login_vault_pkey TO login_vault_unpartitioned_pkey;
ALTER INDEX login_vault_data_key_id RENAME TO login_vault_unpartitioned_data_key_id;

-- Login ids keep coming from one sequence for every month (the doors address logins by id).
CREATE SEQUENCE user_logins_id_seq AS bigint;
SELECT setval('user_logins_id_seq', coalesce(max(id), 0) + 1, false) FROM user_logins_unpartitioned;

CREATE TABLE user_logins (
    user_id character varying(128) NOT NULL,
    device_type character varying(32) NOT NULL,
    masked_ip character varying(256),
    masked_device_id character varying(256),
    locale character varying(32),
    app_version integer NOT NULL,
    create_date date NOT NULL,
    id bigint NOT NULL DEFAULT nextval('user_logins_id_seq'),
    message_id uuid NOT NULL,
    token_key_id bigint NOT NULL,
    app_version_text character varying(32) NOT NULL,
    ingested_at timestamp with time zone DEFAULT now() NOT NULL,
    message_id_text text,
    CONSTRAINT user_logins_message_id_text_only_when_not_a_uuid
        CHECK (message_id_text IS NULL OR message_key(message_id_text) = message_id),
    CONSTRAINT user_logins_pkey PRIMARY KEY (id, create_date),
    CONSTRAINT user_logins_message_id_key UNIQUE (message_id, create_date)
) PARTITION BY RANGE (create_date);
ALTER SEQUENCE user_logins_id_seq OWNED BY user_logins.id;
CREATE INDEX user_logins_user_id ON user_logins USING hash (user_id);
CREATE INDEX user_logins_masked_ip ON user_logins USING hash (masked_ip);
CREATE INDEX user_logins_masked_device_id ON user_logins USING hash (masked_device_id);

CREATE TABLE login_vault (
    login_id bigint NOT NULL,
    data_key_id bigint NOT NULL,
    sealed_ip bytea NOT NULL,
    sealed_device_id bytea NOT NULL,
    create_date date NOT NULL,
    CONSTRAINT login_vault_pkey PRIMARY KEY (login_id, create_date)
) PARTITION BY RANGE (create_date);
CREATE INDEX login_vault_data_key_id ON login_vault USING brin (data_key_id)
    WITH (pages_per_range = 16, autosummarize = on);

-- Vault rows still follow their logins (0004), whichever month a DELETE reaches.
CREATE TRIGGER login_vault_follows_its_logins AFTER DELETE ON user_logins
    REFERENCING OLD TABLE AS deleted_logins
    FOR EACH STATEMENT EXECUTE FUNCTION login_vault_follows_its_logins();

-- The grants of the old tables (0002, 0005, 0008), on the parents.
GRANT INSERT ON user_logins TO pii_vault_ingester;
GRANT SELECT (id, message_id, message_id_text, create_date) ON user_logins TO pii_vault_ingester;
GRANT SELECT ON user_logins TO pii_vault_analyst, pii_vault_compliance, pii_vault_keyadmin,
    pii_vault_door;
GRANT UPDATE (masked_ip, masked_device_id, token_key_id) ON user_logins TO pii_vault_door;
GRANT USAGE ON SEQUENCE user_logins_id_seq TO pii_vault_ingester;
GRANT INSERT ON login_vault TO pii_vault_ingester;
GRANT SELECT, DELETE ON login_vault TO pii_vault_door;
GRANT UPDATE (data_key_id, sealed_ip, sealed_device_id) ON login_vault TO pii_vault_door;
GRANT SELECT (login_id, data_key_id) ON login_vault TO pii_vault_keyadmin;

-- A file line's writer holds this row's lock while it looks the line up in every month and
-- copies it: the look-up of one undated writer sees what the one before it committed. A row
-- lock, not an advisory lock: only a role that may update the row (the ingester) can take it.
CREATE TABLE undated_gate (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row)
);
INSERT INTO undated_gate DEFAULT VALUES;
GRANT SELECT, UPDATE ON undated_gate TO pii_vault_ingester;

-- Adds the partitions of `p_month`'s month to both tables; false if they were there.
--
-- Owned by the tables' owner (only an owner may attach a partition), for the key admin (and
-- the owner, who runs this migration). Each
-- partition is made apart and then attached: ATTACH takes SHARE UPDATE EXCLUSIVE on the
-- parent, which waits for no reader and no writer, where CREATE TABLE ... PARTITION OF takes
-- ACCESS EXCLUSIVE, queued behind any long query with every ingest writer queued behind it.
-- Months more than two years ahead are refused: each month is a few dozen files.
CREATE FUNCTION vault_add_month(p_month date) RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, public, pg_temp
    SET lock_timeout = '5s'
AS $$
DECLARE
    starts date := date_trunc('month', p_month)::date;
    ends date := (date_trunc('month', p_month) + interval '1 month')::date;
    added boolean := false;
    parent text;
    partition text;
BEGIN
    IF NOT pg_has_role(session_user, current_user, 'MEMBER')
       AND NOT pg_has_role(session_user, 'pii_vault_keyadmin', 'MEMBER') THEN
        RAISE EXCEPTION 'adding months is for the key admin (pii_vault_keyadmin)'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF p_month IS NULL OR p_month < date '2000-01-01'
       OR p_month >= date_trunc('month', current_date) + interval '25 months' THEN
        RAISE EXCEPTION 'a month from 2000-01 to 24 months ahead, not %', p_month
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- One adder at a time (two racing on one month would both find it missing), by the mode
    -- ATTACH takes anyway: it conflicts with itself and with no reader or writer.
    LOCK TABLE user_logins, login_vault IN SHARE UPDATE EXCLUSIVE MODE;
    FOREACH parent IN ARRAY ARRAY['user_logins', 'login_vault'] LOOP
        partition := parent || '_' || to_char(starts, 'YYYY_MM');
        CONTINUE WHEN to_regclass('public.' || partition) IS NOT NULL;
        EXECUTE format('CREATE TABLE public.%I (LIKE public.%I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                       partition, parent);
        EXECUTE format('ALTER TABLE public.%I ATTACH PARTITION public.%I FOR VALUES FROM (%L) TO (%L)',
                       parent, partition, starts, ends);
        added := true;
    END LOOP;
    RETURN added;
END
$$;
REVOKE EXECUTE ON FUNCTION vault_add_month(date) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION vault_add_month(date) TO pii_vault_keyadmin;

-- Whether logins dated `p_day` have partitions to go to: ingest's readiness asks it of today.
CREATE FUNCTION vault_month_ready(p_day date) RETURNS boolean
    LANGUAGE sql STABLE SET search_path = pg_catalog, public, pg_temp
AS $$
    SELECT to_regclass('public.user_logins_' || to_char(p_day, 'YYYY_MM')) IS NOT NULL
       AND to_regclass('public.login_vault_' || to_char(p_day, 'YYYY_MM')) IS NOT NULL
$$;

-- The months that hold logins, the months of registered windows, and this month and the next
-- three, so that a deployment keeps ingesting until its first scheduled `rotate-keys
-- partitions`.
SELECT vault_add_month(month::date)
FROM (SELECT date_trunc('month', create_date) FROM user_logins_unpartitioned
      UNION SELECT starts FROM retention_windows
      UNION SELECT date_trunc('month', current_date) + n * interval '1 month'
            FROM generate_series(0, 3) AS n) AS months(month)
WHERE month >= date '2000-01-01';

INSERT INTO user_logins (user_id, device_type, masked_ip, masked_device_id, locale, app_version,
                         create_date, id, message_id, token_key_id, app_version_text,
                         ingested_at, message_id_text)
SELECT user_id, device_type, masked_ip, masked_device_id, locale, app_version, create_date, id,
       message_id, token_key_id, app_version_text, ingested_at, message_id_text
FROM user_logins_unpartitioned;
INSERT INTO login_vault (login_id, data_key_id, sealed_ip, sealed_device_id, create_date)
SELECT v.login_id, v.data_key_id, v.sealed_ip, v.sealed_device_id, l.create_date
FROM login_vault_unpartitioned v JOIN user_logins_unpartitioned l ON l.id = v.login_id;
DO $$
BEGIN
    IF (SELECT count(*) FROM login_vault) <> (SELECT count(*) FROM login_vault_unpartitioned) THEN
        RAISE EXCEPTION 'a vault row without its login: not migrated';
    END IF;
END
$$;

DROP TABLE user_logins_unpartitioned, login_vault_unpartitioned;
