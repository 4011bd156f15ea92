//! SQS over the Query protocol: form-encoded requests (`Action=ReceiveMessage&...`) answered in
//! XML.
//!
//! LocalStack before 3.0 (the image the original take-home's docker-compose ships) and other
//! old emulators speak nothing else, while the AWS SDK for Rust speaks only the JSON protocol
//! and cannot switch back. [`QuerySqsSource`] is the pipeline's
//! [`MessageSource`](crate::ingest::source::MessageSource) over Query,
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
//!
//! Where each job lives: the client (signing, sending, retrying; GetQueueUrl, CreateQueue and
//! SendMessageBatch) in `client.rs`, the message source in `source.rs`, the form a request is
//! encoded in in `form.rs`, and reading the XML answers (errors, queue URLs, attributes) in
//! `answer.rs`; the XML tree itself is [`crate::aws_http::xml`], shared with the audit witness.

mod answer;
mod client;
mod form;
mod source;

pub use client::QueryClient;
pub use source::QuerySqsSource;
