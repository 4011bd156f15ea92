//! An HTTP proxy on loopback that forwards every request to the AWS emulator and records it:
//! point a binary's `AWS_ENDPOINT_URL` at it to see each KMS, SQS and S3 call the binary makes,
//! as it went over the wire; and [`classify`], which says what IAM actions on which resources
//! AWS would authorize for each (KMS from `X-Amz-Target` and the JSON body, SQS from
//! `X-Amz-Target` or the Query protocol's `Action`, S3 from the method and path).

use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// One request, as the proxy saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// The path and query, e.g. `/bucket/key?versionId=1`.
    pub target: String,
    /// Header names in lowercase.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

pub struct RecordingProxy {
    pub port: u16,
    calls: Arc<Mutex<Vec<Recorded>>>,
    accept: tokio::task::JoinHandle<()>,
}

/// Headers that describe one hop, not the message: the proxy sends each body whole.
const HOP_BY_HOP: [&str; 4] = [
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
];

impl RecordingProxy {
    /// Listens on 127.0.0.1 (a free port) and forwards to 127.0.0.1:`target_port`.
    pub async fn start(target_port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let calls: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let client = pii_vault::aws_http::http_client(std::time::Duration::from_secs(5));
        let recorded = calls.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (client, recorded) = (client.clone(), recorded.clone());
                let service = hyper::service::service_fn(move |request| {
                    forward(request, client.clone(), recorded.clone(), target_port)
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            port,
            calls,
            accept,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The requests recorded since the last call, in the order they arrived.
    pub fn take(&self) -> Vec<Recorded> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
}

impl Drop for RecordingProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn forward(
    request: Request<Incoming>,
    client: pii_vault::aws_http::HttpClient,
    recorded: Arc<Mutex<Vec<Recorded>>>,
    target_port: u16,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let (parts, body) = request.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return Ok(status(StatusCode::BAD_REQUEST)),
    };
    let target = parts
        .uri
        .path_and_query()
        .map_or("/".to_owned(), |p| p.as_str().to_owned());
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(n, v)| {
            let value = String::from_utf8_lossy(v.as_bytes()).into_owned();
            (n.as_str().to_ascii_lowercase(), value)
        })
        .collect();
    recorded.lock().unwrap().push(Recorded {
        method: parts.method.to_string(),
        target: target.clone(),
        headers: headers.clone(),
        body: body.clone(),
    });
    // The Host header goes on unchanged, so the emulator answers (queue URLs included) as if
    // it had been asked directly at this address.
    let mut outbound = Request::builder()
        .method(parts.method)
        .uri(format!("http://127.0.0.1:{target_port}{target}"));
    for (name, value) in &parts.headers {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            outbound = outbound.header(name, value);
        }
    }
    let Ok(outbound) = outbound.body(Full::new(body)) else {
        return Ok(status(StatusCode::BAD_REQUEST));
    };
    let Ok(answer) = client.request(outbound).await else {
        return Ok(status(StatusCode::BAD_GATEWAY));
    };
    let (parts, body) = answer.into_parts();
    let Ok(body) = body.collect().await.map(|c| c.to_bytes()) else {
        return Ok(status(StatusCode::BAD_GATEWAY));
    };
    let mut response = Response::builder().status(parts.status);
    for (name, value) in &parts.headers {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            response = response.header(name, value);
        }
    }
    Ok(response
        .body(Full::new(body))
        .unwrap_or_else(|_| status(StatusCode::BAD_GATEWAY)))
}

fn status(code: StatusCode) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = code;
    response
}

