# shellcheck shell=bash
# Source me (`. scripts/env.sh`) for the settings that match scripts/services.
# Values already in the environment win, so a real deployment's settings or a
# one-off override (DATABASE_URL=... cargo test) are never clobbered.

: "${DATABASE_URL:=postgres://pii_vault:pii_vault@127.0.0.1:5432/pii_vault}"
: "${ROLE_ADMIN_DATABASE_URL:=postgres://pii_vault_roleadmin:pii_vault_roleadmin@127.0.0.1:5432/pii_vault}"
: "${AWS_ENDPOINT_URL:=http://127.0.0.1:4566}"
: "${AWS_REGION:=us-east-1}"
# The Rust SDK reads AWS_REGION; boto3 reads only AWS_DEFAULT_REGION.
: "${AWS_DEFAULT_REGION:=$AWS_REGION}"
# Dummy credentials: the emulator accepts any, the SDKs refuse to sign without.
: "${AWS_ACCESS_KEY_ID:=test}"
: "${AWS_SECRET_ACCESS_KEY:=test}"
: "${KMS_KEY_ID:=alias/pii-vault}"
# The asymmetric (ECC_NIST_P256, SIGN_VERIFY) key that signs audit checkpoints.
: "${AUDIT_SIGNING_KEY_ID:=alias/pii-vault-audit-signer}"
# The S3 bucket (Object Lock, COMPLIANCE mode) that witnesses audit checkpoints, and how long
# each witnessed checkpoint stays locked: a day locally (scripts/aws-init.py makes the bucket);
# in production the audit's retention period, e.g. 2557 days (7 years).
: "${AUDIT_WITNESS_BUCKET:=pii-vault-audit-witness}"
: "${AUDIT_WITNESS_RETAIN_DAYS:=1}"
export DATABASE_URL ROLE_ADMIN_DATABASE_URL AWS_ENDPOINT_URL AWS_REGION AWS_DEFAULT_REGION AWS_ACCESS_KEY_ID \
    AWS_SECRET_ACCESS_KEY KMS_KEY_ID AUDIT_SIGNING_KEY_ID AUDIT_WITNESS_BUCKET AUDIT_WITNESS_RETAIN_DAYS
