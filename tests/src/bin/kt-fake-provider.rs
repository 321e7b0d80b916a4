//! A fake AI provider for the demo: TLS on loopback addresses with its own
//! test CA, OpenAI- and Anthropic-shaped answers. Writes the CA certificate
//! to `--ca-out`, prints one line per request it receives (the last 6
//! characters of the key it was given, so a person can see which key
//! arrived), and stops when its standard input closes. A line `NAME=BEHAVIOR`
//! on its standard input changes how that fake answers from then on.
//!
//! Usage: `kt-fake-provider --ca-out FILE NAME=ADDR=BEHAVIOR...`
//! with BEHAVIOR `ok` or an HTTP status such as `503`.

use std::net::SocketAddr;
use std::time::Duration;

use guard_tests::fake_provider::{Behavior, FakeProvider, TestCa};
use tokio::io::AsyncReadExt;

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("kt-fake-provider: {e}");
        std::process::exit(2);
    }
}

async fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut ca_out = None;
    let mut specs = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--ca-out" {
            ca_out = Some(it.next().ok_or("--ca-out needs a file")?.clone());
        } else {
            specs.push(a.clone());
        }
    }
    let ca_out = ca_out.ok_or("missing --ca-out FILE")?;
    let ca = TestCa::new();
    std::fs::write(&ca_out, &ca.pem).map_err(|e| format!("{ca_out}: {e}"))?;
    let mut fakes = Vec::new();
    for spec in &specs {
        let mut parts = spec.splitn(3, '=');
        let (Some(name), Some(addr), Some(behavior)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(format!("bad spec {spec}: want NAME=ADDR=BEHAVIOR"));
        };
        let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
        if !addr.ip().is_loopback() {
            return Err(format!("{addr} is not a loopback address"));
        }
        let behavior = parse_behavior(behavior)?;
        let fake = FakeProvider::start_at(&ca, name, behavior, addr).await;
        println!("fake {name} listening on {}", fake.addr);
        fakes.push((name.to_string(), fake, 0usize));
    }
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    let mut pending = Vec::new();
    loop {
        tokio::select! {
            r = stdin.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            },
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line).trim().to_string();
            let Some((name, behavior)) = line.split_once('=') else {
                continue;
            };
            match (fakes.iter().find(|f| f.0 == name), parse_behavior(behavior)) {
                (Some((_, fake, _)), Ok(b)) => {
                    fake.set_behavior(b);
                    println!("fake {name} now answers {behavior}");
                }
                _ => eprintln!("kt-fake-provider: ignoring {line:?}"),
            }
        }
        for (name, fake, seen) in &mut fakes {
            let reqs = fake.requests();
            for r in &reqs[*seen..] {
                let key = r
                    .headers
                    .get("authorization")
                    .or_else(|| r.headers.get("x-api-key"))
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                let tail: String = key
                    .chars()
                    .rev()
                    .take(6)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                println!(
                    "fake {name} received {} {} with key …{tail}",
                    r.method, r.path
                );
            }
            *seen = reqs.len();
        }
    }
    Ok(())
}

fn parse_behavior(s: &str) -> Result<Behavior, String> {
    match s {
        "ok" => Ok(Behavior::Ok),
        s => Ok(Behavior::Status(
            s.parse().map_err(|_| format!("bad behavior {s}"))?,
        )),
    }
}
