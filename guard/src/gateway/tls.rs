//! Client-side TLS: looking at a ClientHello without consuming it, the
//! per-name certificate cache, and the one accept path used by captured
//! connections and CONNECT tunnels alike. Every phase is bounded in time by
//! [`with_timeout`].

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
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

/// Largest ClientHello kt reads before refusing the connection: a hello
/// is one handshake message of at most 64 KiB (rustls' own limit), spread
/// over records of 16 KiB each, with their 5-byte headers.
pub(crate) const MAX_HELLO_BYTES: usize = 0xffff + 4 + 5 * 5;

/// The TLS extension a ClientHello carries when it uses Encrypted Client
/// Hello (draft-ietf-tls-esni): the real server name is hidden.
const EXT_ECH: u16 = 0xfe0d;

/// What the first bytes of a connection are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Hello {
    /// Not a TLS handshake record: plain HTTP (or garbage for the HTTP parser).
    Plain,
    /// A complete, parseable TLS ClientHello.
    Tls {
        /// The SNI, when sent.
        sni: Option<String>,
        /// Whether it offers Encrypted Client Hello.
        ech: bool,
    },
}

/// Why a connection's first bytes cannot be decided on.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HelloError {
    /// The ClientHello is not valid TLS.
    #[error("unparseable client hello")]
    Unparseable,
    /// The ClientHello is larger than [`MAX_HELLO_BYTES`].
    #[error("client hello over {MAX_HELLO_BYTES} bytes")]
    Oversized,
    /// The client closed or failed before a whole hello arrived.
    #[error("connection closed before a whole client hello")]
    Closed(#[source] std::io::Error),
}

impl HelloError {
    /// The rule name recorded for the refusal.
    pub(crate) fn rule(&self) -> &'static str {
        match self {
            HelloError::Unparseable => "unparseable-hello",
            HelloError::Oversized => "oversized-hello",
            HelloError::Closed(_) => "incomplete-hello",
        }
    }
}

/// Reads a connection's ClientHello into `buf` (the bytes are consumed:
/// give `buf` back in front of the stream with [`Prefixed`]). Waits on the
/// socket between reads, never polls; the caller bounds the time.
pub(crate) async fn read_client_hello<IO>(
    io: &mut IO,
    buf: &mut Vec<u8>,
) -> Result<Hello, HelloError>
where
    IO: AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt as _;
    let mut chunk = [0u8; 4096];
    loop {
        let n = io.read(&mut chunk).await.map_err(HelloError::Closed)?;
        if n == 0 {
            return Err(HelloError::Closed(std::io::ErrorKind::UnexpectedEof.into()));
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf[0] != 0x16 {
            return Ok(Hello::Plain);
        }
        let mut acceptor = rustls::server::Acceptor::default();
        let mut rd = &buf[..];
        while !rd.is_empty() {
            if acceptor.read_tls(&mut rd).is_err() {
                return Err(HelloError::Unparseable);
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let sni = accepted.client_hello().server_name().map(str::to_string);
                let ech = hello_has_extension(buf, EXT_ECH).ok_or(HelloError::Unparseable)?;
                return Ok(Hello::Tls { sni, ech });
            }
            Err(_) => return Err(HelloError::Unparseable),
            Ok(None) if buf.len() >= MAX_HELLO_BYTES => return Err(HelloError::Oversized),
            Ok(None) => {}
        }
    }
}

/// Whether the ClientHello in `records` (TLS records as received) carries
/// extension `ext`. `None` when the bytes are not a ClientHello. rustls
/// parses the hello for kt but does not expose unknown extensions, so this
/// walks the few length-prefixed fields itself, bounds-checked.
pub(crate) fn hello_has_extension(records: &[u8], ext: u16) -> Option<bool> {
    // Defragment the handshake records, up to the end of the hello: what
    // the client sent after it (a ChangeCipherSpec, early data) may be in
    // the same read or not, and must not change the verdict.
    let mut hs = Vec::new();
    let mut rest = records;
    let whole = |hs: &[u8]| match hs {
        [_, a, b, c, body @ ..] => {
            body.len() >= usize::from(*a) << 16 | usize::from(*b) << 8 | usize::from(*c)
        }
        _ => false,
    };
    while rest.len() >= 5 && !whole(&hs) {
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        let body = rest.get(5..5 + len)?;
        if rest[0] != 0x16 {
            return None;
        }
        hs.extend_from_slice(body);
        rest = &rest[5 + len..];
    }
    let mut r = Reader(&hs);
    if r.u8()? != 1 {
        return None;
    }
    let len = r.u24()?;
    let mut r = Reader(r.take(len)?);
    r.take(2 + 32)?; // version, random
    let n = usize::from(r.u8()?);
    r.take(n)?; // session id
    let n = usize::from(r.u16()?);
    r.take(n)?; // cipher suites
    let n = usize::from(r.u8()?);
    r.take(n)?; // compression methods
    if r.0.is_empty() {
        return Some(false);
    }
    let n = usize::from(r.u16()?);
    let mut exts = Reader(r.take(n)?);
    while !exts.0.is_empty() {
        let ty = exts.u16()?;
        let n = usize::from(exts.u16()?);
        exts.take(n)?;
        if ty == ext {
            return Some(true);
        }
    }
    Some(false)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]))
    }
}

