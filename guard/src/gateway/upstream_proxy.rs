//! kt's own upstream connections through an HTTP proxy: on networks where
//! the proxy is the only way out, `gateway.upstream_proxy` (or `HTTPS_PROXY`
//! of kt's environment, minus `NO_PROXY`) carries them, by CONNECT. The
//! socket to the proxy is exempted from capture like any upstream socket.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::upstream::{ConnectError, connect_tcp};
use crate::capture::SocketExemption;
use crate::config::{Config, ProxyAddr, upstream_proxy_for};

/// Longest CONNECT answer head read from the proxy.
const MAX_HEAD: usize = 16 * 1024;

/// Which proxy (if any) carries kt's connection to a host.
pub type ProxyFor = Arc<dyn Fn(&str) -> Option<ProxyAddr> + Send + Sync>;

/// The upstream proxy choice for `config`, with kt's environment read now.
pub fn proxy_for(config: &Config) -> ProxyFor {
    let configured = config.gateway.upstream_proxy.clone();
    let vars: Vec<(String, String)> = ["HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"]
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
        .collect();
    Arc::new(move |host: &str| {
        let env = |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        upstream_proxy_for(configured.as_ref(), host, &env)
    })
}

/// A TCP stream to `host:port` tunnelled through `proxy` by CONNECT.
pub async fn connect_via_proxy(
    proxy: &ProxyAddr,
    host: &str,
    port: u16,
    exemption: &dyn SocketExemption,
) -> Result<TcpStream, ConnectError> {
    let err = |source| ConnectError::Tcp {
        host: format!("{host} via proxy {proxy}"),
        source,
    };
    let mut tcp = connect_tcp(&proxy.host, proxy.port, exemption).await?;
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.map_err(err)?;
    // Byte by byte up to the end of the head: what follows is the tunnel.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_HEAD {
            return Err(err(io::Error::other(
                "the proxy's CONNECT answer is too long",
            )));
        }
        let b = tcp.read_u8().await.map_err(err)?;
        head.push(b);
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let status = line.split_whitespace().nth(1).unwrap_or("");
    if !status.starts_with('2') {
        return Err(err(io::Error::other(format!(
            "the proxy answered `{}` to CONNECT",
            line.trim()
        ))));
    }
    Ok(tcp)
}
