//! SQS over the Query protocol: form-encoded requests (`Action=ReceiveMessage&...`) answered in
//! XML.
//!
//! LocalStack before 3.0 (the image the original take-home's docker-compose ships) and other
//! old emulators speak nothing else, while the AWS SDK for Rust speaks only the JSON protocol
//! and cannot switch back. [`QuerySqsSource`] is the pipeline's [`MessageSource`] over Query,
//! so validation, sealing, writing and acknowledging are the same whichever protocol the queue
//! speaks; [`QueryClient`] also gives `loadgen` GetQueueUrl, CreateQueue and SendMessageBatch.
//!
//! Requests are SigV4-signed with the region and credentials of the usual AWS chain (the
//! emulators take any credentials but expect a signed request, whose access key picks their
//! account). They go over plain HTTP only: the emulators this exists for serve no TLS, and
//! everything that does, AWS included, speaks JSON. Each request has a deadline. Errors are
//! classified as in the SDK adapter: throttling, server faults and broken connections are
//! transient, and retried a few times here (as the SDK does) before the caller sees them; a
//! missing queue, refused credentials or a bad parameter are not. No error or log line quotes a
//! message body.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::aws_http::{self, HttpClient, Signer, xml};
use crate::ingest::source::sqs::original::{Claimed, ORIGINAL_MESSAGE_ID, ORIGINAL_SENT_TIMESTAMP};
use crate::ingest::source::sqs::{
    PollSettings, SQS_BATCH_LIMIT, is_permanent, is_url, observe_receive, queue_depth,
};
use crate::ingest::source::{Acknowledged, Message, MessageSource, Receipt, SourceError};
use crate::retry::{Backoff, Policy, retry};
use crate::telemetry::observed::QueueDepth;
use aws_sigv4::http_request::SigningSettings;
use http_body_util::Full;
use hyper::body::Bytes;

