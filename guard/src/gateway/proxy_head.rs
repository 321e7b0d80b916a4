//! The checks on what a client sends to the proxy listener and to the
//! explicit listener (base URL and CONNECT) before hyper serves it: the
//! first request head, read by kt with a size cap and a deadline, and every
//! CONNECT authority. What is not an HTTP/1.1 request (TLS sent straight to
//! the port, binary bytes, a head that is too large or never ends, an
//! authority that is not `host:port`) gets a status, a short text saying
//! what to do, and an event, instead of hyper's bare `400` or a silent
//! close; nothing odd is replayed to the real proxy or opens a tunnel,
//! where another parser could read it otherwise than kt did.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// Longest wait for a whole request head on the proxy listener (as for a
/// TLS hello on the capture listener): clients send a CONNECT head in one
/// write, so only a stalled or hostile one waits this long. Answered `408`.
pub(crate) const HEAD_TIMEOUT: Duration = super::tls::HANDSHAKE_TIMEOUT;

/// Longest wait for a later head on a kept-alive connection (after a
/// `407`, or between plain-HTTP requests), as on the explicit listener:
/// then the connection is closed, as any idle keep-alive one.
pub(crate) const KEEPALIVE_HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Header fields in one request head at most (hyper's own default).
const MAX_HEADERS: usize = 100;

/// After a refusal, how long and how much of what the client still sends
/// is read before the close.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 128 * 1024;

/// Longest authority text put in an event or a message.
const MAX_SHOWN: usize = 200;

/// Which listener reads the head: the rule names and texts differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Listener {
    /// Captured connections to a declared proxy (rules `proxy-*`).
    Proxy,
    /// `gateway.listen`: base-URL requests and CONNECT (`HTTPS_PROXY`
    /// pointing at kt). Rules `explicit-*`, and `connect-*` for CONNECT
    /// requests. HTTP/2 with prior knowledge is served here (a base-URL
    /// client may speak it); its CONNECT streams get the same checks.
    Explicit,
}

impl Listener {
    fn rule(self, proxy: &'static str, explicit: &'static str) -> &'static str {
        match self {
            Listener::Proxy => proxy,
            Listener::Explicit => explicit,
        }
    }

    /// The rule for a CONNECT target that is not `host:port`.
    pub(crate) fn bad_authority(self) -> &'static str {
        self.rule("proxy-bad-authority", "connect-bad-authority")
    }

    /// The rule for `connect` spelled in another case.
    pub(crate) fn bad_method(self) -> &'static str {
        self.rule("proxy-bad-method", "connect-bad-method")
    }

    /// What a client of this listener sends, for texts.
    fn expected(self) -> &'static str {
        match self {
            Listener::Proxy => {
                "a proxy client sends `CONNECT host:port HTTP/1.1` (or an absolute http:// URL)"
            }
            Listener::Explicit => {
                "kt's port takes HTTP/1.1 requests to a base URL (POST /openai/v1/...) or `CONNECT host:port HTTP/1.1`"
            }
        }
    }
}

/// The HTTP/2 connection preface (prior knowledge).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A request kt refuses on the proxy or the explicit listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BadHead {
    /// Status answered.
    pub(crate) status: StatusCode,
    /// The event's rule (`proxy-not-http`, `proxy-bad-authority`, …).
    pub(crate) rule: &'static str,
    /// The text body: what is wrong and what to do.
    pub(crate) message: String,
    /// What the event names as the target (`host:port`, or `-`); never
    /// user information.
    pub(crate) target: String,
}

impl BadHead {
    /// A refusal with its text.
    pub(crate) fn new(
        status: StatusCode,
        rule: &'static str,
        message: String,
        target: String,
    ) -> BadHead {
        BadHead {
            status,
            rule,
            message,
            target,
        }
    }

    /// The client sent no whole head within [`HEAD_TIMEOUT`].
    pub(crate) fn timeout(listener: Listener) -> BadHead {
        BadHead::new(
            StatusCode::REQUEST_TIMEOUT,
            listener.rule("proxy-head-timeout", "explicit-head-timeout"),
            format!(
                "kt: no complete request head within {} s; a client sends its request line and headers at once",
                HEAD_TIMEOUT.as_secs()
            ),
            "-".into(),
        )
    }

