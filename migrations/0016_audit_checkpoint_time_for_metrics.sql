-- When the audit was last checkpointed, for ingest's metrics
-- (`pii_vault_audit_last_checkpoint_timestamp_seconds`, alert PiiVaultAuditCheckpointStale in
-- deploy/prometheus/alerts.yaml).
--
-- The checkpoint signer (`unmask audit-checkpoint`, hourly) signs a checkpoint only after the
-- whole chain has verified against the witness bucket, so a newest checkpoint that grows old
-- means verification fails or the signer no longer runs. The one-shot jobs cannot be scraped;
-- `ingest` is, so it reports the time. It learns the time alone: no hash, no signature, no
-- audit row.

CREATE FUNCTION audit_last_checkpoint_at() RETURNS timestamptz
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
    SELECT max(signed_at) FROM audit_checkpoints WHERE seq IS NOT NULL
$$;

REVOKE EXECUTE ON FUNCTION audit_last_checkpoint_at() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION audit_last_checkpoint_at() TO pii_vault_ingester;
