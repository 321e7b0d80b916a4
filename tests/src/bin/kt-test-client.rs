//! A small client for capture tests: started outside the test cgroup, it
//! waits for one line on stdin (sent after the test moved it into the
//! cgroup), then does one thing and reports on stdout as `key=value` lines.
//!
//! Usage:
//! - `kt-test-client tcp ADDR [--mark N] [--serve]`: connect, say hello,
//!   print the reply. `--serve` first listens on ADDR itself (in its own
//!   network namespace, a direct connect would land there) and reports
//!   `served=1` if that listener got the connection.
//! - `kt-test-client udp ADDR`: `sendto` and `connect` a UDP socket.
//! - `kt-test-client hold ADDR`: create a TCP socket of ADDR's family,
//!   print `fd=N`, keep it until stdin closes (the test takes the socket
//!   with `pidfd_getfd`).
//! - `kt-test-client bind ADDR`: try to listen on ADDR.
//! - `kt-test-client https ADDR --sni NAME [--mark N]`: a chat request over
//!   TLS (certificate not verified: it plays a process that wants to reach
//!   the provider directly) with `Authorization: Bearer $KT_CLIENT_KEY`;
//!   prints `status=` and `body=`.
//! - `kt-test-client loop ADDR...`: connect to each ADDR in turn, say
//!   hello, and again, until stdin closes; one line per connection,
//!   `conn phase=P dest=ADDR result=R` (R: the reply, or
//!   `connect_error:ERRNO`). P counts the lines read from stdin before the
//!   connection began: a test writes one after it changed what is captured,
//!   so connections of that phase began after the change.
//! - `kt-test-client connect-loop ADDR N [--listen]` (benchmark: N
//!   connects, prints nanoseconds per connect; `--listen` first listens on
//!   ADDR itself, accepting and dropping, for a namespace of its own).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

/// Hang guard for reads (never a speed assertion): a peer that never
/// answers ends the client with an error the test can show.
const READ_TIMEOUT: Duration = Duration::from_secs(20);

