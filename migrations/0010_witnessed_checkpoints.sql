-- Witnessed checkpoints: each audit checkpoint gets a sequence number, signed with it (the
-- checkpoint message's format 2, docs/FORMAT.md §7), and is also written to an S3 bucket
-- under Object Lock in COMPLIANCE mode, which the database owner cannot rewrite
-- (`unmask audit-checkpoint`, `unmask verify-audit --witness`, src/audit/witness.rs).
--
-- * `seq` is 1 for the first witnessed checkpoint and one more for each after it; rows signed
--   before this migration keep NULL (format 1, verified as before). A gap in the numbers of
--   the checkpoints whose signatures verify, or a newest one older than the witness's, shows
--   that checkpoints were removed from this table.
-- * `seq` is deliberately NOT unique. Whoever holds INSERT on this table (compliance, the key
--   admin) could otherwise take the next number with a row that does not verify and stop
--   every later checkpoint. Uniqueness holds where it counts: among checkpoints signed by the
--   key, which only the signer can make, and in the bucket (each number's object is written
--   once, `If-None-Match: *`). Rows that do not verify are named and skipped by
--   `verify-audit --witness`; the witness decides.
-- * Grants are unchanged: the table-level SELECT and INSERT of compliance and the key admin
--   cover the new column.

ALTER TABLE audit_checkpoints
    ADD COLUMN seq bigint CHECK (seq > 0);

COMMENT ON COLUMN audit_checkpoints.seq IS
    'witnessed checkpoint number (1, 2, ...), signed into the checkpoint (format 2); NULL for format 1';

CREATE INDEX audit_checkpoints_seq ON audit_checkpoints (seq);
