#!/usr/bin/env python3
"""Create the SQS queues, KMS keys and S3 witness bucket pii-vault needs, in an AWS emulator.

Meant for scripts/services (LocalStack on the host, or moto) and the compose
LocalStack init hook: it only needs boto3, and every run converges to the same
state, because emulators keep state in memory and lose it on restart, so this
runs on every start. Nothing here assumes an account id: emulators differ
(and AWS accounts do), so ARNs and URLs are always read back from the service.

Prints the resources as KEY=value lines on stdout, for scripts to parse.
"""

import argparse
import json
import os
import sys

import boto3
from botocore.exceptions import ClientError


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--endpoint-url",
                   default=os.environ.get("AWS_ENDPOINT_URL", "http://127.0.0.1:4566"),
                   help="emulator URL (default: $AWS_ENDPOINT_URL or %(default)s)")
    p.add_argument("--region",
                   default=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
                   help="region (default: $AWS_REGION or %(default)s)")
    p.add_argument("--queue", default="login-queue", help="main queue name (default: %(default)s)")
    p.add_argument("--dlq", help="dead-letter queue name (default: <queue>-dlq)")
    p.add_argument("--max-receive-count", type=int, default=5,
                   help="receives before a message moves to the DLQ (default: %(default)s)")
    p.add_argument("--visibility-timeout", type=int, default=30,
                   help="main queue visibility timeout in seconds (default: %(default)s)")
    p.add_argument("--alias", default="alias/pii-vault", help="KMS key alias (default: %(default)s)")
    p.add_argument("--signing-alias", default="alias/pii-vault-audit-signer",
                   help="alias of the asymmetric key that signs audit checkpoints (default: %(default)s)")
    p.add_argument("--witness-bucket",
                   default=os.environ.get("AUDIT_WITNESS_BUCKET", "pii-vault-audit-witness"),
                   help="S3 bucket (Object Lock, COMPLIANCE) that witnesses audit checkpoints "
                        "(default: $AUDIT_WITNESS_BUCKET or %(default)s)")
    p.add_argument("--witness-retain-days", type=int,
                   default=int(os.environ.get("AUDIT_WITNESS_RETAIN_DAYS", "1")),
                   help="default COMPLIANCE retention of the witness bucket, in days "
                        "(default: $AUDIT_WITNESS_RETAIN_DAYS or %(default)s; in production the "
                        "audit's retention period, e.g. 2557)")
    p.add_argument("--known-key", action="append", default=[], metavar="ARN",
                   help="a KMS key the local database wraps keys under; printed as "
                        "LOST_KMS_KEY=<arn> when the emulator no longer has it (repeatable)")
    args = p.parse_args()
    if args.dlq is None:
        args.dlq = args.queue + "-dlq"
    args.alias = with_alias_prefix(args.alias)
    args.signing_alias = with_alias_prefix(args.signing_alias)
    return args


def with_alias_prefix(name):
    return name if name.startswith("alias/") else "alias/" + name


def ensure_queue(sqs, name, attributes):
    """Return the URL of queue `name`, created or updated to `attributes`.

    CreateQueue alone is not idempotent once attributes change (it fails with
    QueueAlreadyExists), so an existing queue gets SetQueueAttributes instead.
    """
    try:
        url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
    except ClientError as e:
        if e.response["Error"]["Code"] not in ("AWS.SimpleQueueService.NonExistentQueue",
                                               "QueueDoesNotExist"):
            raise
        return sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
    if attributes:
        sqs.set_queue_attributes(QueueUrl=url, Attributes=attributes)
    return url


def ensure_key(kms, alias, key_spec="SYMMETRIC_DEFAULT", key_usage="ENCRYPT_DECRYPT",
               description="pii-vault envelope encryption (local emulator)"):
    """Return the ARN of the key behind `alias`, creating both if missing.

    An alias left pointing at a key of another kind (made by hand) would only
    fail later, at the first Sign or GenerateDataKey call, so it is repointed
    at a new key of the right kind now. A disabled key is left as it is: it
    may be disabled on purpose, and what it wrapped needs that very key.
    """
    try:
        meta = kms.describe_key(KeyId=alias)["KeyMetadata"]
    except ClientError as e:
        if e.response["Error"]["Code"] != "NotFoundException":
            raise
        meta = None
    if meta:
        # Older emulators name the spec CustomerMasterKeySpec; absent means "as asked".
        spec = meta.get("KeySpec", meta.get("CustomerMasterKeySpec", key_spec))
        if (spec, meta.get("KeyUsage", key_usage)) == (key_spec, key_usage):
            return meta["Arn"]
    key = kms.create_key(KeySpec=key_spec, KeyUsage=key_usage, Description=description)["KeyMetadata"]
    if meta:
        kms.update_alias(AliasName=alias, TargetKeyId=key["KeyId"])
    else:
        kms.create_alias(AliasName=alias, TargetKeyId=key["KeyId"])
    return key["Arn"]