/// The one version of the SQS Query API.
const API_VERSION: &str = "2012-11-05";
const FORM: &str = "application/x-www-form-urlencoded; charset=utf-8";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request may take beyond its long-poll wait.
const REQUEST_MARGIN: Duration = Duration::from_secs(10);
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
    fn target<'a>(&'a self, queue_url: &'a str) -> &'a str {
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

    /// Sends up to [`SQS_BATCH_LIMIT`] bodies in one SendMessageBatch; fails if SQS refuses any.
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
    async fn call(
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

/// The pipeline's message source over the Query protocol.
#[derive(Debug, Clone)]
pub struct QuerySqsSource {
    client: QueryClient,
    queue_url: String,
    settings: PollSettings,
}

impl QuerySqsSource {
    pub fn new(client: QueryClient, queue_url: String, settings: PollSettings) -> Self {
        Self {
            client,
            queue_url,
            settings,
        }
    }

    /// Succeeds when the queue answers (GetQueueAttributes): the readiness check.
    pub async fn check(&self) -> Result<(), SourceError> {
        let mut form = Form::for_queue("GetQueueAttributes", &self.queue_url);
        form.add("AttributeName.1", "QueueArn");
        let target = self.client.target(&self.queue_url);
        self.client
            .call("GetQueueAttributes", target, form, REQUEST_MARGIN)
            .await
            .map(drop)
    }

    /// The queue's approximate message counts (GetQueueAttributes).
    pub async fn depth(&self) -> Result<QueueDepth, SourceError> {
        const VISIBLE: &str = "ApproximateNumberOfMessages";
        const IN_FLIGHT: &str = "ApproximateNumberOfMessagesNotVisible";
        let mut form = Form::for_queue("GetQueueAttributes", &self.queue_url);
        form.add("AttributeName.1", VISIBLE);
        form.add("AttributeName.2", IN_FLIGHT);
        let target = self.client.target(&self.queue_url);
        let answer = self
            .client
            .call("GetQueueAttributes", target, form, REQUEST_MARGIN)
            .await?;
        let result = answer.child("GetQueueAttributesResult");
        let count = |name: &str| {
            result
                .and_then(|r| system_attribute(r, name))
                .unwrap_or_default()
        };
        queue_depth(count(VISIBLE), count(IN_FLIGHT))
    }
}

impl MessageSource for QuerySqsSource {
    async fn receive(&self) -> Result<Vec<Message>, SourceError> {
        let mut form = Form::for_queue("ReceiveMessage", &self.queue_url);
        form.add("MaxNumberOfMessages", &SQS_BATCH_LIMIT.to_string());
        form.add(
            "WaitTimeSeconds",
            &self.settings.wait_time_seconds.to_string(),
        );
        if let Some(seconds) = self.settings.visibility_timeout_seconds {
            form.add("VisibilityTimeout", &seconds.to_string());
        }
        // The name every version of the Query API knows (MessageSystemAttributeName came later).
        form.add("AttributeName.1", "SentTimestamp");
        // What a replay out of the dead-letter queue carries (`super::original`).
        form.add("MessageAttributeName.1", ORIGINAL_SENT_TIMESTAMP);
        form.add("MessageAttributeName.2", ORIGINAL_MESSAGE_ID);
        let wait = Duration::from_secs(self.settings.wait_time_seconds.max(0) as u64);
        let answer = self
            .client
            .call(
                "ReceiveMessage",
                self.client.target(&self.queue_url),
                form,
                wait + REQUEST_MARGIN,
            )
            .await?;
        let read_at = Instant::now();
        let mut messages = Vec::new();
        let Some(result) = answer.child("ReceiveMessageResult") else {
            observe_receive([]);
            return Ok(messages);
        };
        observe_receive(
            result
                .children("Message")
                .map(|message| system_attribute(message, "SentTimestamp")),
        );
        for message in result.children("Message") {
            let id = message.child_text("MessageId");
            let receipt = message.child_text("ReceiptHandle");
            if id.is_empty() || receipt.is_empty() {
                tracing::warn!("SQS returned a message without id or receipt handle; skipped");
                continue;
            }
            let origin = Claimed {
                message_id: id,
                sent_timestamp: system_attribute(message, "SentTimestamp"),
                original_sent_timestamp: message_attribute(message, ORIGINAL_SENT_TIMESTAMP),
                original_message_id: message_attribute(message, ORIGINAL_MESSAGE_ID),
            }
            .origin();
            messages.push(Message {
                id: origin.message_id,
                // Exactly as sent: whitespace is part of the body.
                body: message
                    .child("Body")
                    .map(|b| b.text.clone().into_bytes())
                    .unwrap_or_default(),
                sent_at: origin.sent_at,
                receipt: Receipt(receipt.to_owned()),
                read_at,
            });
        }
        Ok(messages)
    }

    async fn acknowledge(&self, receipts: Vec<Receipt>) -> Result<Acknowledged, SourceError> {
        let mut outcome = Acknowledged::default();
        for chunk in receipts.chunks(SQS_BATCH_LIMIT) {
            let mut form = Form::for_queue("DeleteMessageBatch", &self.queue_url);
            for (i, receipt) in chunk.iter().enumerate() {
                let n = i + 1;
                form.add(
                    &format!("DeleteMessageBatchRequestEntry.{n}.Id"),
                    &i.to_string(),
                );
                form.add(
                    &format!("DeleteMessageBatchRequestEntry.{n}.ReceiptHandle"),
                    &receipt.0,
                );
            }
            let answer = self
                .client
                .call(
                    "DeleteMessageBatch",
                    self.client.target(&self.queue_url),
                    form,
                    REQUEST_MARGIN,
                )
                .await?;
            let Some(result) = answer.child("DeleteMessageBatchResult") else {
                continue;
            };
            outcome.deleted += result.children("DeleteMessageBatchResultEntry").count();
            for failed in result.children("BatchResultErrorEntry") {
                tracing::warn!(
                    code = failed.child_text("Code"),
                    message = failed.child_text("Message"),
                    "SQS refused to delete a message; it will be redelivered and recognized as stored"
                );
            }
        }
        Ok(outcome)
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

fn failure(operation: &str, why: String, transient: bool) -> SourceError {
    SourceError {
        message: format!("{operation}: {why}"),
        transient,
    }
}

/// `<ErrorResponse><Error><Code>` (AWS, LocalStack, moto, ElasticMQ) or
/// `<Response><Errors><Error>` (some older emulators), whatever the HTTP status said.
fn is_error(root: &xml::Element) -> bool {
    root.name == "ErrorResponse" || root.child("Errors").is_some()
}

fn service_error(operation: &str, status: u16, root: &xml::Element) -> SourceError {
    let error = root.find("Error");
    let code = error.map(|e| e.child_text("Code")).unwrap_or_default();
    // The service's own words (e.g. "The specified queue does not exist for this wsdl
    // version."), cut short: they describe the request, not a message's contents.
    let message: String = error
        .map(|e| e.child_text("Message"))
        .unwrap_or_default()
        .chars()
        .take(200)
        .collect();
    let throttled = ["Throttl", "RequestThrottled", "OverLimit", "SlowDown"]
        .iter()
        .any(|t| code.contains(t));
    let transient = if code.is_empty() {
        status >= 500 || status == 429
    } else {
        throttled || !is_permanent(code)
    };
    let what = if code.is_empty() { "an error" } else { code };
    SourceError {
        message: format!(
            "{operation}: {what} (HTTP {status}) {}",
            message.replace('\n', " ")
        )
        .trim_end()
        .to_owned(),
        transient,
    }
}

fn queue_url_in(operation: &str, answer: &xml::Element) -> Result<String, SourceError> {
    match answer.find("QueueUrl").map(|u| u.text.trim()) {
        Some(url) if !url.is_empty() => Ok(url.to_owned()),
        _ => Err(failure(operation, "no URL in the answer".into(), false)),
    }
}

/// `<Attribute><Name>name</Name><Value>...</Value></Attribute>`: a system attribute's value
/// (of a message, or of the queue in a GetQueueAttributes answer).
fn system_attribute<'a>(message: &'a xml::Element, name: &str) -> Option<&'a str> {
    message
        .children("Attribute")
        .find(|a| a.child_text("Name") == name)
        .map(|a| a.child_text("Value"))
}

/// `<MessageAttribute><Name>name</Name><Value><StringValue>...</StringValue>...`: a message
/// attribute's string value (`String` and `Number` attributes carry one).
fn message_attribute<'a>(message: &'a xml::Element, name: &str) -> Option<&'a str> {
    message
        .children("MessageAttribute")
        .find(|a| a.child_text("Name") == name)?
        .child("Value")?
        .child("StringValue")
        .map(|value| value.text.as_str())
}