    /// `connect` spelled in another case: a lenient parser behind kt (a
    /// proxy) could take it for a tunnel kt never decided on.
    pub(crate) fn bad_method(method: &http::Method, listener: Listener) -> BadHead {
        BadHead::new(
            StatusCode::METHOD_NOT_ALLOWED,
            listener.bad_method(),
            format!(
                "kt: method `{method}` refused: a tunnel is asked for with `CONNECT`, in capitals"
            ),
            "-".into(),
        )
    }

    /// A later head on a connection that hyper refused itself (it
    /// answered `status` with no text): for the event.
    pub(crate) fn later(status: StatusCode, rule: &'static str) -> BadHead {
        BadHead::new(
            status,
            rule,
            "kt: malformed request head after the first on this connection".into(),
            "-".into(),
        )
    }

    /// The text body of the refusal.
    pub(crate) fn body(&self) -> String {
        format!("{}\n", self.message)
    }

    /// The refusal as a response on a served connection (plain text).
    pub(crate) fn response(&self) -> http::Response<super::handler::GwBody> {
        let mut r = http::Response::new(super::handler::full(self.body()));
        *r.status_mut() = self.status;
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    }

    /// Writes the refusal (plain text), then closes.
    pub(crate) async fn answer<IO: AsyncRead + AsyncWrite + Unpin>(&self, io: &mut IO) {
        let body = self.body();
        let head = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            self.status.as_u16(),
            self.status.canonical_reason().unwrap_or(""),
            body.len()
        );
        let _ = io.write_all(head.as_bytes()).await;
        let _ = io.write_all(body.as_bytes()).await;
        let _ = io.shutdown().await;
        // Closing with unread bytes would reset the connection, and the
        // client could lose the answer: read what it still sends first
        // (bounded in bytes and time).
        let mut rest = [0u8; 4096];
        let mut left = LINGER_BYTES;
        let _ = tokio::time::timeout(LINGER, async {
            while left > 0 {
                match io.read(&mut rest).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        })
        .await;
    }
}

/// How reading the first head ended.
#[derive(Debug)]
pub(crate) enum HeadRead {
    /// A whole head kt accepts is in the buffer (maybe more bytes after it).
    Complete,
    /// The client closed (or failed) before a whole head.
    Closed,
    /// Refused.
    Bad(BadHead),
}

