//! One signed request to the witness bucket, retried while it fails transiently, and S3's
//! answers read into [`WitnessError`]s.

use std::time::Duration;

use aws_sigv4::http_request::{
    PayloadChecksumKind, PercentEncodingMode, SigningSettings, UriPathNormalizationMode,
};
use http_body_util::Full;
use hyper::body::Bytes;

use super::{WitnessBucket, WitnessError};
use crate::aws_http::{self, SignError, xml};
use crate::retry::{Backoff, Policy, retry};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const ATTEMPTS: u32 = 4;
/// A listing page or a checkpoint object is a few KiB; anything past this is not S3's.
const MAX_ANSWER_BYTES: usize = 8 << 20;

/// An HTTP answer: status and body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

impl WitnessBucket {
    /// One signed request to the bucket (`path` after the bucket: `/key`, `?query`, or
    /// empty), retried while it fails transiently; any HTTP answer is returned as it is.
    pub async fn send(
        &self,
        operation: &str,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> Result<Answer, WitnessError> {
        let body = Bytes::from(body);
        retry(
            Policy::at_most(ATTEMPTS).backoff(Backoff::new(
                Duration::from_millis(200),
                Duration::from_secs(2),
            )),
            |error: &WitnessError| error.is_transient(),
            |error, delay| {
                tracing::debug!(%error, retry_in = ?delay, "S3 request failed; retrying");
            },
            || async {
                let answer = self
                    .send_once(operation, method, path, headers, body.clone())
                    .await?;
                if answer.status >= 500 {
                    // Server faults are retried; the answer of the last try is returned.
                    let refused = self.refusal(operation, &answer);
                    if refused.is_transient() {
                        return Err(refused);
                    }
                }
                Ok(answer)
            },
        )
        .await
    }

    async fn send_once(
        &self,
        operation: &str,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> Result<Answer, WitnessError> {
        let url = format!("{}/{}{}", self.endpoint, self.bucket, path);
        let mut builder = hyper::Request::builder().method(method).uri(&url);
        for (name, value) in headers {
            builder = builder.header(*name, value);
        }
        let mut request = builder
            .body(Full::new(body.clone()))
            .map_err(|e| self.failure(operation, format!("{url}: {e}"), false))?;
        let mut settings = SigningSettings::default();
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        self.signer
            .sign(&mut request, &body, settings)
            .await
            .map_err(|e: SignError| self.failure(operation, e.to_string(), e.is_transient()))?;
        let (status, body) = aws_http::exchange(
            &self.http,
            request,
            &self.endpoint,
            MAX_ANSWER_BYTES,
            REQUEST_TIMEOUT,
        )
        .await
        .map_err(|e| self.failure(operation, e.to_string(), true))?;
        Ok(Answer { status, body })
    }

    /// The body of a 2xx answer, else S3's refusal in one line.
    pub(super) fn ok(&self, operation: &str, answer: Answer) -> Result<Bytes, WitnessError> {
        if (200..300).contains(&answer.status) {
            Ok(answer.body)
        } else {
            Err(self.refusal(operation, &answer))
        }
    }

    /// S3's error answer (`<Error><Code>…</Code><Message>…</Message></Error>`) as one line.
    pub fn refusal(&self, operation: &str, answer: &Answer) -> WitnessError {
        let root = xml::parse(&answer.body).ok();
        let error = root.as_ref().and_then(|root| root.find("Error"));
        let field = |name: &str| {
            error
                .map(|e| e.child_text(name))
                .unwrap_or_default()
                .chars()
                .take(200)
                .collect::<String>()
                .replace('\n', " ")
        };
        let code = field("Code");
        WitnessError::Refused {
            bucket: self.bucket.clone(),
            operation: operation.to_owned(),
            status: answer.status,
            code: if code.is_empty() {
                "an error".to_owned()
            } else {
                code
            },
            message: field("Message"),
        }
    }

    pub(super) fn failure(&self, operation: &str, why: String, transient: bool) -> WitnessError {
        WitnessError::Request {
            bucket: self.bucket.clone(),
            operation: operation.to_owned(),
            why,
            transient,
        }
    }
}
