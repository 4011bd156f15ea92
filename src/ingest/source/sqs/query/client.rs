//! The Query protocol's client: SigV4-signed form requests over plain HTTP, each with a
//! deadline and retried while it fails transiently, and the calls that are not the message
//! source's (GetQueueUrl, CreateQueue, SendMessageBatch).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::answer::{failure, is_error, queue_url_in, service_error};
use super::form::Form;
use crate::aws_http::{self, HttpClient, Signer, xml};
use crate::ingest::source::SourceError;
use crate::ingest::source::sqs::is_url;
use crate::retry::{Backoff, Policy, retry};
use aws_sigv4::http_request::SigningSettings;
use http_body_util::Full;
use hyper::body::Bytes;

const FORM: &str = "application/x-www-form-urlencoded; charset=utf-8";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request may take beyond its long-poll wait.
pub(super) const REQUEST_MARGIN: Duration = Duration::from_secs(10);
/// Attempts at a request that fails transiently, as many as the SDK makes (`cli::aws_config`).
const ATTEMPTS: u32 = 5;
/// Ten messages of 256 KiB each, every byte of them escaped: an answer past this is no SQS's.
const MAX_ANSWER_BYTES: usize = 32 << 20;

/// An SQS client for the Query protocol. Cheap to clone: clones share connections and
/// credentials.
#[derive(Clone)]
pub struct QueryClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: HttpClient,
    /// Where GetQueueUrl and CreateQueue go: `AWS_ENDPOINT_URL_SQS`, else `AWS_ENDPOINT_URL`,
    /// else AWS's own endpoint for the region (which this client refuses: it is HTTPS).
    endpoint: String,
    /// Whether `endpoint` was configured rather than AWS's own.
    configured: bool,
    signer: Signer,
}

// Credentials stay out of Debug output.
impl fmt::Debug for QueryClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueryClient")
            .field("endpoint", &self.inner.endpoint)
            .field("region", &self.inner.signer.region())
            .finish_non_exhaustive()
    }
}

impl QueryClient {
    /// A client with the endpoint, region and credentials of `aws` (see `cli::aws_config`).
    pub fn new(aws: &aws_config::SdkConfig) -> Self {
        let signer = Signer::new(aws, "sqs");
        let configured = aws_http::configured_endpoint(aws, "SQS");
        let endpoint = configured.clone().unwrap_or_else(|| {
            format!(
                "https://sqs.{}.amazonaws.com",
                signer.region().unwrap_or("us-east-1")
            )
        });
        Self {
            inner: Arc::new(Inner {
                http: aws_http::http_client(CONNECT_TIMEOUT),
                endpoint,
                configured: configured.is_some(),
                signer,
            }),
        }
    }

    /// The URL GetQueueUrl and CreateQueue are sent to.
    pub fn endpoint(&self) -> &str {
        &self.inner.endpoint
    }

    /// Where a request about the queue at `queue_url` goes: the configured endpoint, naming
    /// the queue in the form as the AWS CLI does (an old LocalStack's queue URLs name the host
    /// it was told it has, `localhost` by default, which another container cannot reach), else
    /// the queue URL itself.
    pub(super) fn target<'a>(&'a self, queue_url: &'a str) -> &'a str {
        if self.inner.configured {
            &self.inner.endpoint
        } else {
            queue_url
        }
    }

    /// The queue URL for `queue`, which is either a URL already or a queue name.
    pub async fn get_queue_url(&self, queue: &str) -> Result<String, SourceError> {
        if is_url(queue) {
            check_plain_http(queue)?;
            return Ok(queue.to_owned());
        }
        let operation = format!("GetQueueUrl {queue}");
        let mut form = Form::new("GetQueueUrl");
        form.add("QueueName", queue);
        let answer = self
            .call(&operation, &self.inner.endpoint, form, REQUEST_MARGIN)
            .await?;
        queue_url_in(&operation, &answer)
    }

    /// The URL of queue `name`, created with default attributes if it is missing (an existing
    /// queue is left as it is).
    pub async fn create_queue(&self, name: &str) -> Result<String, SourceError> {
        let operation = format!("CreateQueue {name}");
        let mut form = Form::new("CreateQueue");
        form.add("QueueName", name);
        let answer = self
            .call(&operation, &self.inner.endpoint, form, REQUEST_MARGIN)
            .await?;
        queue_url_in(&operation, &answer)
    }

