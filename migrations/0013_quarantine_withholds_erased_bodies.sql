-- A quarantined message keeps no body that opens when its person is gone: an invalid message
-- whose body names a user erased after it was sent (it was in flight, or in the dead-letter
-- queue, during the erasure), or whose send date falls in a retention window that has
-- expired, is still recorded (message id, reason, length, send time: nothing is dropped
-- silently) but its body is withheld, not sealed.
--
-- * `body_withheld` says why ('user-erased', 'window-expired'); a CHECK ties it to the row's
--   shape: a withheld row has no sealed body, no data key, and no user token (a token would
--   link the row to the erasure record of its person; with no body there is nothing a later
--   erasure would need to find). A row with a sealed body has its data key, as before.
-- * The ingester decides (src/ingest/batch.rs, with the erasure records it loaded) and the
--   batch commits only if no erasure came after it was made (the erasure gate, 0009). The
--   trigger below is the same rule in the database, for an ingester that does not know it
--   (one of an older release during an upgrade): a body whose user token, under the token
--   key the row names, has an erasure record later than the message was sent is withheld
--   on insert. It reads `erasures` under the writer's hold of the gate, so an erasure cannot
--   commit between its check and the commit.
-- * A withheld row has no data key: no rotation page hands it out, no key's use counts it,
--   and a window's expiry does not delete it (it holds nothing personal).

ALTER TABLE quarantine
    ALTER COLUMN sealed_body DROP NOT NULL,
    ALTER COLUMN data_key_id DROP NOT NULL,
    ADD COLUMN body_withheld text
        CONSTRAINT quarantine_body_withheld_reason
        CHECK (body_withheld IN ('user-erased', 'window-expired')),
    ADD CONSTRAINT quarantine_body_sealed_or_withheld CHECK (
        CASE WHEN body_withheld IS NULL
             THEN sealed_body IS NOT NULL AND data_key_id IS NOT NULL
             ELSE sealed_body IS NULL AND data_key_id IS NULL
                  AND user_token IS NULL AND token_key_id IS NULL
        END);

COMMENT ON COLUMN quarantine.body_withheld IS
    'why the body was not kept (user-erased, window-expired); NULL when sealed_body holds it';

CREATE INDEX erasures_token ON erasures (token_key_id, user_token);

CREATE FUNCTION quarantine_withhold_erased_body() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp
AS $$
BEGIN
    IF NEW.user_token IS NOT NULL AND NEW.body_withheld IS NULL AND EXISTS (
        SELECT 1 FROM erasures e
        WHERE e.token_key_id = NEW.token_key_id AND e.user_token = NEW.user_token
          AND (NEW.sent_at IS NULL OR NEW.sent_at < e.erased_at)) THEN
        NEW.sealed_body := NULL;
        NEW.data_key_id := NULL;
        NEW.user_token := NULL;
        NEW.token_key_id := NULL;
        NEW.body_withheld := 'user-erased';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER quarantine_withhold_erased_body
    BEFORE INSERT ON quarantine
    FOR EACH ROW EXECUTE FUNCTION quarantine_withhold_erased_body();

-- The key admin sees why a body is missing (the runbook's look-up by message id).
GRANT SELECT (body_withheld) ON quarantine TO pii_vault_keyadmin;
