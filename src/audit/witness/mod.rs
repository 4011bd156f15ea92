//! The audit's witness: every checkpoint, also written to an S3 bucket with Object Lock in
//! COMPLIANCE mode, which nobody (the database owner, the bucket's owner, AWS root) can delete
//! or overwrite before its retention ends.
//!
//! Layout: one object per checkpoint, `checkpoints/<seq, 20 digits>.json`, written once
//! (`If-None-Match: *`) with its own retention (`x-amz-object-lock-mode: COMPLIANCE`,
//! `x-amz-object-lock-retain-until-date`), so the newest sorts last. The object holds what
//! the database row holds: seq, last audit id, head hash, signed_at, the KMS key id and the
//! signature (docs/FORMAT.md §7).
//!
//! Object Lock keeps object *versions*; it does not stop anyone allowed `s3:PutObject` from
//! stacking a newer version on a key, or anyone allowed `s3:DeleteObject` from adding a
//! delete marker that hides a key from ListObjectsV2 and GetObject. So the newest checkpoint
//! is looked for among all versions (ListObjectVersions, GetObject by version id), newest
//! number first, and a version that is not a checkpoint signed by the audit key under its own
//! number is named and skipped: only the signer can make one that counts, and nobody can
//! remove one.
//!
//! Requests are path-style (`<endpoint>/<bucket>/<key>`) against `AWS_ENDPOINT_URL_S3` or
//! `AWS_ENDPOINT_URL` when set (LocalStack), else `https://s3.<region>.amazonaws.com`, signed
//! with SigV4 ([`crate::aws_http`]).

mod object;
mod request;

use std::time::Duration;

use hyper::body::Bytes;
use md5::{Digest, Md5};
use p256::ecdsa::VerifyingKey;
use time::OffsetDateTime;

use object::{PREFIX, seq_of, verified};
pub use object::{from_object, object_key, to_object};
pub use request::Answer;

use super::{Checkpoint, Skipped};
use crate::aws_http::{self, HttpClient, Signer, xml};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the witness could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    #[error("witness bucket {bucket}: {operation}: {why}")]
    Request {
        bucket: String,
        operation: String,
        why: String,
        transient: bool,
    },
    #[error(
        "witness bucket {bucket}: {operation}: S3 refused it: {code} (HTTP {status}) {message}"
    )]
    Refused {
        bucket: String,
        operation: String,
        status: u16,
        code: String,
        message: String,
    },
    #[error(
        "witness bucket {bucket}: checkpoint seq {seq} is witnessed already with other content"
    )]
    Conflict { bucket: String, seq: i64 },
    #[error(
        "witness bucket {bucket} has no Object Lock: what it holds could be deleted, so it witnesses nothing"
    )]
    NotLocked { bucket: String },
}

impl WitnessError {
    fn is_transient(&self) -> bool {
        match self {
            WitnessError::Request { transient, .. } => *transient,
            WitnessError::Refused { status, code, .. } => {
                *status >= 500 || *status == 429 || code.contains("SlowDown")
            }
            WitnessError::Conflict { .. } | WitnessError::NotLocked { .. } => false,
        }
    }
}

/// The newest checkpoint the witness holds, and what was skipped on the way to it.
#[derive(Debug, Clone, Default)]
pub struct Newest {
    pub checkpoint: Option<Checkpoint>,
    pub skipped: Vec<Skipped>,
}

/// The witness bucket.
#[derive(Debug)]
pub struct WitnessBucket {
    http: HttpClient,
    signer: Signer,
    endpoint: String,
    bucket: String,
    retain_days: u32,
}

