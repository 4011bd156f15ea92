//! SigV4-signed HTTP for the AWS services this crate speaks without an SDK client: SQS over
//! the Query protocol (`ingest::source::sqs::query`, for old emulators) and the audit witness
//! bucket on S3 (`audit::witness`; the S3 SDK would double the build for four calls).
//!
//! One [`Signer`] per client holds the region and the usual AWS credential chain (fetched
//! again only near expiry) and signs each request; [`http_client`] is the connection pool
//! (HTTPS through the SDK's own rustls, or plain HTTP for emulators); [`xml`] reads the
//! services' XML answers; [`configured_endpoint`] resolves `AWS_ENDPOINT_URL_<SERVICE>` and
//! `AWS_ENDPOINT_URL` as the SDK's clients do. No error from here quotes a credential.

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

// The credential types as the KMS SDK (which this crate always builds) re-exports them.
use aws_sdk_kms::config::{Credentials, ProvideCredentials, SharedCredentialsProvider};
use aws_sdk_kms::error::DisplayErrorContext;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Credentials this close to expiry are fetched again.
const CREDENTIALS_MARGIN: Duration = Duration::from_secs(300);

/// A pooled HTTP/1 client for HTTPS and plain HTTP.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A client with a connect timeout; HTTPS trusts the platform's roots, as the SDK does.
pub fn http_client(connect_timeout: Duration) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_nodelay(true);
    connector.enforce_http(false);
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = match hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_native_roots(provider.clone())
    {
        Ok(builder) => builder,
        // No root certificates on this host: plain HTTP (an emulator) still works, and an
        // HTTPS request fails with the TLS error naming why.
        Err(_) => hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("the aws-lc-rs provider supports TLS 1.2 and 1.3")
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        ),
    };
    let https = builder
        .https_or_http()
        .enable_http1()
        .wrap_connector(connector);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(https)
}

/// The endpoint configured for `service_id` (`"SQS"`, `"S3"`): set in code, else
/// `AWS_ENDPOINT_URL_<SERVICE>`, else `AWS_ENDPOINT_URL` (or the profile's `endpoint_url`).
/// `None` means AWS itself.
pub fn configured_endpoint(aws: &aws_config::SdkConfig, service_id: &str) -> Option<String> {
    // As the SDK's own clients do: an endpoint set in code wins over the environment.
    if aws.get_origin("endpoint_url").is_client_config() {
        return aws.endpoint_url().map(str::to_owned);
    }
    aws.service_config()
        .and_then(|config| {
            config.load_config(
                aws_types::service_config::ServiceConfigKey::builder()
                    .service_id(service_id)
                    .env("AWS_ENDPOINT_URL")
                    .profile("endpoint_url")
                    .build()
                    .expect("every field is set"),
            )
        })
        .or_else(|| aws.endpoint_url().map(str::to_owned))
}

/// Why a request could not be signed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SignError {
    #[error("no AWS region: set AWS_REGION")]
    NoRegion,
    #[error(
        "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (any values for an emulator)"
    )]
    NoCredentials,
    #[error("loading AWS credentials: {0}")]
    Credentials(String),
    #[error("signing: {0}")]
    Signing(String),
}

impl SignError {
    /// Whether trying again may help (the credential chain failed, e.g. an instance role's
    /// endpoint did not answer).
    pub fn is_transient(&self) -> bool {
        matches!(self, SignError::Credentials(_))
    }
}

/// Signs requests to one service with the region and credentials of an AWS configuration.
pub struct Signer {
    service: &'static str,
    region: Option<String>,
    credentials: Option<SharedCredentialsProvider>,
    cached: Mutex<Option<Credentials>>,
}