/// Reads into `buf` until it holds a whole request head (`max` bytes at
/// most), refusing as soon as the bytes cannot be one. The caller bounds
/// the time (see [`HEAD_TIMEOUT`]) and gives `buf` back in front of the
/// stream: bytes after the head (a ClientHello sent with the CONNECT) are
/// kept.
pub(crate) async fn read_head<IO: AsyncRead + Unpin>(
    io: &mut IO,
    buf: &mut Vec<u8>,
    max: usize,
    listener: Listener,
) -> HeadRead {
    let mut chunk = [0u8; 4096];
    let mut first = true;
    loop {
        let n = match io.read(&mut chunk).await {
            Ok(0) | Err(_) => return HeadRead::Closed,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        // Parsed again only when a line ended (or at the first bytes, or
        // past the cap): a client dripping a byte per read cannot make kt
        // parse the whole buffer each time.
        let parse = std::mem::take(&mut first) || chunk[..n].contains(&b'\n') || buf.len() > max;
        if parse && let Some(done) = check_head(buf, max, listener) {
            return done;
        }
    }
}

/// The verdict on the bytes so far; `None` while a head may still follow.
fn check_head(buf: &[u8], max: usize, listener: Listener) -> Option<HeadRead> {
    if buf.first() == Some(&0x16) {
        return Some(HeadRead::Bad(match listener {
            Listener::Proxy => BadHead::new(
                StatusCode::BAD_REQUEST,
                "proxy-tls-to-http-proxy",
                "kt: this is an HTTP proxy and it got TLS; use an http:// proxy URL (HTTPS_PROXY=http://host:port), not https://".into(),
                "-".into(),
            ),
            Listener::Explicit => BadHead::new(
                StatusCode::BAD_REQUEST,
                "explicit-tls-to-http",
                "kt: this port speaks plain HTTP and got TLS; use an http:// URL for it (OPENAI_BASE_URL=http://host:port/openai/v1, HTTPS_PROXY=http://host:port), not https://".into(),
                "-".into(),
            ),
        }));
    }
    if listener == Listener::Explicit {
        // HTTP/2 with prior knowledge: hyper serves it (each stream is a
        // request checked on its own, CONNECT authorities included).
        let n = buf.len().min(H2_PREFACE.len());
        if buf[..n] == H2_PREFACE[..n] {
            return (n == H2_PREFACE.len()).then_some(HeadRead::Complete);
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let too_large = || {
        HeadRead::Bad(BadHead::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            listener.rule("proxy-head-too-large", "explicit-head-too-large"),
            format!(
                "kt: request head over {max} bytes or {MAX_HEADERS} header fields; send the request line with the headers it needs only"
            ),
            "-".into(),
        ))
    };
    match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len > max => Some(too_large()),
        Ok(httparse::Status::Complete(_)) => Some(match check_request(&req, listener) {
            Ok(()) => HeadRead::Complete,
            Err(bad) => HeadRead::Bad(bad),
        }),
        Ok(httparse::Status::Partial) if buf.len() > max => Some(too_large()),
        Ok(httparse::Status::Partial) => None,
        Err(httparse::Error::TooManyHeaders) => Some(too_large()),
        Err(_) if listener == Listener::Proxy && is_http2(buf) => {
            Some(HeadRead::Bad(BadHead::new(
                StatusCode::BAD_REQUEST,
                "proxy-http2",
                "kt: HTTP/2 sent to an HTTP/1.1 proxy; a proxy client sends `CONNECT host:port HTTP/1.1`".into(),
                "-".into(),
            )))
        }
        Err(httparse::Error::HeaderName | httparse::Error::HeaderValue) => {
            Some(HeadRead::Bad(BadHead::new(
                StatusCode::BAD_REQUEST,
                listener.rule("proxy-bad-header", "explicit-bad-header"),
                "kt: a header line of the request head is malformed (`Name: value`, no control bytes, no folded lines)".into(),
                "-".into(),
            )))
        }
        Err(_) => Some(HeadRead::Bad(BadHead::new(
            StatusCode::BAD_REQUEST,
            listener.rule("proxy-not-http", "explicit-not-http"),
            format!("kt: not an HTTP/1.1 request; {}", listener.expected()),
            "-".into(),
        ))),
    }
}

/// The HTTP/2 connection preface, or any request line of version 2.
fn is_http2(buf: &[u8]) -> bool {
    let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
    line.starts_with(b"PRI * HTTP/2") || line.windows(7).any(|w| w == b"HTTP/2.")
}

/// A whole head's request line: a CONNECT authority kt accepts, or a
/// target hyper will parse (other checks follow per request).
fn check_request(req: &httparse::Request<'_, '_>, listener: Listener) -> Result<(), BadHead> {
    let method = req.method.unwrap_or_default();
    let target = req.path.unwrap_or_default();
    if method == "CONNECT" {
        check_connect_authority(target, listener)?;
    }
    if target.parse::<http::Uri>().is_err() {
        return Err(BadHead::new(
            StatusCode::BAD_REQUEST,
            listener.rule("proxy-bad-target", "explicit-bad-target"),
            format!(
                "kt: the request target is not a URL nor host:port; {}",
                listener.expected()
            ),
            "-".into(),
        ));
    }
    Ok(())
}

/// Checks a CONNECT request target: `host:port` or `[IPv6]:port`, port
/// 1-65535, a host that is a DNS name (one trailing dot allowed) or an IP
/// literal. Refused: no port, no host, user information (`user:pw@`: it
/// would be a credential in the request line), an IPv6 address without
/// brackets, and numeric names that are not dotted-decimal IPv4
/// (`2130706433`, `0x7f.1`): kt could not tell whether they name a
/// provider's address, while the proxy's resolver may read them as one.
pub(crate) fn check_connect_authority(target: &str, listener: Listener) -> Result<(), BadHead> {
    let bad = |message: String, shown: &str| {
        BadHead::new(
            StatusCode::BAD_REQUEST,
            listener.bad_authority(),
            message,
            shorten(shown),
        )
    };
    if let Some((_, host)) = target.rsplit_once('@') {
        // Never echo what is before the '@'.
        return Err(bad(
            format!(
                "kt: CONNECT target with user information refused: name only host:port ({}); proxy credentials go in Proxy-Authorization",
                shorten(host)
            ),
            host,
        ));
    }
    let (host, port, v6) = if let Some(rest) = target.strip_prefix('[') {
        let Some((h, after)) = rest.split_once(']') else {
            return Err(bad(
                "kt: CONNECT target with an unclosed '[' refused: write [IPv6]:port".into(),
                "-",
            ));
        };
        if h.parse::<Ipv6Addr>().is_err() {
            return Err(bad(
                format!("kt: CONNECT [{}] refused: not an IPv6 address", shorten(h)),
                target,
            ));
        }
        match after.strip_prefix(':') {
            Some(p) => (h, p, true),
            None => {
                return Err(bad(
                    format!(
                        "kt: CONNECT {} has no port: write [IPv6]:port ([::1]:443)",
                        shorten(target)
                    ),
                    target,
                ));
            }
        }
    } else {
        let Some((h, p)) = target.rsplit_once(':') else {
            return Err(bad(
                format!(
                    "kt: CONNECT {} has no port: write host:port (CONNECT api.openai.com:443)",
                    shorten(target)
                ),
                target,
            ));
        };
        if h.contains(':') {
            // Could be anything with colons: not echoed.
            return Err(bad(
                "kt: CONNECT target with more than one ':' refused: write an IPv6 address in brackets ([::1]:443)".into(),
                "-",
            ));
        }
        (h, p, false)
    };
    if host.is_empty() {
        return Err(bad(
            format!(
                "kt: CONNECT :{} names no host: write host:port",
                shorten(port)
            ),
            target,
        ));
    }
    let port_ok = !port.is_empty()
        && port.len() <= 5
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u32>().is_ok_and(|p| (1..=65535).contains(&p));
    if !port_ok {
        return Err(bad(
            format!(
                "kt: CONNECT {} refused: the port must be a number from 1 to 65535",
                shorten(target)
            ),
            target,
        ));
    }
    if v6 {
        return Ok(());
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.parse::<Ipv4Addr>().is_ok() {
        return Ok(());
    }
    let labels_ok = name.split('.').all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    if !labels_ok || name.len() > 253 {
        return Err(bad(
            format!(
                "kt: CONNECT {} refused: {} is not a host name nor an IP address",
                shorten(target),
                shorten(host)
            ),
            target,
        ));
    }
    let last = name.rsplit('.').next().unwrap_or_default();
    let numeric = last.bytes().all(|b| b.is_ascii_digit())
        || last.get(..2).is_some_and(|p| p.eq_ignore_ascii_case("0x"));
    if numeric {
        return Err(bad(
            format!(
                "kt: CONNECT {} refused: a numeric host must be a dotted-decimal IPv4 address (a.b.c.d)",
                shorten(target)
            ),
            target,
        ));
    }
    Ok(())
}

/// `s`, cut to [`MAX_SHOWN`] characters.
fn shorten(s: &str) -> String {
    match s.char_indices().nth(MAX_SHOWN) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(target: &str) -> Option<&'static str> {
        let proxy = check_connect_authority(target, Listener::Proxy)
            .err()
            .map(|b| b.rule);
        let explicit = check_connect_authority(target, Listener::Explicit)
            .err()
            .map(|b| b.rule);
        // The same verdict on both listeners, under each one's rule name.
        assert_eq!(
            proxy.is_some(),
            explicit == Some("connect-bad-authority"),
            "{target}"
        );
        proxy
    }

    #[test]
    fn connect_authorities_must_be_host_and_port() {
        for ok in [
            "api.openai.com:443",
            "API.OPENAI.COM:443",
            "api.openai.com.:443",
            "127.0.0.1:443",
            "127.0.0.1.:443",
            "[::1]:443",
            "[2001:db8::1]:8443",
            "my_host-1.internal:3128",
            "localhost:1",
            "a.b:65535",
        ] {
            assert_eq!(rule(ok), None, "{ok}");
        }
        for bad in [
            "api.openai.com",
            ":443",
            "api.openai.com:",
            "api.openai.com:0",
            "api.openai.com:65536",
            "api.openai.com:70000",
            "api.openai.com:+443",
            "api.openai.com:4430000",
            "user:pw@api.openai.com:443",
            "@api.openai.com:443",
            "::1:443",
            "[::1]",
            "[::1:443",
            "[nope]:443",
            "api..openai.com:443",
            "api.openai.com..:443",
            ".api.openai.com:443",
            "api.openai.com%2e:443",
            "2130706433:443",
            "0x7f.1:443",
            "127.1:443",
        ] {
            assert_eq!(rule(bad), Some("proxy-bad-authority"), "{bad}");
        }
    }

    #[test]
    fn refusals_never_echo_user_information() {
        let b = check_connect_authority("alice:s3cret@api.openai.com:443", Listener::Explicit)
            .unwrap_err();
        assert!(!b.message.contains("s3cret"), "{b:?}");
        assert!(!b.target.contains("s3cret"), "{b:?}");
        assert_eq!(b.target, "api.openai.com:443");
        let b = check_connect_authority("alice:s3cret:443", Listener::Proxy).unwrap_err();
        assert!(!b.message.contains("s3cret") && !b.target.contains("s3cret"));
    }

    #[test]
    fn the_explicit_listener_names_its_own_rules_and_serves_http2_prior_knowledge() {
        let verdict = |b: &[u8]| match check_head(b, 1024, Listener::Explicit) {
            Some(HeadRead::Bad(b)) => Some(b.rule),
            Some(HeadRead::Complete) => Some("complete"),
            Some(HeadRead::Closed) => Some("closed"),
            None => None,
        };
        assert_eq!(
            verdict(b"\x16\x03\x01\x02\x00"),
            Some("explicit-tls-to-http")
        );
        assert_eq!(verdict(b"\x00\x01\x02\xff"), Some("explicit-not-http"));
        assert_eq!(verdict(b"PRI * HTTP/2.0\r\n"), None);
        assert_eq!(verdict(H2_PREFACE), Some("complete"));
        // Only the exact preface: another HTTP/2 request line is not HTTP/1.1.
        assert_eq!(
            verdict(b"GET / HTTP/2.0\r\n\r\n"),
            Some("explicit-not-http")
        );
        assert_eq!(
            verdict(b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n{"),
            Some("complete")
        );
        assert_eq!(
            verdict(b"CONNECT api.openai.com HTTP/1.1\r\n\r\n"),
            Some("connect-bad-authority")
        );
        assert_eq!(verdict(&[b'a'; 1025]), Some("explicit-head-too-large"));
    }

    #[test]
    fn heads_that_are_not_http_are_refused_as_soon_as_seen() {
        let verdict = |b: &[u8]| match check_head(b, 1024, Listener::Proxy) {
            Some(HeadRead::Bad(b)) => Some(b.rule),
            Some(HeadRead::Complete) => Some("complete"),
            Some(HeadRead::Closed) => Some("closed"),
            None => None,
        };
        assert_eq!(
            verdict(b"\x16\x03\x01\x02\x00"),
            Some("proxy-tls-to-http-proxy")
        );
        assert_eq!(
            verdict(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Some("proxy-http2")
        );
        assert_eq!(verdict(b"\x00\x01\x02\xff"), Some("proxy-not-http"));
        assert_eq!(verdict(b"CONNECT api.openai.com:443 HT"), None);
        assert_eq!(
            verdict(b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n"),
            Some("proxy-bad-header")
        );
        assert_eq!(
            verdict(b"CONNECT api.openai.com:443 HTTP/1.1\r\nBad Name: a\r\n\r\n"),
            Some("proxy-bad-header")
        );
        assert_eq!(
            verdict(b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some("complete")
        );
        assert_eq!(
            verdict(b"CONNECT api.openai.com HTTP/1.1\r\n\r\n"),
            Some("proxy-bad-authority")
        );
        assert_eq!(verdict(&[b'a'; 1025]), Some("proxy-head-too-large"));
        let mut many = b"CONNECT a.b:443 HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("x{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(
            match check_head(&many, 64 * 1024, Listener::Proxy) {
                Some(HeadRead::Bad(b)) => Some(b.rule),
                _ => None,
            },
            Some("proxy-head-too-large")
        );
    }
}
