//! Upstream connections: TCP sockets created by hand so capture can exempt
//! each one (its cookie goes into the hooks' map) before `connect`, then rustls
//! verifying against system roots, `SSL_CERT_FILE` and an extra bundle, with
//! ALPN offering HTTP/2. Pooled by hyper-util's client.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::capture::{CaptureError, SocketExemption};

/// Why an upstream connection could not be made; the gateway tells TCP and
/// TLS failures apart for its decision records.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URI has no host.
    #[error("upstream uri {0} has no host")]
    NoHost(String),
    /// Name resolution or TCP connect failed.
    #[error("connect to {host}: {source}")]
    Tcp {
        /// Host connected to.
        host: String,
        /// The I/O error.
        source: io::Error,
    },
    /// Connect took longer than `gateway.connect_timeout`.
    #[error("connect to {0}: timed out")]
    Timeout(String),
    /// The TLS handshake failed.
    #[error("tls handshake with {host}: {source}")]
    Tls {
        /// Host.
        host: String,
        /// The error from rustls.
        source: io::Error,
    },
    /// The socket could not be exempted from capture, so it is not
    /// connected (capture would send it back to kt).
    #[error("exempting the upstream socket from capture: {0}")]
    Exempt(#[source] CaptureError),
}

/// Builds the rustls client config for upstreams.
pub fn client_tls_config(
    system_roots: bool,
    extra: &[CertificateDer<'static>],
) -> Result<rustls::ClientConfig, rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    if system_roots {
        // The native loader also reads SSL_CERT_FILE / SSL_CERT_DIR when set.
        let native = rustls_native_certs::load_native_certs();
        for cert in native.certs {
            let _ = roots.add(cert);
        }
        if roots.is_empty() {
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
    }
    for cert in extra {
        roots.add(cert.clone())?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(crate::ca::crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// The connector handed to hyper-util's pooled client.
#[derive(Clone)]
pub struct UpstreamConnector {
    tls: TlsConnector,
    exemption: Arc<dyn SocketExemption>,
    connect_timeout: Duration,
    proxy: Option<super::upstream_proxy::ProxyFor>,
}

impl UpstreamConnector {
    /// A connector; every socket is exempted from capture before connect.
    pub fn new(
        tls: Arc<rustls::ClientConfig>,
        exemption: Arc<dyn SocketExemption>,
        connect_timeout: Duration,
    ) -> Self {
        UpstreamConnector {
            tls: TlsConnector::from(tls),
            exemption,
            connect_timeout,
            proxy: None,
        }
    }

    /// Connections go through the proxy `proxy` picks for their host (by
    /// CONNECT), direct where it picks none.
    pub fn with_proxy(mut self, proxy: super::upstream_proxy::ProxyFor) -> Self {
        self.proxy = Some(proxy);
        self
    }
}

/// Connects a TCP socket to `host:port`, exempting it from capture before
/// `connect`, trying each resolved address in turn.
pub async fn connect_tcp(
    host: &str,
    port: u16,
    exemption: &dyn SocketExemption,
) -> Result<TcpStream, ConnectError> {
    let tcp_err = |source| ConnectError::Tcp {
        host: host.to_string(),
        source,
    };
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(tcp_err)?
        .collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for addr in addrs {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM.cloexec(),
            None,
        )
        .map_err(tcp_err)?;
        exemption.exempt(&socket).map_err(ConnectError::Exempt)?;
        socket.set_nonblocking(true).map_err(tcp_err)?;
        let socket = TcpSocket::from_std_stream(socket.into());
        match socket.connect(addr).await {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Err(e) => last = e,
        }
    }
    Err(tcp_err(last))
}

impl tower_service::Service<Uri> for UpstreamConnector {
    type Response = UpstreamIo;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamIo, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| ConnectError::NoHost(uri.to_string()))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let https = uri.scheme_str() == Some("https");
            let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
            let via = this.proxy.as_ref().and_then(|p| p(&host));
            let tcp = match via {
                Some(proxy) => tokio::time::timeout(
                    this.connect_timeout,
                    super::upstream_proxy::connect_via_proxy(
                        &proxy,
                        &host,
                        port,
                        this.exemption.as_ref(),
                    ),
                )
                .await
                .map_err(|_| ConnectError::Timeout(host.clone()))??,
                None => tokio::time::timeout(
                    this.connect_timeout,
                    connect_tcp(&host, port, this.exemption.as_ref()),
                )
                .await
                .map_err(|_| ConnectError::Timeout(host.clone()))??,
            };
            if !https {
                return Ok(UpstreamIo(TokioIo::new(Stream::Plain(tcp))));
            }
            let name = ServerName::try_from(host.clone()).map_err(|e| ConnectError::Tls {
                host: host.clone(),
                source: io::Error::new(io::ErrorKind::InvalidInput, e),
            })?;
            let tls = tokio::time::timeout(this.connect_timeout, this.tls.connect(name, tcp))
                .await
                .map_err(|_| ConnectError::Timeout(host.clone()))?
                .map_err(|source| ConnectError::Tls {
                    host: host.clone(),
                    source,
                })?;
            Ok(UpstreamIo(TokioIo::new(Stream::Tls(Box::new(tls)))))
        })
    }
}

/// Plain or TLS upstream stream.
pub enum Stream {
    /// `http://` upstream.
    Plain(TcpStream),
    /// `https://` upstream.
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// The connection type given to hyper: reports HTTP/2 when ALPN chose it.
pub struct UpstreamIo(TokioIo<Stream>);

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        let c = Connected::new();
        match self.0.inner() {
            Stream::Tls(s) if s.get_ref().1.alpn_protocol() == Some(b"h2") => c.negotiated_h2(),
            _ => c,
        }
    }
}

impl hyper::rt::Read for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// Finds a [`ConnectError`] in an error's source chain.
pub fn find_connect_error<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a ConnectError> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(c) = err.downcast_ref::<ConnectError>() {
            return Some(c);
        }
        cur = err.source();
    }
    None
}
