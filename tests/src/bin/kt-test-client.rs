//! A small client for capture tests: started outside the test cgroup, it
//! waits for one line on stdin (sent after the test moved it into the
//! cgroup), then does one thing and reports on stdout as `key=value` lines.
//!
//! Usage: `kt-test-client tcp ADDR [--mark N]`, `kt-test-client udp ADDR`,
//! or `kt-test-client connect-loop ADDR N` (benchmark: N connects, prints
//! nanoseconds per connect).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};

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
    let mark: Option<u32> = match args.get(3).map(String::as_str).filter(|_| mode == "tcp") {
        Some("--mark") => Some(
            args.get(4)
                .ok_or("missing mark")?
                .parse()
                .map_err(|e| format!("bad mark: {e}"))?,
        ),
        _ => None,
    };
    let mut go = String::new();
    std::io::stdin()
        .read_line(&mut go)
        .map_err(|e| format!("stdin: {e}"))?;
    println!("pid={}", std::process::id());
    match mode.as_str() {
        "tcp" => tcp(addr, mark),
        "udp" => udp(addr),
        "connect-loop" => connect_loop(
            addr,
            args.get(3).and_then(|n| n.parse().ok()).unwrap_or(10_000),
        ),
        other => Err(format!("unknown mode {other}")),
    }
}

fn tcp(addr: SocketAddr, mark: Option<u32>) -> Result<(), String> {
    let domain = socket2::Domain::for_address(addr);
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, None)
        .map_err(|e| format!("socket: {e}"))?;
    if let Some(mark) = mark {
        sock.set_mark(mark).map_err(|e| format!("SO_MARK: {e}"))?;
    }
    match sock.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) => {
            println!("connect_error={}", e.raw_os_error().unwrap_or(0));
            return Ok(());
        }
    }
    let stream: TcpStream = sock.into();
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

fn connect_loop(addr: SocketAddr, n: u32) -> Result<(), String> {
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
        s.set_linger(Some(std::time::Duration::ZERO))
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
