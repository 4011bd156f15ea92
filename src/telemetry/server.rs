//! The operator's HTTP endpoint: `GET /metrics`, `/healthz` and `/readyz`, HTTP/1 only.
//!
//! It listens where `--metrics-addr` says; nothing personal is served, but the metrics do tell
//! an observer the traffic volume, so the address belongs on an internal network.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::LatencyHistogram;
use super::exposition::{Family, Kind};
use super::readiness::Readiness;

/// A client gets this long to send its request head, so idle connections cannot pile up.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// `pii_vault_ready` is the outcome of the last readiness check: `/readyz`'s when something
/// asks it often enough (an orchestrator's health check), else the endpoint checks itself this
/// often. A check costs a KMS DescribeKey, so they are not made per scrape.
pub const READINESS_INTERVAL: Duration = Duration::from_secs(30);

const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
const PLAIN_TEXT: &str = "text/plain; charset=utf-8";

/// What the endpoint serves.
pub struct Endpoints {
    pub metrics: PrometheusHandle,
    /// Rendered after `metrics` as [`READ_TO_COMMIT`](super::READ_TO_COMMIT).
    pub read_to_commit: Arc<LatencyHistogram>,
    pub readiness: Readiness,
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, endpoints: Arc<Endpoints>, shutdown: CancellationToken) {
    let connections = TaskTracker::new();
    connections.spawn(keep_readiness_fresh(endpoints.clone(), shutdown.clone()));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors, say: wait rather than spin.
                tracing::warn!(%error, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let endpoints = endpoints.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let endpoints = endpoints.clone();
                async move { Ok::<_, std::convert::Infallible>(respond(&endpoints, &request).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = shutdown.cancelled() => {
                    // Finish the response in flight, then close.
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    connections.close();
    connections.wait().await;
}

/// Checks readiness whenever the last check is [`READINESS_INTERVAL`] old (at once at start).
async fn keep_readiness_fresh(endpoints: Arc<Endpoints>, shutdown: CancellationToken) {
    loop {
        let since = match endpoints.readiness.last() {
            Some((_, ago)) => ago,
            None => READINESS_INTERVAL,
        };
        if since >= READINESS_INTERVAL {
            endpoints.readiness.check().await;
            continue;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(READINESS_INTERVAL - since) => {}
        }
    }
}

/// The `/metrics` exposition: what was recorded, then what is read now.
fn exposition(endpoints: &Endpoints) -> String {
    let mut out = endpoints.metrics.render();
    endpoints.read_to_commit.write_prometheus(
        &mut out,
        super::READ_TO_COMMIT,
        super::READ_TO_COMMIT_HELP,
    );
    let mut ready = Family::new(
        super::READY,
        Kind::Gauge,
        "1 if the last readiness check (/readyz) passed, else 0.",
    );
    if let Some((passed, _)) = endpoints.readiness.last() {
        ready = ready.sample(&[], if passed { 1.0 } else { 0.0 });
    }
    ready.write(&mut out);
    super::observed().write_prometheus(&mut out, super::process::unix_now());
    super::process::Figures::read().write_prometheus(&mut out);
    out
}

async fn respond(endpoints: &Endpoints, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    match request.uri().path() {
        "/metrics" => {
            let mut response = text(StatusCode::OK, exposition(endpoints));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(PROMETHEUS_TEXT));
            response
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => {
            let report = endpoints.readiness.check().await;
            let status = if report.is_ready() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, report.to_string())
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(PLAIN_TEXT));
    response
}