def ensure_witness_bucket(s3, name, region, days):
    """Create bucket `name` with Object Lock on and a default COMPLIANCE retention of `days`.

    Object Lock can only be turned on when a bucket is made (it turns versioning on too), so
    an existing bucket without it is an error to fix by hand, not something to paper over.
    Locked object versions cannot be deleted by anyone until their retention ends, which is
    what makes the bucket a witness the database owner cannot rewrite.
    """
    try:
        extra = {} if region == "us-east-1" else {
            "CreateBucketConfiguration": {"LocationConstraint": region}}
        s3.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True, **extra)
    except ClientError as e:
        if e.response["Error"]["Code"] != "BucketAlreadyOwnedByYou":
            raise
    lock = s3.get_object_lock_configuration(Bucket=name)["ObjectLockConfiguration"]
    if lock.get("ObjectLockEnabled") != "Enabled":
        raise RuntimeError(f"bucket {name} exists without Object Lock; it cannot witness")
    s3.put_object_lock_configuration(Bucket=name, ObjectLockConfiguration={
        "ObjectLockEnabled": "Enabled",
        "Rule": {"DefaultRetention": {"Mode": "COMPLIANCE", "Days": days}},
    })
    return name


def main():
    args = parse_args()
    # Emulators accept any credentials, but boto3 refuses to sign without some.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
    session = boto3.session.Session(region_name=args.region)
    sqs = session.client("sqs", endpoint_url=args.endpoint_url)
    kms = session.client("kms", endpoint_url=args.endpoint_url)
    s3 = session.client("s3", endpoint_url=args.endpoint_url)

    dlq_url = ensure_queue(sqs, args.dlq, {})
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])[
        "Attributes"]["QueueArn"]
    queue_url = ensure_queue(sqs, args.queue, {
        "VisibilityTimeout": str(args.visibility_timeout),
        "RedrivePolicy": json.dumps({
            "deadLetterTargetArn": dlq_arn,
            "maxReceiveCount": args.max_receive_count,
        }),
    })
    key_arn = ensure_key(kms, args.alias)
    # Audit checkpoints are signed with a private key that never leaves KMS, so that whoever
    # can write the audit table still cannot forge a checkpoint; anyone can verify with the
    # public key (GetPublicKey).
    signing_arn = ensure_key(kms, args.signing_alias, key_spec="ECC_NIST_P256",
                             key_usage="SIGN_VERIFY",
                             description="pii-vault audit checkpoint signing (local emulator)")

    witness = ensure_witness_bucket(s3, args.witness_bucket, args.region, args.witness_retain_days)

    print(f"QUEUE_URL={queue_url}")
    print(f"DLQ_URL={dlq_url}")
    print(f"KMS_KEY_ARN={key_arn}")
    print(f"KMS_KEY_ALIAS={args.alias}")
    print(f"AUDIT_SIGNING_KEY_ARN={signing_arn}")
    print(f"AUDIT_SIGNING_KEY_ALIAS={args.signing_alias}")
    print(f"AUDIT_WITNESS_BUCKET={witness}")
    for arn in args.known_key:
        if not key_exists(kms, arn):
            print(f"LOST_KMS_KEY={arn}")


def key_exists(kms, key_id):
    """Whether KMS still has `key_id` (an emulator keeps its keys in memory only)."""
    try:
        kms.describe_key(KeyId=key_id)
        return True
    except kms.exceptions.NotFoundException:
        return False
    except Exception:  # cannot tell: say nothing rather than warn wrongly
        return True


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # one clear line instead of a botocore traceback
        print(f"aws-init: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