    /// Sends up to [`SQS_BATCH_LIMIT`](crate::ingest::source::sqs::SQS_BATCH_LIMIT) bodies in one
    /// SendMessageBatch; fails if SQS refuses any.
    pub async fn send_batch(
        &self,
        queue_url: &str,
        bodies: &[String],
    ) -> Result<usize, SourceError> {
        let mut form = Form::for_queue("SendMessageBatch", queue_url);
        for (i, body) in bodies.iter().enumerate() {
            let n = i + 1;
            form.add(
                &format!("SendMessageBatchRequestEntry.{n}.Id"),
                &i.to_string(),
            );
            form.add(
                &format!("SendMessageBatchRequestEntry.{n}.MessageBody"),
                body,
            );
        }
        let answer = self
            .call(
                "SendMessageBatch",
                self.target(queue_url),
                form,
                REQUEST_MARGIN,
            )
            .await?;
        let result = answer.child("SendMessageBatchResult");
        let failed: Vec<&xml::Element> = result
            .map(|r| r.children("BatchResultErrorEntry").collect())
            .unwrap_or_default();
        if let Some(first) = failed.first() {
            // The answer's message is the service's own words about the entry, never its body.
            return Err(SourceError {
                message: format!(
                    "SQS refused {} message(s) of a batch: {} {}",
                    failed.len(),
                    first.child_text("Code"),
                    first.child_text("Message")
                ),
                transient: first.child_text("SenderFault") != "true",
            });
        }
        Ok(result.map_or(0, |r| r.children("SendMessageBatchResultEntry").count()))
    }

    /// One request, tried again while it fails transiently: the parsed 2xx answer.
    pub(super) async fn call(
        &self,
        operation: &str,
        url: &str,
        form: Form,
        timeout: Duration,
    ) -> Result<xml::Element, SourceError> {
        let expected = format!("{}Response", form.action);
        let body = Bytes::from(form.body);
        retry(
            Policy::at_most(ATTEMPTS).backoff(Backoff::new(
                Duration::from_millis(200),
                Duration::from_secs(5),
            )),
            |error: &SourceError| error.transient,
            |error, delay| {
                tracing::debug!(%error, retry_in = ?delay, "SQS Query request failed; retrying");
            },
            || self.call_once(operation, &expected, url, body.clone(), timeout),
        )
        .await
    }

    async fn call_once(
        &self,
        operation: &str,
        expected: &str,
        url: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<xml::Element, SourceError> {
        check_plain_http(url)?;
        let request = self.signed_request(operation, url, body).await?;
        let (status, answer) =
            aws_http::exchange(&self.inner.http, request, url, MAX_ANSWER_BYTES, timeout)
                .await
                .map_err(|e| failure(operation, e.to_string(), true))?;
        let success = (200..300).contains(&status);
        match xml::parse(&answer) {
            Ok(root) if success && root.name == expected => Ok(root),
            Ok(root) if success && !is_error(&root) => Err(failure(
                operation,
                format!(
                    "HTTP {status} answered with <{}> instead of <{expected}>",
                    root.name
                ),
                false,
            )),
            Ok(root) => Err(service_error(operation, status, &root)),
            Err(why) if success => Err(failure(operation, format!("HTTP {status}: {why}"), false)),
            Err(_) => Err(failure(
                operation,
                format!("HTTP {status} with an answer that is not SQS's XML"),
                status >= 500 || status == 429,
            )),
        }
    }

    async fn signed_request(
        &self,
        operation: &str,
        url: &str,
        body: Bytes,
    ) -> Result<hyper::Request<Full<Bytes>>, SourceError> {
        let mut request = hyper::Request::post(url)
            .header(hyper::header::CONTENT_TYPE, FORM)
            .body(Full::new(body.clone()))
            .map_err(|e| failure(operation, format!("{url}: {e}"), false))?;
        self.inner
            .signer
            .sign(&mut request, &body, SigningSettings::default())
            .await
            .map_err(|e| failure(operation, e.to_string(), e.is_transient()))?;
        Ok(request)
    }
}

/// This client speaks plain HTTP only; one clear line for anything else.
fn check_plain_http(url: &str) -> Result<(), SourceError> {
    if url.starts_with("http://") {
        return Ok(());
    }
    Err(SourceError {
        message: format!(
            "{url}: the SQS Query protocol is spoken over plain HTTP only, for local emulators \
             older than LocalStack 3.0; an HTTPS endpoint (AWS itself, a newer LocalStack) speaks \
             JSON: use --sqs-protocol json"
        ),
        transient: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_is_refused_in_one_line() {
        let refused = check_plain_http("https://sqs.us-east-1.amazonaws.com/1/q").unwrap_err();
        assert!(!refused.transient);
        assert!(
            refused.message.contains("--sqs-protocol json"),
            "{}",
            refused.message
        );
        assert!(!refused.message.contains('\n'));
    }
}