/// An `application/x-www-form-urlencoded` request body, built parameter by parameter.
struct Form {
    action: &'static str,
    body: String,
}

impl Form {
    fn new(action: &'static str) -> Self {
        let mut form = Self {
            action,
            body: String::with_capacity(256),
        };
        form.add("Action", action);
        form.add("Version", API_VERSION);
        form
    }

    /// A request about one queue, which the form names (see [`QueryClient::target`]).
    fn for_queue(action: &'static str, queue_url: &str) -> Self {
        let mut form = Self::new(action);
        form.add("QueueUrl", queue_url);
        form
    }

    fn add(&mut self, key: &str, value: &str) {
        if !self.body.is_empty() {
            self.body.push('&');
        }
        aws_http::percent_encode_into(&mut self.body, key);
        self.body.push('=');
        aws_http::percent_encode_into(&mut self.body, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_encodes_everything_but_unreserved_characters() {
        let mut form = Form::new("SendMessageBatch");
        form.add(
            "SendMessageBatchRequestEntry.1.MessageBody",
            "{\"a\": \"é &=+\"}\r\n",
        );
        assert_eq!(
            form.body,
            "Action=SendMessageBatch&Version=2012-11-05&SendMessageBatchRequestEntry.1.MessageBody=\
             %7B%22a%22%3A%20%22%C3%A9%20%26%3D%2B%22%7D%0D%0A"
        );
    }

    #[test]
    fn errors_are_transient_unless_retrying_cannot_help() {
        let error = |status, code: &str| {
            let document = format!(
                "<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code>\
                 <Message>why</Message></Error></ErrorResponse>"
            );
            service_error("Op", status, &xml::parse(document.as_bytes()).unwrap())
        };
        let missing = error(400, "AWS.SimpleQueueService.NonExistentQueue");
        assert!(!missing.transient);
        assert_eq!(
            missing.message,
            "Op: AWS.SimpleQueueService.NonExistentQueue (HTTP 400) why"
        );
        assert!(!error(400, "QueueDoesNotExist").transient);
        assert!(!error(403, "InvalidClientTokenId").transient);
        assert!(!error(403, "SignatureDoesNotMatch").transient);
        assert!(error(503, "RequestThrottled").transient);
        assert!(error(400, "ThrottlingException").transient);
        assert!(error(500, "InternalError").transient);
        let no_code = xml::parse(b"<html><body>Bad Gateway</body></html>").unwrap();
        assert!(service_error("Op", 502, &no_code).transient);
        assert!(!service_error("Op", 404, &no_code).transient);
    }

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