// Credentials stay out of Debug output.
impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer")
            .field("service", &self.service)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// A signer for `service` (the SigV4 name: `"sqs"`, `"s3"`).
    pub fn new(aws: &aws_config::SdkConfig, service: &'static str) -> Self {
        Self {
            service,
            region: aws.region().map(|r| r.to_string()),
            credentials: aws.credentials_provider(),
            cached: Mutex::new(None),
        }
    }

    pub fn region(&self) -> Option<&str> {
        self.region.as_deref()
    }

    /// Signs `request`, whose body is `body`, adding the SigV4 headers (and whatever
    /// `settings` ask for, e.g. `x-amz-content-sha256`). Every header already set is signed.
    pub async fn sign(
        &self,
        request: &mut hyper::Request<Full<Bytes>>,
        body: &[u8],
        settings: SigningSettings,
    ) -> Result<(), SignError> {
        let region = self.region.as_deref().ok_or(SignError::NoRegion)?;
        let identity: Identity = self.credentials().await?.into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(region)
            .name(self.service)
            .time(SystemTime::now())
            .settings(settings)
            .build()
            .map_err(|e| SignError::Signing(e.to_string()))?
            .into();
        let uri = request.uri().to_string();
        let headers: Vec<(&str, &str)> = request
            .headers()
            .iter()
            .filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?)))
            .collect();
        let signable = SignableRequest::new(
            request.method().as_str(),
            &uri,
            headers.into_iter(),
            SignableBody::Bytes(body),
        )
        .map_err(|e| SignError::Signing(e.to_string()))?;
        let (instructions, _signature) = sign(signable, &params)
            .map_err(|e| SignError::Signing(e.to_string()))?
            .into_parts();
        instructions.apply_to_request_http1x(request);
        Ok(())
    }

    /// The chain's credentials, fetched again only when they near their expiry.
    async fn credentials(&self) -> Result<Credentials, SignError> {
        let fresh = |c: &Credentials| {
            c.expiry()
                .is_none_or(|expiry| expiry > SystemTime::now() + CREDENTIALS_MARGIN)
        };
        if let Some(cached) = self.cached.lock().expect("not poisoned").as_ref() {
            if fresh(cached) {
                return Ok(cached.clone());
            }
        }
        let provider = self.credentials.as_ref().ok_or(SignError::NoCredentials)?;
        let credentials = provider
            .provide_credentials()
            .await
            .map_err(|e| SignError::Credentials(DisplayErrorContext(&e).to_string()))?;
        *self.cached.lock().expect("not poisoned") = Some(credentials.clone());
        Ok(credentials)
    }
}

/// Why an exchange gave no answer; each is worth trying again.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ExchangeError {
    #[error("cannot reach {endpoint}: {why}")]
    Unreachable { endpoint: String, why: String },
    #[error("reading the answer: {0}")]
    Reading(String),
    #[error("no answer within {}s", .0.as_secs())]
    Timeout(Duration),
}

/// Sends `request` and reads the whole answer (at most `max_bytes`) within `timeout`: its
/// status and body, whatever the status. `endpoint` names the server in errors.
pub async fn exchange(
    http: &HttpClient,
    request: hyper::Request<Full<Bytes>>,
    endpoint: &str,
    max_bytes: usize,
    timeout: Duration,
) -> Result<(u16, Bytes), ExchangeError> {
    let exchange = async {
        let response = http
            .request(request)
            .await
            .map_err(|e| ExchangeError::Unreachable {
                endpoint: endpoint.to_owned(),
                why: error_chain(&e),
            })?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), max_bytes)
            .collect()
            .await
            .map_err(|e| ExchangeError::Reading(error_chain(&*e)))?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ExchangeError::Timeout(timeout))?
}

/// Base64, standard alphabet, padded (`Content-MD5` and the like).
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// An error with its causes on one line (hyper's own message is only "client error (Connect)").
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        line.push_str(": ");
        line.push_str(&inner.to_string());
        cause = inner.source();
    }
    line
}

/// Percent-encodes all but RFC 3986's unreserved characters onto `out`.
pub fn percent_encode_into(out: &mut String, value: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &byte in value.as_bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push('%');
            out.push(HEX[(byte >> 4) as usize] as char);
            out.push(HEX[(byte & 0xf) as usize] as char);
        }
    }
}

/// The XML of AWS answers (SQS Query, S3) as a small tree: names without namespace prefixes,
/// and each element's text with references resolved. Answers are at most a few MiB, so a tree
/// is the simplest thing to query; quick-xml's streaming reader builds it.
pub mod xml {
    use quick_xml::events::Event;
    use quick_xml::reader::Reader;

    #[derive(Debug, Default)]
    pub struct Element {
        pub name: String,
        /// The element's own text, untrimmed (a message body keeps its whitespace).
        pub text: String,
        pub children: Vec<Element>,
    }

    impl Element {
        pub fn child(&self, name: &str) -> Option<&Element> {
            self.children.iter().find(|c| c.name == name)
        }

        pub fn children<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> {
            self.children.iter().filter(move |c| c.name == name)
        }

        /// The trimmed text of child `name`, empty if there is none.
        pub fn child_text(&self, name: &str) -> &str {
            self.child(name).map_or("", |c| c.text.trim())
        }

