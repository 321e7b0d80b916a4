//! Client-side TLS: looking at a ClientHello without consuming it, the
//! per-name certificate cache, and the one accept path used by captured
//! connections and CONNECT tunnels alike. Every phase is bounded in time by
//! [`with_timeout`].

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::ca::{Ca, CaError};

/// Longest wait for a client's TLS ClientHello or handshake.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest number of per-name server configs kept.
const MAX_CACHED_NAMES: usize = 4096;

/// Why a client-side TLS step failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    /// The phase did not finish in time.
    #[error("{phase}: timed out after {after:?}")]
    Timeout {
        /// What was being waited for.
        phase: &'static str,
        /// The bound.
        after: Duration,
    },
    /// The phase failed.
    #[error("{phase}")]
    Io {
        /// What was being done.
        phase: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// No certificate could be made for the name.
    #[error("certificate for {name}")]
    Cert {
        /// The name asked for.
        name: String,
        /// The cause.
        #[source]
        source: CaError,
    },
}

/// Runs `fut` for at most `after`, naming `phase` in the error.
pub(crate) async fn with_timeout<T>(
    phase: &'static str,
    after: Duration,
    fut: impl Future<Output = std::io::Result<T>>,
) -> Result<T, TlsError> {
    match tokio::time::timeout(after, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(TlsError::Io { phase, source }),
        Err(_) => Err(TlsError::Timeout { phase, after }),
    }
}

/// What the first bytes of a connection are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Peeked {
    /// Not a TLS handshake record: plain HTTP (or garbage).
    Plain,
    /// A TLS ClientHello, with its server name when it has one.
    Tls {
        /// The SNI, when sent and parseable.
        sni: Option<String>,
    },
}

/// Looks at the ClientHello without consuming it, so the connection can
/// still be handed to the TLS acceptor (or elsewhere) untouched.
pub(crate) async fn peek_client_hello(stream: &TcpStream) -> std::io::Result<Peeked> {
    let mut buf = vec![0u8; 16 * 1024];
    let mut last_len = 0;
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if buf[0] != 0x16 {
            return Ok(Peeked::Plain);
        }
        let mut acceptor = rustls::server::Acceptor::default();
        let mut rd = &buf[..n];
        while !rd.is_empty() {
            if acceptor.read_tls(&mut rd).is_err() {
                break;
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let sni = accepted.client_hello().server_name().map(str::to_string);
                return Ok(Peeked::Tls { sni });
            }
            // Not a valid hello: let the real handshake fail with an alert.
            Err(_) => return Ok(Peeked::Tls { sni: None }),
            Ok(None) if n == buf.len() => return Ok(Peeked::Tls { sni: None }),
            Ok(None) => {
                // Partial hello: peek does not consume, so wait a little for more.
                if n == last_len {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                last_len = n;
            }
        }
    }
}

/// Server configs per TLS name, each with a leaf minted by the local CA.
pub(crate) struct CertCache {
    ca: Arc<Ca>,
    by_name: Mutex<HashMap<String, Arc<rustls::ServerConfig>>>,
}

impl CertCache {
    /// An empty cache over `ca`.
    pub(crate) fn new(ca: Arc<Ca>) -> CertCache {
        CertCache {
            ca,
            by_name: Mutex::new(HashMap::new()),
        }
    }

    /// The server config for `host` (case-insensitive), minted on first use.
    pub(crate) fn server_config(&self, host: &str) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let key = host.to_ascii_lowercase();
        if let Ok(m) = self.by_name.lock()
            && let Some(c) = m.get(&key)
        {
            return Ok(Arc::clone(c));
        }
        let cfg = Arc::new(
            self.ca
                .server_config(Some(key.clone()), &[b"h2", b"http/1.1"])
                .map_err(|source| TlsError::Cert {
                    name: key.clone(),
                    source,
                })?,
        );
        if let Ok(mut m) = self.by_name.lock() {
            if m.len() >= MAX_CACHED_NAMES {
                m.clear();
            }
            m.insert(key, Arc::clone(&cfg));
        }
        Ok(cfg)
    }

    /// Terminates TLS on `io` as `host`, bounded by [`HANDSHAKE_TIMEOUT`].
    pub(crate) async fn accept<IO>(&self, io: IO, host: &str) -> Result<TlsStream<IO>, TlsError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let cfg = self.server_config(host)?;
        with_timeout(
            "client tls handshake",
            HANDSHAKE_TIMEOUT,
            tokio_rustls::TlsAcceptor::from(cfg).accept(io),
        )
        .await
    }
}
