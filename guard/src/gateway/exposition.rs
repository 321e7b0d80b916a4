//! The metrics endpoint (`gateway.metrics`): `GET /metrics` in the
//! OpenMetrics text format when the scraper accepts it, else the
//! Prometheus text format; anything else is 404. Plain HTTP on its own
//! listener, never on the clients' one.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use super::Gateway;
use crate::metrics::{Metrics, Snapshot, TargetHealth};

/// The OpenMetrics content type, served when the scraper asks for it
/// (Prometheus does).
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The Prometheus text format, served otherwise.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

impl Gateway {
    /// Serves `metrics` on `listener` until shutdown.
    pub async fn serve_metrics(&self, listener: TcpListener, metrics: Arc<Metrics>) {
        loop {
            let (tcp, _) = tokio::select! {
                () = self.shutdown_requested() => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let metrics = Arc::clone(&metrics);
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let metrics = Arc::clone(&metrics);
                    async move {
                        let resp = if req.method() == Method::GET && req.uri().path() == "/metrics"
                        {
                            let openmetrics =
                                req.headers().get_all(http::header::ACCEPT).iter().any(|v| {
                                    v.to_str()
                                        .is_ok_and(|v| v.contains("application/openmetrics-text"))
                                });
                            let (ctype, text) = if openmetrics {
                                (OPENMETRICS, metrics.encode())
                            } else {
                                (PROMETHEUS_TEXT, metrics.encode_prometheus())
                            };
                            Response::builder()
                                .header(http::header::CONTENT_TYPE, ctype)
                                .body(Full::new(Bytes::from(text)))
                        } else {
                            Response::builder()
                                .status(StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::from_static(
                                    b"kt serves GET /metrics here\n",
                                )))
                        };
                        Ok::<_, Infallible>(resp.unwrap_or_default())
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .http1_only()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    }

    /// What the metrics read at scrape time: budgets, per-target health
    /// and last probe, the config generation.
    pub fn metrics_snapshot(&self) -> Snapshot {
        let inner = self.inner();
        let probes = self.last_probes();
        Snapshot {
            budget_refused: inner.limit.refused(),
            budget_evicted: inner.limit.evicted(),
            uid_budget_refused: inner.per_uid.refused(),
            targets: inner
                .router
                .routes()
                .iter()
                .filter(|r| inner.keys.contains_key(&r.target.id))
                .map(|r| TargetHealth {
                    target: r.target.id.clone(),
                    cooling: inner.health.cooling(&r.target.id),
                    probe: probes
                        .iter()
                        .find(|p| p.target == r.target.id)
                        .map(|p| p.result.label()),
                })
                .collect(),
            generation: inner.generation,
        }
    }
}