fn main() {
    if let Err(e) = run() {
        println!("error={e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).ok_or("missing mode")?;
    let addr: SocketAddr = args
        .get(2)
        .ok_or("missing address")?
        .parse()
        .map_err(|e| format!("bad address: {e}"))?;
    let opt = |name: &str| {
        args.iter()
            .skip(3)
            .position(|a| a == name)
            .and_then(|i| args.get(i + 4))
    };
    let mark: Option<u32> = opt("--mark")
        .map(|m| m.parse().map_err(|e| format!("bad mark: {e}")))
        .transpose()?;
    let serve = args.iter().skip(3).any(|a| a == "--serve");
    let mut go = String::new();
    std::io::stdin()
        .read_line(&mut go)
        .map_err(|e| format!("stdin: {e}"))?;
    println!("pid={}", std::process::id());
    match mode.as_str() {
        "tcp" => tcp(addr, mark, serve),
        "udp" => udp(addr),
        "hold" => hold(addr),
        "bind" => bind(addr),
        "https" => https(addr, opt("--sni").ok_or("missing --sni")?, mark),
        "loop" => looping(
            args.iter()
                .skip(2)
                .map(|a| a.parse().map_err(|e| format!("bad address {a}: {e}")))
                .collect::<Result<Vec<SocketAddr>, String>>()?,
        ),
        "connect-loop" => connect_loop(
            addr,
            args.get(3).and_then(|n| n.parse().ok()).unwrap_or(10_000),
            args.iter().skip(3).any(|a| a == "--listen"),
        ),
        other => Err(format!("unknown mode {other}")),
    }
}

/// A TCP socket for `addr`, carrying `mark` when given.
fn socket(addr: SocketAddr, mark: Option<u32>) -> Result<socket2::Socket, String> {
    let domain = socket2::Domain::for_address(addr);
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, None)
        .map_err(|e| format!("socket: {e}"))?;
    if let Some(mark) = mark {
        sock.set_mark(mark).map_err(|e| format!("SO_MARK: {e}"))?;
        println!("marked={mark}");
    }
    Ok(sock)
}

fn tcp(addr: SocketAddr, mark: Option<u32>, serve: bool) -> Result<(), String> {
    let own = if serve {
        let l = TcpListener::bind(addr).map_err(|e| format!("listen: {e}"))?;
        l.set_nonblocking(true).map_err(|e| e.to_string())?;
        Some(l)
    } else {
        None
    };
    let sock = socket(addr, mark)?;
    let connected = sock.connect(&addr.into());
    if let Some(l) = &own {
        // The connect has completed (or failed) already: a direct
        // connection to our own listener is queued by now.
        println!("served={}", u8::from(l.accept().is_ok()));
    }
    match connected {
        Ok(()) => {}
        Err(e) => {
            println!("connect_error={}", e.raw_os_error().unwrap_or(0));
            return Ok(());
        }
    }
    if own.is_some() {
        return Ok(());
    }
    let stream: TcpStream = sock.into();
    stream
        .set_read_timeout(Some(READ_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let peer = stream
        .peer_addr()
        .map_err(|e| format!("getpeername: {e}"))?;
    let local = stream
        .local_addr()
        .map_err(|e| format!("getsockname: {e}"))?;
    println!("peer={peer}");
    println!("local={local}");
    let mut w = stream.try_clone().map_err(|e| e.to_string())?;
    w.write_all(b"hello\n").map_err(|e| format!("write: {e}"))?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .map_err(|e| format!("read: {e}"))?;
    println!("reply={}", reply.trim_end());
    Ok(())
}

fn looping(addrs: Vec<SocketAddr>) -> Result<(), String> {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    let phase = Arc::new(AtomicU32::new(0));
    let done = Arc::new(AtomicBool::new(false));
    {
        let (phase, done) = (phase.clone(), done.clone());
        std::thread::spawn(move || {
            for line in std::io::stdin().lines() {
                if line.is_err() {
                    break;
                }
                phase.fetch_add(1, Ordering::SeqCst);
            }
            done.store(true, Ordering::SeqCst);
        });
    }
    while !done.load(Ordering::SeqCst) {
        for addr in &addrs {
            let p = phase.load(Ordering::SeqCst);
            let result = hello(*addr);
            println!("conn phase={p} dest={addr} result={result}");
        }
    }
    Ok(())
}

/// One connection: the reply to hello, or why there was none.
fn hello(addr: SocketAddr) -> String {
    let stream = match TcpStream::connect(addr) {
        Ok(s) => s,
        Err(e) => return format!("connect_error:{}", e.raw_os_error().unwrap_or(0)),
    };
    let exchange = || -> std::io::Result<String> {
        stream.set_read_timeout(Some(READ_TIMEOUT))?;
        (&stream).write_all(b"hello\n")?;
        let mut reply = String::new();
        BufReader::new(&stream).read_line(&mut reply)?;
        Ok(reply.trim_end().to_string())
    };
    exchange().unwrap_or_else(|e| format!("io_error:{e}"))
}

fn udp(addr: SocketAddr) -> Result<(), String> {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .map_err(|e| format!("{e}"))?;
    let sock = UdpSocket::bind(bind).map_err(|e| format!("bind: {e}"))?;
    match sock.send_to(b"quic?", addr) {
        Ok(_) => println!("udp_sent=1"),
        Err(e) => println!("udp_error={}", e.raw_os_error().unwrap_or(0)),
    }
    match sock.connect(addr) {
        Ok(()) => println!("udp_connect=ok"),
        Err(e) => println!("udp_connect_error={}", e.raw_os_error().unwrap_or(0)),
    }
    Ok(())
}

fn hold(addr: SocketAddr) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let sock = socket(addr, None)?;
    println!("fd={}", sock.as_raw_fd());
    // Until the test closes stdin.
    let mut rest = String::new();
    let _ = std::io::stdin().read_to_string(&mut rest);
    drop(sock);
    Ok(())
}

fn bind(addr: SocketAddr) -> Result<(), String> {
    match TcpListener::bind(addr) {
        Ok(_) => println!("bound=1"),
        Err(e) => println!("bind_error={}", e.raw_os_error().unwrap_or(0)),
    }
    Ok(())
}

fn https(addr: SocketAddr, sni: &str, mark: Option<u32>) -> Result<(), String> {
    let key = std::env::var("KT_CLIENT_KEY").map_err(|_| "KT_CLIENT_KEY is not set")?;
    let sock = socket(addr, mark)?;
    if let Err(e) = sock.connect(&addr.into()) {
        println!("connect_error={}", e.raw_os_error().unwrap_or(0));
        return Ok(());
    }
    let tcp: TcpStream = sock.into();
    tcp.set_read_timeout(Some(READ_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from(sni.to_string())
        .map_err(|e| format!("bad --sni: {e}"))?;
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name).map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {sni}\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    if let Err(e) = tls.write_all(request.as_bytes()) {
        println!("tls_error={e}");
        return Ok(());
    }
    let mut response = Vec::new();
    // A peer that closes without close_notify still gave us its answer.
    let _ = tls.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response);
    let status = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("none");
    println!("status={status}");
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    println!("body={}", body.replace(['\r', '\n'], " "));
    Ok(())
}

/// Accepts any server certificate (see `https`).
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn connect_loop(addr: SocketAddr, n: u32, listen: bool) -> Result<(), String> {
    if listen {
        let l = TcpListener::bind(addr).map_err(|e| format!("listen: {e}"))?;
        std::thread::spawn(move || {
            for s in l.incoming() {
                drop(s);
            }
        });
    }
    let start = std::time::Instant::now();
    for _ in 0..n {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )
        .map_err(|e| format!("socket: {e}"))?;
        // Close with RST: no TIME_WAIT, so thousands of runs do not exhaust
        // ephemeral ports and slow later runs down.
        s.set_linger(Some(Duration::ZERO))
            .map_err(|e| format!("SO_LINGER: {e}"))?;
        s.connect(&addr.into())
            .map_err(|e| format!("connect: {e}"))?;
        drop(s);
    }
    println!(
        "ns_per_connect={}",
        start.elapsed().as_nanos() / u128::from(n.max(1))
    );
    Ok(())
}
