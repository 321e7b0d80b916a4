//! Raw-socket clients for the listeners that read a request head
//! themselves (the explicit listener and the proxy listener): bytes sent
//! as a hostile or odd client sends them, answers read until kt closes,
//! and the guard events kt recorded. Blocking code: run it off the test's
//! runtime with [`blocking`].

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use guard::record::{MemorySink, PolicyId};
use rustls_pki_types::{CertificateDer, ServerName};

use crate::gateway_fixture::client_tls;
use crate::kt_run::JOB_KEY;

/// Hang guard for reads (never a speed assertion): kt must answer or
/// close; a test that waits this long failed.
pub const HANG_GUARD: Duration = Duration::from_secs(40);

/// The guard rules recorded, with the event's path.
pub fn refusals(sink: &MemorySink) -> Vec<(String, String)> {
    sink.snapshot()
        .into_iter()
        .flat_map(|r| {
            let path = r.path.clone();
            r.policy
                .into_iter()
                .filter(|n| n.policy == PolicyId::Guard)
                .map(move |n| (n.rule, path.clone()))
        })
        .collect()
}

/// Waits until `sink` holds a guard note with `rule` (events are recorded
/// from the connection's task, possibly after the client saw the answer);
/// the event's path.
pub async fn refusal(sink: &MemorySink, rule: &str) -> String {
    let found = tokio::time::timeout(HANG_GUARD, async {
        loop {
            if let Some((_, path)) = refusals(sink).into_iter().find(|(r, _)| r == rule) {
                return path;
            }
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("no {rule} event: {:?}", refusals(sink)))
}

/// Sends `bytes` in one write, then reads what kt answers until it closes.
pub fn exchange(at: SocketAddr, bytes: &[u8]) -> String {
    let mut tcp = TcpStream::connect(at).unwrap();
    tcp.set_read_timeout(Some(HANG_GUARD)).unwrap();
    // kt may refuse before it read everything: a failed write is fine.
    let _ = tcp.write_all(bytes);
    read_until_close(&mut tcp)
}

/// Reads until kt closes; panics when it leaves the connection open
/// without an answer for [`HANG_GUARD`] (the read timeout set by callers).
pub fn read_until_close(tcp: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 4096];
    loop {
        match tcp.read(&mut b) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&b[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                panic!("kt left the connection open without an answer: {out:?}")
            }
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads one HTTP/1.1 answer (head, then a `content-length` body).
pub fn read_answer(tcp: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tcp.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    let _ = tcp.read_exact(&mut body);
    head + &String::from_utf8_lossy(&body)
}

/// A real TLS ClientHello naming `sni`.
pub fn client_hello(ca: &CertificateDer<'static>, sni: &str) -> Vec<u8> {
    let mut tls = rustls::ClientConnection::new(
        client_tls(ca, false),
        ServerName::try_from(sni.to_string()).unwrap(),
    )
    .unwrap();
    let mut hello = Vec::new();
    tls.write_tls(&mut hello).unwrap();
    hello
}

/// The status code of an HTTP answer's first line (0 when none).
pub fn status_of(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// A head sent byte by byte (200 ms apart) without ever ending, until kt
/// answers or closes: what kt answered.
pub fn drip(at: SocketAddr, start: &[u8]) -> String {
    let mut tcp = TcpStream::connect(at).unwrap();
    tcp.set_read_timeout(Some(HANG_GUARD)).unwrap();
    let mut sent = 0;
    // Until kt gives up on the head (a write then fails) or answers.
    loop {
        let byte = start.get(sent).copied().unwrap_or(b'a');
        if tcp.write_all(&[byte]).is_err() {
            break;
        }
        sent += 1;
        let mut peek = [0u8; 1];
        tcp.set_nonblocking(true).unwrap();
        let got = tcp.peek(&mut peek);
        tcp.set_nonblocking(false).unwrap();
        // Data (an answer) or end of stream: kt is done with the head.
        if got.is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    read_until_close(&mut tcp)
}

/// What a client got through a CONNECT.
#[derive(Debug)]
pub struct Tunnel {
    /// The CONNECT answer's head.
    pub connect: String,
    /// After a 200: the chat answer over TLS, or how TLS failed.
    pub call: Result<String, String>,
}

/// `CONNECT authority` (with `headers`, each ending in CRLF), then TLS
/// naming `sni` (trusting kt's CA) and a chat request with a hard-coded
/// key. With `pipelined`, the ClientHello goes in the same write as the
/// CONNECT head.
pub fn tunnel(
    at: SocketAddr,
    authority: &str,
    headers: &str,
    sni: &str,
    ca: &CertificateDer<'static>,
    pipelined: bool,
) -> Tunnel {
    let mut tcp = TcpStream::connect(at).unwrap();
    tcp.set_read_timeout(Some(HANG_GUARD)).unwrap();
    let mut tls = rustls::ClientConnection::new(
        client_tls(ca, false),
        ServerName::try_from(sni.to_string()).unwrap(),
    )
    .unwrap();
    let mut first =
        format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{headers}\r\n").into_bytes();
    if pipelined {
        tls.write_tls(&mut first).unwrap();
    }
    tcp.write_all(&first).unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tcp.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
    }
    let connect = String::from_utf8_lossy(&head).into_owned();
    if status_of(&connect) != 200 {
        return Tunnel {
            connect,
            call: Err("no tunnel".into()),
        };
    }
    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nAuthorization: Bearer {JOB_KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut s = rustls::StreamOwned::new(tls, tcp);
    let call = match s.write_all(req.as_bytes()) {
        Err(e) => Err(e.to_string()),
        Ok(()) => {
            let mut out = Vec::new();
            match s.read_to_end(&mut out) {
                // A peer closing without close_notify still said its answer.
                Ok(_) => Ok(String::from_utf8_lossy(&out).into_owned()),
                Err(_) if !out.is_empty() => Ok(String::from_utf8_lossy(&out).into_owned()),
                Err(e) => Err(e.to_string()),
            }
        }
    };
    Tunnel { connect, call }
}

/// Runs blocking client code off the test's runtime (kt is served on it).
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}
