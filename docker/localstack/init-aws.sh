#!/usr/bin/env bash
# LocalStack "ready" hook for pii-vault: creates the queue, its dead-letter queue (redrive
# policy), the KMS key alias, the audit checkpoint signing key (ECC_NIST_P256, SIGN_VERIFY)
# alias and the audit witness bucket (S3, Object Lock with a default COMPLIANCE retention),
# then puts the sample messages on the queue.
#
# docker-compose.yaml mounts it at /etc/localstack/init/ready.d/, with scripts/aws-init.py and
# tests/data/sample_data.jsonl under /opt/pii-vault/. LocalStack keeps SQS, KMS and S3 in memory,
# so this runs on every start; scripts/aws-init.py converges instead of assuming a blank
# emulator, and each run adds the samples once more.
#
# Needs only python3 with boto3 (LocalStack images have both), so that scripts/check-compose
# can run this same file outside a container, against the emulator of `scripts/services up`
# (LocalStack on the host, or moto). Overrides, with their defaults:
#   PII_VAULT_ENDPOINT_URL  http://localhost:4566
#   PII_VAULT_REGION        us-east-1
#   PII_VAULT_QUEUE         login-queue          (the DLQ is <queue>-dlq)
#   PII_VAULT_KMS_ALIAS     alias/pii-vault
#   PII_VAULT_AUDIT_SIGNING_ALIAS  alias/pii-vault-audit-signer
#   PII_VAULT_WITNESS_BUCKET       pii-vault-audit-witness
#   PII_VAULT_WITNESS_RETAIN_DAYS  1  (the bucket's default retention)
#   PII_VAULT_AWS_INIT      /opt/pii-vault/aws-init.py, else ../../scripts/aws-init.py
#   PII_VAULT_SAMPLE_FILE   /opt/pii-vault/sample_data.jsonl, else ../../tests/data/...;
#                           set it empty to create the resources only
#   PII_VAULT_PYTHON        an interpreter that imports boto3 (default: the first found)
set -euo pipefail

log() { printf 'init-aws: %s\n' "$*" >&2; }
die() { printf 'init-aws: ERROR: %s\n' "$*" >&2; exit 1; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# Inside the container the repo is not there; outside it, /opt/pii-vault is not.
first_existing() {
    local path
    for path in "$@"; do
        [[ -e $path ]] && { printf '%s\n' "$path"; return 0; }
    done
    printf '%s\n' "$1"
}

endpoint=${PII_VAULT_ENDPOINT_URL:-http://localhost:4566}
region=${PII_VAULT_REGION:-us-east-1}
queue=${PII_VAULT_QUEUE:-login-queue}
alias=${PII_VAULT_KMS_ALIAS:-alias/pii-vault}
signing_alias=${PII_VAULT_AUDIT_SIGNING_ALIAS:-alias/pii-vault-audit-signer}
witness_bucket=${PII_VAULT_WITNESS_BUCKET:-pii-vault-audit-witness}
witness_days=${PII_VAULT_WITNESS_RETAIN_DAYS:-1}
aws_init=${PII_VAULT_AWS_INIT:-$(first_existing /opt/pii-vault/aws-init.py "$here/../../scripts/aws-init.py")}
if [[ -v PII_VAULT_SAMPLE_FILE ]]; then
    samples=$PII_VAULT_SAMPLE_FILE
else
    samples=$(first_existing /opt/pii-vault/sample_data.jsonl "$here/../../tests/data/sample_data.jsonl")
fi

# The access key decides the account in LocalStack, so it must be the one the pii-vault
# containers use ("test"). Fixed dummy values also mean a developer's real AWS profile can
# never be picked up when this runs outside a container.
export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test
unset AWS_PROFILE AWS_SESSION_TOKEN

# Which python3 the hook sees depends on the image's PATH; LocalStack's own virtualenv always
# has boto3, the system python3 has it through awscli-local.
candidates=(python3 /opt/code/localstack/.venv/bin/python)
[[ -n ${PII_VAULT_PYTHON:-} ]] && candidates=("$PII_VAULT_PYTHON")
python=
for candidate in "${candidates[@]}"; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c \
        'import importlib.util as u, sys; sys.exit(u.find_spec("boto3") is None)' >/dev/null 2>&1; then
        python=$candidate
        break
    fi
done
[[ -n $python ]] || die "no python with boto3 among: ${candidates[*]} (set PII_VAULT_PYTHON)"
[[ -f $aws_init ]] || die "$aws_init not found (set PII_VAULT_AWS_INIT)"

log "creating queue $queue, ${queue}-dlq, $alias, $signing_alias and bucket $witness_bucket at $endpoint"
out=$("$python" "$aws_init" --endpoint-url "$endpoint" --region "$region" \
    --queue "$queue" --alias "$alias" --signing-alias "$signing_alias" \
    --witness-bucket "$witness_bucket" --witness-retain-days "$witness_days") \
    || die "scripts/aws-init.py failed against $endpoint"
printf '%s\n' "$out" | sed 's/^/init-aws: /' >&2
queue_url=$(sed -n 's/^QUEUE_URL=//p' <<<"$out")
[[ -n $queue_url ]] || die "scripts/aws-init.py printed no QUEUE_URL"

if [[ -z $samples ]]; then
    log "no sample file given; queue left as it is"
    exit 0
fi
[[ -f $samples ]] || die "sample file $samples not found (set PII_VAULT_SAMPLE_FILE, or empty to skip)"

# The same bodies `loadgen --file` sends: one message per non-blank line, 10 per request.
"$python" - "$endpoint" "$region" "$queue_url" "$samples" <<'PY' || die "loading $samples failed"
import sys

import boto3

endpoint, region, queue_url, path = sys.argv[1:]
sqs = boto3.session.Session(region_name=region).client("sqs", endpoint_url=endpoint)
with open(path, encoding="utf-8") as f:
    bodies = [line.rstrip("\n") for line in f if line.strip()]
sent = 0
for start in range(0, len(bodies), 10):
    chunk = bodies[start:start + 10]
    result = sqs.send_message_batch(
        QueueUrl=queue_url,
        Entries=[{"Id": str(i), "MessageBody": body} for i, body in enumerate(chunk)],
    )
    if result.get("Failed"):
        failed = result["Failed"][0]
        sys.exit(f"SQS refused {len(result['Failed'])} message(s): {failed['Code']} {failed.get('Message', '')}")
    sent += len(result.get("Successful", []))
print(f"init-aws: sent {sent} sample messages to {queue_url}", file=sys.stderr)
PY
