//! CONNECT (explicit proxy clients): provider hosts are terminated with a
//! leaf from the CA and served like captured connections; other hosts are
//! spliced or refused per `gateway.splice_unknown`.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::Gateway;
use super::handler::{self, ConnCtx, GwBody, Mode};
use super::limit::Slot;
use super::upstream::connect_tcp;
use crate::provider;
use crate::record::{ClientInfo, codes};

impl Gateway {
    /// Answers a CONNECT request; the tunnel itself runs in its own task
    /// once hyper hands over the upgraded connection.
    pub(crate) fn connect(
        &self,
        req: Request<Incoming>,
        peer: Option<SocketAddr>,
        slot: Arc<Slot>,
    ) -> Response<GwBody> {
        let Some(authority) = req.uri().authority().cloned() else {
            let mut r = Response::new(handler::full(Bytes::new()));
            *r.status_mut() = StatusCode::BAD_REQUEST;
            return r;
        };
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = authority.port_u16().unwrap_or(443);
        let is_provider = self.inner.router.match_host(&host, Some(port)).is_some();
        if !is_provider && !self.inner.config.gateway.splice_unknown {
            let msg = format!(
                "{host} is not a configured provider host; known: {}",
                self.known_hosts().join(", ")
            );
            let body = provider::error_body(
                None,
                StatusCode::FORBIDDEN,
                codes::NOT_A_PROVIDER,
                &msg,
                &[],
            );
            let mut r = Response::new(handler::full(body));
            *r.status_mut() = StatusCode::FORBIDDEN;
            return r;
        }
        let gw = self.clone();
        tokio::spawn(async move {
            let upgraded = match hyper::upgrade::on(req).await {
                Ok(u) => TokioIo::new(u),
                Err(e) => {
                    tracing::debug!(error = %e, "CONNECT upgrade failed");
                    return;
                }
            };
            if !is_provider {
                gw.splice(upgraded, &host, port).await;
                return;
            }
            let ctx = ConnCtx {
                mode: Mode::Connect { host, port },
                peer,
                client: ClientInfo::default(),
            };
            gw.terminate(upgraded, ctx, slot).await;
        });
        Response::new(handler::full(Bytes::new()))
    }

    /// Copies bytes both ways between a client and `host:port`.
    pub(crate) async fn splice<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut client: S,
        host: &str,
        port: u16,
    ) {
        match tokio::time::timeout(
            self.inner.config.gateway.connect_timeout,
            connect_tcp(host, port, self.inner.so_mark),
        )
        .await
        {
            Ok(Ok(mut up)) => {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
            }
            Ok(Err(e)) => tracing::info!(error = %e, "splice connect failed"),
            Err(_) => tracing::info!(host, "splice connect timed out"),
        }
    }

    /// Provider host names, for messages.
    fn known_hosts(&self) -> Vec<String> {
        let mut hosts: Vec<String> = provider::official_hosts().map(String::from).collect();
        for r in self.inner.router.routes() {
            if !hosts.contains(&r.endpoint.host) {
                hosts.push(r.endpoint.host.clone());
            }
        }
        hosts
    }
}