        /// The first element called `name` at any depth, this one included.
        pub fn find(&self, name: &str) -> Option<&Element> {
            if self.name == name {
                return Some(self);
            }
            self.children.iter().find_map(|c| c.find(name))
        }
    }

    /// The root element of `document`. The reason for a failure names a position only, never
    /// the content there (which may be a message body).
    pub fn parse(document: &[u8]) -> Result<Element, String> {
        let text = std::str::from_utf8(document)
            .map_err(|e| format!("the answer is not UTF-8 (byte {})", e.valid_up_to()))?;
        let mut reader = Reader::from_str(text);
        let malformed = |reader: &Reader<&[u8]>| {
            format!(
                "the answer is not well-formed XML (byte {})",
                reader.error_position()
            )
        };
        let mut open: Vec<Element> = Vec::new();
        let mut root = None;
        loop {
            let event = reader.read_event().map_err(|_| malformed(&reader))?;
            let text = match event {
                Event::Start(start) => {
                    open.push(Element {
                        name: String::from_utf8_lossy(start.local_name().as_ref()).into_owned(),
                        ..Element::default()
                    });
                    continue;
                }
                Event::Empty(empty) => {
                    let element = Element {
                        name: String::from_utf8_lossy(empty.local_name().as_ref()).into_owned(),
                        ..Element::default()
                    };
                    close(&mut open, &mut root, element);
                    continue;
                }
                Event::End(_) => {
                    let element = open.pop().ok_or_else(|| malformed(&reader))?;
                    close(&mut open, &mut root, element);
                    continue;
                }
                Event::Text(text) => text
                    .xml10_content()
                    .map_err(|_| malformed(&reader))?
                    .into_owned(),
                Event::CData(data) => data
                    .xml10_content()
                    .map_err(|_| malformed(&reader))?
                    .into_owned(),
                Event::GeneralRef(reference) => {
                    if let Some(c) = reference
                        .resolve_char_ref()
                        .map_err(|_| malformed(&reader))?
                    {
                        c.to_string()
                    } else {
                        let name = reference.decode().map_err(|_| malformed(&reader))?;
                        quick_xml::escape::resolve_xml_entity(&name)
                            .ok_or_else(|| malformed(&reader))?
                            .to_owned()
                    }
                }
                Event::Eof => break,
                _ => continue,
            };
            // Text outside the root element is whitespace between declaration and root.
            if let Some(element) = open.last_mut() {
                element.text.push_str(&text);
            }
        }
        if !open.is_empty() {
            return Err("the answer ends before its XML does".into());
        }
        root.ok_or_else(|| "the answer holds no XML element".into())
    }

    fn close(open: &mut [Element], root: &mut Option<Element>, element: Element) {
        match open.last_mut() {
            Some(parent) => parent.children.push(element),
            None => {
                root.get_or_insert(element);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_text_resolves_references_and_keeps_whitespace() {
        let root = xml::parse(
            b"<?xml version='1.0'?>\n<a:R xmlns:a='x'><M><Body> {&quot;k&quot;: &#x3C;1&#62;}&#xD;\nx </Body>\
              <Id>\n  7 \n</Id><E/><C><![CDATA[<raw&>]]></C></M></a:R>",
        )
        .unwrap();
        assert_eq!(root.name, "R");
        let message = root.child("M").unwrap();
        assert_eq!(message.child("Body").unwrap().text, " {\"k\": <1>}\r\nx ");
        assert_eq!(message.child_text("Id"), "7");
        assert_eq!(message.child_text("E"), "");
        assert_eq!(message.child_text("C"), "<raw&>");
    }

    #[test]
    fn malformed_xml_is_reported_by_position_only() {
        for document in [
            &b"<R><Body>secret-body</Wrong></R>"[..],
            b"<R><Body>secret &bogus; body</Body></R>",
            b"<R><Body>secret-body",
            b"not xml: secret-body",
        ] {
            let why = xml::parse(document).unwrap_err();
            assert!(!why.contains("secret"), "{why}");
        }
    }

    #[test]
    fn base64_matches_the_standard_alphabet() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(&[0xfb, 0xff]), "+/8=");
    }

    #[test]
    fn percent_encoding_keeps_only_unreserved_characters() {
        let mut out = String::new();
        percent_encode_into(&mut out, "a-Z_0.~ /+=é");
        assert_eq!(out, "a-Z_0.~%20%2F%2B%3D%C3%A9");
    }
}