/// What one call needs authorized: an IAM action on a resource, with its request context.
#[derive(Debug, Clone, PartialEq)]
pub struct Needed {
    pub action: String,
    pub resource: Resource,
    pub context: Vec<(String, String)>,
    pub algorithm: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Resource {
    /// A KMS key as the request names it (ARN, key id or alias).
    KmsKey(String),
    /// A KMS key action whose request names no key.
    NoKey,
    Arn(String),
    /// An account-wide action (ListAliases, CreateKey).
    Account,
}

/// One recorded call: the operation as it went over the wire, and what AWS would authorize.
#[derive(Debug)]
pub struct Call {
    pub operation: String,
    pub needs: Vec<Needed>,
}

fn needed(action: String, resource: Resource) -> Needed {
    Needed {
        action,
        resource,
        context: Vec::new(),
        algorithm: None,
    }
}

/// What AWS would authorize for a recorded request.
pub fn classify(request: &Recorded) -> Call {
    // The service is in the signature's credential scope: KEY/DATE/REGION/SERVICE/aws4_request.
    let authorization = request.header("authorization").unwrap_or_default();
    let scope = authorization
        .split("Credential=")
        .nth(1)
        .and_then(|c| c.split(',').next())
        .unwrap_or_default();
    match scope.split('/').nth(3) {
        Some("kms") => kms_call(request),
        Some("sqs") => sqs_call(request),
        Some("s3") => s3_call(request),
        other => panic!(
            "a call to {other:?} ({} {}): not modelled",
            request.method, request.target
        ),
    }
}

fn kms_call(request: &Recorded) -> Call {
    let target = request.header("x-amz-target").unwrap_or_default();
    let operation = target.strip_prefix("TrentService.").unwrap_or(target);
    let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
    let key = |field: &str| match body[field].as_str() {
        Some(named) => Resource::KmsKey(named.to_owned()),
        None => Resource::NoKey,
    };
    let context = |field: &str| -> Vec<(String, String)> {
        body[field].as_object().map_or(Vec::new(), |map| {
            let pair = |(k, v): (&String, &Value)| (k.clone(), v.as_str().unwrap_or("").into());
            map.iter().map(pair).collect()
        })
    };
    let needs = match operation {
        // ReEncrypt is authorized as two actions, one on each key.
        "ReEncrypt" => vec![
            Needed {
                context: context("SourceEncryptionContext"),
                ..needed("kms:ReEncryptFrom".into(), key("SourceKeyId"))
            },
            Needed {
                context: context("DestinationEncryptionContext"),
                ..needed("kms:ReEncryptTo".into(), key("DestinationKeyId"))
            },
        ],
        "ListAliases" | "ListKeys" | "CreateKey" => {
            vec![needed(format!("kms:{operation}"), Resource::Account)]
        }
        _ => vec![Needed {
            context: context("EncryptionContext"),
            algorithm: body["SigningAlgorithm"].as_str().map(str::to_owned),
            ..needed(format!("kms:{operation}"), key("KeyId"))
        }],
    };
    Call {
        operation: format!("KMS {operation}"),
        needs,
    }
}

fn sqs_call(request: &Recorded) -> Call {
    let (operation, queue, protocol) = match request.header("x-amz-target") {
        Some(target) => {
            let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
            let queue = body["QueueUrl"].as_str().or(body["QueueName"].as_str());
            let operation = target.strip_prefix("AmazonSQS.").unwrap_or(target);
            (operation.to_owned(), queue.map(str::to_owned), "JSON")
        }
        None => {
            let form = form_fields(&request.body);
            let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v);
            let operation = field("Action").cloned().unwrap_or_default();
            let queue = field("QueueUrl").or(field("QueueName")).cloned();
            (operation, queue, "Query")
        }
    };
    let queue = queue.unwrap_or_else(|| panic!("SQS {operation} names no queue"));
    let name = queue.rsplit('/').next().unwrap_or(&queue).to_owned();
    // A batch is authorized as the action it batches.
    let action = format!("sqs:{}", operation.trim_end_matches("Batch"));
    Call {
        operation: format!("SQS {operation} ({protocol})"),
        needs: vec![needed(action, Resource::Arn(name))],
    }
}

fn s3_call(request: &Recorded) -> Call {
    let (path, query) = request
        .target
        .split_once('?')
        .unwrap_or((&request.target, ""));
    let has = |word: &str| query.split('&').any(|p| p.split('=').next() == Some(word));
    let (bucket, object) = match path.trim_start_matches('/').split_once('/') {
        Some((bucket, object)) => (bucket, Some(object)),
        None => (path.trim_start_matches('/'), None),
    };
    let method = request.method.as_str();
    let actions: Vec<&str> = match (method, object) {
        ("PUT", None) if has("object-lock") => vec!["s3:PutBucketObjectLockConfiguration"],
        ("PUT", None) => vec!["s3:CreateBucket"],
        ("GET" | "HEAD", None) if has("object-lock") => vec!["s3:GetBucketObjectLockConfiguration"],
        ("GET", None) if has("versions") => vec!["s3:ListBucketVersions"],
        ("GET" | "HEAD", None) => vec!["s3:ListBucket"],
        ("GET" | "HEAD", Some(_)) if has("versionId") => vec!["s3:GetObjectVersion"],
        ("GET" | "HEAD", Some(_)) => vec!["s3:GetObject"],
        ("PUT", Some(_)) if has("retention") => vec!["s3:PutObjectRetention"],
        // Object Lock headers on an upload need PutObjectRetention as well.
        ("PUT", Some(_)) if request.header("x-amz-object-lock-mode").is_some() => {
            vec!["s3:PutObject", "s3:PutObjectRetention"]
        }
        ("PUT", Some(_)) => vec!["s3:PutObject"],
        ("DELETE", Some(_)) if has("versionId") => vec!["s3:DeleteObjectVersion"],
        ("DELETE", Some(_)) => vec!["s3:DeleteObject"],
        _ => panic!("S3 {method} {}: not modelled", request.target),
    };
    let resource = match object {
        Some(object) => format!("{bucket}/{object}"),
        None => bucket.to_owned(),
    };
    let shown = if query.is_empty() {
        String::new()
    } else {
        // The query's first parameter, without its value (a version id, a marker).
        let first = query.split('&').next().unwrap_or("");
        format!("?{}", first.split('=').next().unwrap_or(""))
    };
    let what = if object.is_some() { "/OBJECT" } else { "" };
    Call {
        operation: format!("S3 {method} /BUCKET{what}{shown}"),
        needs: actions
            .into_iter()
            .map(|a| needed(a.to_owned(), Resource::Arn(resource.clone())))
            .collect(),
    }
}

/// The fields of an `application/x-www-form-urlencoded` body.
fn form_fields(body: &[u8]) -> Vec<(String, String)> {
    let decode = |text: &str| {
        let bytes = text.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < bytes.len() => {
                    let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                    out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                    i += 2;
                }
                byte => out.push(byte),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    String::from_utf8_lossy(body)
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}
