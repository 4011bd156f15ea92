-- unmask: the audit trail, the indexes behind reverse look-ups, and separation of duties.

-- One row per unmask call, written and committed before anything is revealed. Append-only:
-- nobody but the owner may update or delete, and each row's hash covers its content and the
-- previous row's hash, so an edited, deleted or reordered row shows (`unmask verify-audit`).
CREATE TABLE unmask_audit (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at               timestamptz NOT NULL,
    -- Who asked (--actor, by default the OS user) and as which database user.
    actor            text NOT NULL,
    db_user          text NOT NULL,
    reason           text NOT NULL CHECK (btrim(reason) <> ''),
    -- The question asked, e.g. "user_id = 42" or "masked_ip = 3fa9...".
    question         text NOT NULL,
    values_revealed  integer NOT NULL,
    -- revealed, nothing-found, integrity-failure, erased.
    outcome          text NOT NULL,
    prev_hash        bytea NOT NULL,
    hash             bytea NOT NULL UNIQUE
);

-- Investigators ask the reverse question: which logins carry this token?
CREATE INDEX user_logins_masked_ip ON user_logins (masked_ip);
CREATE INDEX user_logins_masked_device_id ON user_logins (masked_device_id);

-- Group roles (NOLOGIN): grant them to login users (README, "Database roles"). Roles are
-- cluster-wide, so another database may have created them already, possibly concurrently.
DO $$
DECLARE
    role_name text;
BEGIN
    FOREACH role_name IN ARRAY ARRAY['pii_vault_ingester', 'pii_vault_analyst',
                                     'pii_vault_compliance', 'pii_vault_keyadmin'] LOOP
        BEGIN
            EXECUTE format('CREATE ROLE %I NOLOGIN', role_name);
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END LOOP;
END $$;

-- ingester: writes logins, vault rows, quarantine entries and its own data keys; reads the
-- key table (to find the token key) and the migrations table (to check the schema). It
-- cannot read the vault or what analysts see, beyond what ON CONFLICT ... RETURNING needs.
GRANT SELECT, INSERT ON vault_keys TO pii_vault_ingester;
GRANT USAGE ON SEQUENCE vault_keys_id_seq TO pii_vault_ingester;
GRANT INSERT ON user_logins, login_vault, quarantine TO pii_vault_ingester;
-- ON CONFLICT (message_id) reads the conflict column; RETURNING reads id.
GRANT SELECT (id, message_id) ON user_logins TO pii_vault_ingester;
GRANT SELECT (message_id) ON quarantine TO pii_vault_ingester;
GRANT SELECT ON _sqlx_migrations TO pii_vault_ingester;

-- analyst: the analytic table and nothing else.
GRANT SELECT ON user_logins TO pii_vault_analyst;

-- compliance: reads logins, the vault and the key table; appends to the audit.
GRANT SELECT ON user_logins, login_vault, vault_keys TO pii_vault_compliance;
GRANT SELECT, INSERT ON unmask_audit TO pii_vault_compliance;

-- key admin (rotate-keys): manages keys, re-encrypts and re-tokenizes rows, erases a user's
-- sealed values; appends to the audit. Schema changes stay with the owner.
GRANT SELECT, INSERT, UPDATE ON vault_keys TO pii_vault_keyadmin;
GRANT USAGE ON SEQUENCE vault_keys_id_seq TO pii_vault_keyadmin;
GRANT SELECT, UPDATE ON user_logins TO pii_vault_keyadmin;
GRANT SELECT, UPDATE, DELETE ON login_vault TO pii_vault_keyadmin;
GRANT SELECT, UPDATE ON quarantine TO pii_vault_keyadmin;
GRANT SELECT, INSERT ON unmask_audit TO pii_vault_keyadmin;
GRANT SELECT ON _sqlx_migrations TO pii_vault_keyadmin;