impl WitnessBucket {
    /// The bucket `bucket`, reached with the endpoint, region and credentials of `aws`;
    /// objects written are retained `retain_days` days in COMPLIANCE mode.
    pub fn new(aws: &aws_config::SdkConfig, bucket: &str, retain_days: u32) -> Self {
        let signer = Signer::new(aws, "s3");
        let endpoint = aws_http::configured_endpoint(aws, "S3").unwrap_or_else(|| {
            format!(
                "https://s3.{}.amazonaws.com",
                signer.region().unwrap_or("us-east-1")
            )
        });
        Self {
            http: aws_http::http_client(CONNECT_TIMEOUT),
            signer,
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            bucket: bucket.to_owned(),
            retain_days,
        }
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Creates the bucket with Object Lock on and a default COMPLIANCE retention of
    /// `retain_days` (an existing bucket of ours is left as it is). For tests and local set-up;
    /// in production the bucket is made once, by whoever owns the account.
    pub async fn create(&self) -> Result<(), WitnessError> {
        let region = self.signer.region().unwrap_or("us-east-1");
        let location = if region == "us-east-1" {
            Vec::new()
        } else {
            format!(
                "<CreateBucketConfiguration><LocationConstraint>{region}</LocationConstraint></CreateBucketConfiguration>"
            )
            .into_bytes()
        };
        let answer = self
            .send(
                "CreateBucket",
                "PUT",
                "",
                &[("x-amz-bucket-object-lock-enabled", "true".into())],
                location,
            )
            .await?;
        if answer.status != 409 || !self.refusal("CreateBucket", &answer).is_owned() {
            self.ok("CreateBucket", answer)?;
        }
        let config = format!(
            "<ObjectLockConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
             <ObjectLockEnabled>Enabled</ObjectLockEnabled><Rule><DefaultRetention>\
             <Mode>COMPLIANCE</Mode><Days>{}</Days></DefaultRetention></Rule>\
             </ObjectLockConfiguration>",
            self.retain_days
        )
        .into_bytes();
        let md5 = content_md5(&config);
        let answer = self
            .send(
                "PutObjectLockConfiguration",
                "PUT",
                "?object-lock",
                &[("content-md5", md5)],
                config,
            )
            .await?;
        self.ok("PutObjectLockConfiguration", answer).map(drop)
    }

    /// Writes `checkpoint` (numbered) once, locked in COMPLIANCE mode for `retain_days`. An
    /// object already there with the same content is success (a run that ended before hearing
    /// S3's answer); with other content, a conflict.
    pub async fn put(&self, checkpoint: &Checkpoint) -> Result<(), WitnessError> {
        let seq = checkpoint.seq.unwrap_or(0);
        let key = object_key(seq);
        if self.put_locked(&key, to_object(checkpoint)).await? {
            return Ok(());
        }
        match from_object(&self.get(&key).await?) {
            Some(there) if there.states_the_same_as(checkpoint) => Ok(()),
            _ => Err(WitnessError::Conflict {
                bucket: self.bucket.clone(),
                seq,
            }),
        }
    }

    /// Writes object `key` unless one is there (`false`: it was), locked in COMPLIANCE mode
    /// for `retain_days`.
    pub async fn put_locked(&self, key: &str, body: Vec<u8>) -> Result<bool, WitnessError> {
        let retain_until =
            OffsetDateTime::now_utc() + time::Duration::days(self.retain_days.into());
        let operation = format!("PutObject {key}");
        let answer = self
            .send(
                &operation,
                "PUT",
                &format!("/{key}"),
                &[
                    ("content-type", "application/json".into()),
                    ("content-md5", content_md5(&body)),
                    ("if-none-match", "*".into()),
                    ("x-amz-object-lock-mode", "COMPLIANCE".into()),
                    ("x-amz-object-lock-retain-until-date", rfc3339(retain_until)),
                ],
                body,
            )
            .await?;
        if answer.status == 412 {
            return Ok(false);
        }
        self.ok(&operation, answer).map(|_| true)
    }

    /// The newest checkpoint that verifies under `signer`, among every version of every
    /// checkpoint object (versions that do not verify are skipped and named).
    /// The bucket must have Object Lock on.
    pub async fn newest(&self, signer: &VerifyingKey) -> Result<Newest, WitnessError> {
        self.check_locked().await?;
        let mut newest = Newest::default();
        let mut versions = self.versions().await?;
        // Newest number first; within a key, S3 lists the newest version first.
        versions.sort_by_key(|(key, _)| std::cmp::Reverse(seq_of(key)));
        for (key, version) in versions {
            let bytes = self.get_version(&key, &version).await?;
            match verified(&key, &bytes, signer) {
                Some(checkpoint) => {
                    newest.checkpoint = Some(checkpoint);
                    break;
                }
                None => newest.skipped.push(Skipped::WitnessObject {
                    key: format!("{key} (version {version})"),
                }),
            }
        }
        Ok(newest)
    }

    /// Refuses a bucket without Object Lock (GetObjectLockConfiguration): anyone allowed to
    /// delete in it could remove a witnessed checkpoint.
    pub async fn check_locked(&self) -> Result<(), WitnessError> {
        let operation = "GetObjectLockConfiguration";
        let answer = self
            .send(operation, "GET", "?object-lock", &[], Vec::new())
            .await?;
        let not_locked = || WitnessError::NotLocked {
            bucket: self.bucket.clone(),
        };
        if answer.status == 404
            && self.refusal(operation, &answer).code()
                == Some("ObjectLockConfigurationNotFoundError")
        {
            return Err(not_locked());
        }
        let body = self.ok(operation, answer)?;
        let root = xml::parse(&body).map_err(|why| self.failure(operation, why, false))?;
        match root.find("ObjectLockEnabled") {
            Some(enabled) if enabled.text.trim() == "Enabled" => Ok(()),
            _ => Err(not_locked()),
        }
    }

    /// (key, version id) of every version under `checkpoints/`, delete markers left out
    /// (ListObjectVersions, page by page).
    pub async fn versions(&self) -> Result<Vec<(String, String)>, WitnessError> {
        self.versions_under(PREFIX).await
    }

    /// (key, version id) of every version of the objects whose key starts with `prefix`.
    pub async fn versions_under(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, String)>, WitnessError> {
        let mut versions = Vec::new();
        let mut marker: Option<(String, String)> = None;
        loop {
            let mut query = String::from("?versions&prefix=");
            aws_http::percent_encode_into(&mut query, prefix);
            if let Some((key, version)) = &marker {
                query.push_str("&key-marker=");
                aws_http::percent_encode_into(&mut query, key);
                query.push_str("&version-id-marker=");
                aws_http::percent_encode_into(&mut query, version);
            }
            let answer = self
                .send("ListObjectVersions", "GET", &query, &[], Vec::new())
                .await?;
            let body = self.ok("ListObjectVersions", answer)?;
            let root =
                xml::parse(&body).map_err(|why| self.failure("ListObjectVersions", why, false))?;
            versions.extend(root.children("Version").map(|v| {
                (
                    v.child_text("Key").to_owned(),
                    v.child_text("VersionId").to_owned(),
                )
            }));
            marker = (root.child_text("IsTruncated") == "true").then(|| {
                (
                    root.child_text("NextKeyMarker").to_owned(),
                    root.child_text("NextVersionIdMarker").to_owned(),
                )
            });
            if marker.is_none() {
                return Ok(versions);
            }
        }
    }

    /// One version of object `key`.
    pub async fn get_version(&self, key: &str, version: &str) -> Result<Bytes, WitnessError> {
        let operation = format!("GetObject {key} version {version}");
        let mut path = format!("/{key}?versionId=");
        aws_http::percent_encode_into(&mut path, version);
        let answer = self.send(&operation, "GET", &path, &[], Vec::new()).await?;
        self.ok(&operation, answer)
    }

    /// The current version of object `key`.
    pub async fn get(&self, key: &str) -> Result<Bytes, WitnessError> {
        let operation = format!("GetObject {key}");
        let answer = self
            .send(&operation, "GET", &format!("/{key}"), &[], Vec::new())
            .await?;
        self.ok(&operation, answer)
    }
}

impl WitnessError {
    /// S3's error code, if S3 refused the request.
    pub fn code(&self) -> Option<&str> {
        match self {
            WitnessError::Refused { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The bucket exists and is ours already.
    fn is_owned(&self) -> bool {
        self.code() == Some("BucketAlreadyOwnedByYou")
    }
}

/// `Content-MD5`: the base64 of the body's MD5 (S3 requires it with Object Lock).
fn content_md5(body: &[u8]) -> String {
    aws_http::base64(&Md5::digest(body))
}

/// `2026-12-04T15:30:51Z` (S3's retain-until date), to the second.
fn rfc3339(at: OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::SigningKey;

    /// Checkpoint `seq` of a chain's second row, signed by `key`.
    fn signed(seq: i64, key: &SigningKey) -> Checkpoint {
        let rows = super::super::tests::chain(2, 2);
        let mut checkpoint = super::super::tests::signed(0, Some(seq), &rows[1], key);
        checkpoint.created_by = "the witness".into();
        checkpoint
    }

    #[test]
    fn keys_sort_by_number_and_only_checkpoint_keys_count() {
        assert_eq!(object_key(3), "checkpoints/00000000000000000003.json");
        assert_eq!(seq_of(&object_key(i64::MAX)), Some(i64::MAX));
        for other in [
            "checkpoints/3.json",
            "checkpoints/0000000000000000000x.json",
            "other/00000000000000000003.json",
        ] {
            assert_eq!(seq_of(other), None, "{other}");
        }
        let mut keys = [object_key(10), object_key(9), object_key(100)];
        keys.sort();
        assert_eq!(keys, [object_key(9), object_key(10), object_key(100)]);
    }

    #[test]
    fn an_object_counts_only_signed_under_its_own_number() {
        let key = SigningKey::from_slice(&[7u8; 32]).unwrap();
        let public = *key.verifying_key();
        let checkpoint = signed(5, &key);
        let object = to_object(&checkpoint);
        assert_eq!(from_object(&object).as_ref(), Some(&checkpoint));
        assert!(verified(&object_key(5), &object, &public).is_some());
        // The same object copied under a newer number, another signer, garbage.
        assert!(verified(&object_key(6), &object, &public).is_none());
        let other = SigningKey::from_slice(&[8u8; 32]).unwrap();
        assert!(verified(&object_key(5), &to_object(&signed(5, &other)), &public).is_none());
        assert!(verified(&object_key(5), b"{}", &public).is_none());
    }

    #[test]
    fn headers_are_encoded_as_s3_expects() {
        // RFC 1321's MD5 of "abc", in base64.
        assert_eq!(content_md5(b"abc"), "kAFQmDzST7DWlj99KOF/cg==");
        let at = OffsetDateTime::from_unix_timestamp(1_796_398_251).unwrap();
        assert_eq!(rfc3339(at), "2026-12-04T15:30:51Z");
    }
}