/// A stream with bytes already read from it put back in front.
pub(crate) struct Prefixed<IO> {
    prefix: Vec<u8>,
    pos: usize,
    inner: IO,
}

impl<IO> Prefixed<IO> {
    /// `prefix` is read first, then `inner`.
    pub(crate) fn new(prefix: Vec<u8>, inner: IO) -> Prefixed<IO> {
        Prefixed {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        out: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(out.remaining());
            let from = self.pos;
            out.put_slice(&self.prefix[from..from + n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    // Forwarded, so hyper keeps writing a response's head and body in one
    // vectored write instead of copying them into one buffer.
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
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
    /// A client that does not trust kt's CA ends it with an alert or by
    /// closing: see [`client_rejected_ca`].
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

/// Rule of the event recorded when a client aborted the handshake over
/// kt's certificate.
pub(crate) const CLIENT_REJECTED_CA: &str = "client-rejected-ca";

/// Whether a failed client handshake means the client does not trust
/// kt's certificate: it sent an `unknown_ca`, `bad_certificate`,
/// `certificate_unknown` (or another certificate) alert, or closed the
/// connection after kt's certificate went out (some clients close without
/// an alert). The hello was read before the handshake started, so an EOF
/// here comes after kt's answer.
pub(crate) fn client_rejected_ca(e: &TlsError) -> bool {
    use rustls::AlertDescription as A;
    let TlsError::Io { source, .. } = e else {
        return false;
    };
    if source.kind() == std::io::ErrorKind::UnexpectedEof {
        return true;
    }
    let alert = source
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    matches!(
        alert,
        Some(rustls::Error::AlertReceived(
            A::UnknownCA
                | A::BadCertificate
                | A::CertificateUnknown
                | A::UnsupportedCertificate
                | A::CertificateExpired
                | A::CertificateRevoked
        ))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello as a real client sends it (rustls as the client).
    fn client_hello(sni: &str) -> Vec<u8> {
        let roots = rustls::RootCertStore::empty();
        let cfg = rustls::ClientConfig::builder_with_provider(crate::ca::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from(sni.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    async fn read_all_at_once(bytes: &[u8]) -> Result<Hello, HelloError> {
        let mut io = bytes;
        read_client_hello(&mut io, &mut Vec::new()).await
    }

    #[tokio::test]
    async fn a_real_hello_gives_its_name_and_no_ech() {
        let h = client_hello("api.openai.com");
        assert_eq!(
            read_all_at_once(&h).await.unwrap(),
            Hello::Tls {
                sni: Some("api.openai.com".into()),
                ech: false
            }
        );
        assert_eq!(hello_has_extension(&h, 0), Some(true), "SNI is extension 0");
    }

    #[tokio::test]
    async fn a_hello_split_into_tiny_reads_is_still_read_whole() {
        let h = client_hello("api.anthropic.com");
        let (client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt as _;
            let mut client = client;
            for b in h.chunks(7) {
                client.write_all(b).await.unwrap();
                tokio::task::yield_now().await;
            }
            client
        });
        let mut buf = Vec::new();
        let got = read_client_hello(&mut server, &mut buf).await.unwrap();
        assert_eq!(
            got,
            Hello::Tls {
                sni: Some("api.anthropic.com".into()),
                ech: false
            }
        );
        drop(writer.await.unwrap());
    }

    #[test]
    fn a_client_rejecting_the_certificate_is_told_apart_from_other_failures() {
        use rustls::AlertDescription as A;
        let io = |e: std::io::Error| TlsError::Io {
            phase: "client tls handshake",
            source: e,
        };
        let alert = |a: A| {
            io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                rustls::Error::AlertReceived(a),
            ))
        };
        for a in [A::UnknownCA, A::BadCertificate, A::CertificateUnknown] {
            assert!(client_rejected_ca(&alert(a)), "{a:?}");
        }
        assert!(client_rejected_ca(&io(
            std::io::ErrorKind::UnexpectedEof.into()
        )));
        assert!(!client_rejected_ca(&alert(A::ProtocolVersion)));
        assert!(!client_rejected_ca(&alert(A::HandshakeFailure)));
        assert!(!client_rejected_ca(&io(
            std::io::ErrorKind::ConnectionReset.into()
        )));
        assert!(!client_rejected_ca(&TlsError::Timeout {
            phase: "client tls handshake",
            after: Duration::from_secs(1),
        }));
    }

    #[tokio::test]
    async fn garbage_after_a_handshake_byte_is_unparseable_not_passed() {
        let mut bad = vec![0x16, 3, 1, 0, 8];
        bad.extend_from_slice(&[0xff; 8]);
        assert!(matches!(
            read_all_at_once(&bad).await,
            Err(HelloError::Unparseable)
        ));
        assert_eq!(
            read_all_at_once(b"GET / HTTP/1.1\r\n").await.unwrap(),
            Hello::Plain
        );
    }

    #[tokio::test]
    async fn a_hello_that_never_ends_is_oversized() {
        // A handshake message announcing 16 MiB, fed record after record.
        let mut big = Vec::new();
        let mut first = true;
        while big.len() < MAX_HELLO_BYTES + 20_000 {
            let mut payload = vec![0u8; 16_000];
            if first {
                payload[..4].copy_from_slice(&[1, 0xff, 0xff, 0xff]);
                first = false;
            }
            big.extend_from_slice(&[0x16, 3, 1]);
            big.extend_from_slice(&u16::try_from(payload.len()).unwrap().to_be_bytes());
            big.extend_from_slice(&payload);
        }
        let got = read_all_at_once(&big).await;
        assert!(
            matches!(got, Err(HelloError::Oversized | HelloError::Unparseable)),
            "{got:?}"
        );
    }

    #[test]
    fn an_ech_extension_is_seen() {
        let h = client_hello("api.openai.com");
        // Append an ECH extension (type 0xfe0d, 2 bytes of data) and fix
        // the three enclosing lengths: record, handshake, extensions.
        let mut v = h.clone();
        v.extend_from_slice(&[0xfe, 0x0d, 0, 2, 0, 0]);
        let add = 6u32;
        let rec = u16::from_be_bytes([v[3], v[4]]) + 6;
        v[3..5].copy_from_slice(&rec.to_be_bytes());
        let hs = (u32::from(v[6]) << 16 | u32::from(v[7]) << 8 | u32::from(v[8])) + add;
        v[6] = (hs >> 16) as u8;
        v[7] = (hs >> 8) as u8;
        v[8] = hs as u8;
        // Find the extensions length: walk the fixed fields.
        let mut at = 5 + 4 + 2 + 32;
        at += 1 + usize::from(v[at]);
        at += 2 + usize::from(u16::from_be_bytes([v[at], v[at + 1]]));
        at += 1 + usize::from(v[at]);
        let ext = u16::from_be_bytes([v[at], v[at + 1]]) + 6;
        v[at..at + 2].copy_from_slice(&ext.to_be_bytes());
        assert_eq!(hello_has_extension(&v, EXT_ECH), Some(true));
        assert_eq!(hello_has_extension(&h, EXT_ECH), Some(false));
        assert_eq!(hello_has_extension(&v[..20], EXT_ECH), None);
    }

    #[tokio::test]
    async fn what_follows_the_hello_in_the_same_read_does_not_change_the_verdict() {
        // A ChangeCipherSpec record and the start of early data right behind
        // the hello (TLS 1.3 clients may send them without waiting), once in
        // the same read and once not. Found by the client_hello fuzz target.
        let h = client_hello("api.openai.com");
        let mut v = h.clone();
        v.extend_from_slice(&[0x14, 3, 3, 0, 1, 1, 0x17, 3, 3, 0, 40, 1, 2]);
        let expected = Hello::Tls {
            sni: Some("api.openai.com".into()),
            ech: false,
        };
        assert_eq!(read_all_at_once(&h).await.unwrap(), expected);
        assert_eq!(read_all_at_once(&v).await.unwrap(), expected);
        assert_eq!(hello_has_extension(&v, EXT_ECH), Some(false));
    }

    #[tokio::test]
    async fn prefixed_gives_back_what_was_read_first() {
        use tokio::io::AsyncReadExt as _;
        let rest: &[u8] = b" world";
        let mut p = Prefixed::new(b"hello".to_vec(), rest);
        let mut out = String::new();
        p.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }
}
