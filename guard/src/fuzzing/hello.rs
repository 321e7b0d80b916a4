//! The ClientHello peek: any bytes, split into reads any way.
//!
//! Input: one byte `n`, then `n % 16` read sizes (a size of 0 makes the
//! reader return `Pending` once, as a socket without data does), then the bytes
//! the client sends. The sizes are used in turn, over and over; then the
//! reader reports end of stream.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

use crate::gateway::tls::{Hello, HelloError, read_client_hello};

/// A client that sends `data` in reads of the given sizes.
struct Scripted<'a> {
    data: &'a [u8],
    sizes: &'a [u8],
    turn: usize,
}

impl AsyncRead for Scripted<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let size = if self.sizes.is_empty() {
            usize::MAX
        } else {
            let s = self.sizes[self.turn % self.sizes.len()];
            self.turn += 1;
            if s == 0 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            usize::from(s)
        };
        let n = size.min(buf.remaining()).min(self.data.len());
        buf.put_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Poll::Ready(Ok(()))
    }
}

#[derive(Debug, PartialEq)]
enum Outcome {
    Plain,
    Tls { sni: Option<String>, ech: bool },
    Unparseable,
    Oversized,
    Closed,
}

fn run(data: &[u8], sizes: &[u8]) -> (Outcome, Vec<u8>) {
    let mut io = Scripted {
        data,
        sizes,
        turn: 0,
    };
    let mut buf = Vec::new();
    let out = match super::block_on(read_client_hello(&mut io, &mut buf)) {
        Ok(Hello::Plain) => Outcome::Plain,
        Ok(Hello::Tls { sni, ech }) => Outcome::Tls { sni, ech },
        Err(HelloError::Unparseable) => Outcome::Unparseable,
        Err(HelloError::Oversized) => Outcome::Oversized,
        Err(HelloError::Closed(_)) => Outcome::Closed,
    };
    (out, buf)
}

/// The peek keeps every byte it read, in order; plain HTTP is told by the
/// first byte alone; and the verdict does not depend on how the bytes were
/// split into reads.
pub fn client_hello(data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 16).min(rest.len());
    let (sizes, stream) = rest.split_at(n);
    // Only zeros would be a socket that never delivers: read freely then.
    let sizes = if sizes.iter().all(|&s| s == 0) {
        &[]
    } else {
        sizes
    };
    let (split, buf) = run(stream, sizes);
    assert!(
        stream.starts_with(&buf),
        "the peek returns what it read, in order"
    );
    match stream.first() {
        None => assert_eq!(split, Outcome::Closed),
        Some(&0x16) => assert_ne!(split, Outcome::Plain, "a handshake record is not plain"),
        Some(_) => assert_eq!(split, Outcome::Plain, "anything else is plain"),
    }
    if matches!(split, Outcome::Closed) {
        assert_eq!(buf, stream, "closed only after reading everything");
    }
    // The same bytes in the largest reads, and one byte at a time.
    let (whole, _) = run(stream, &[]);
    assert_eq!(split, whole, "split into {sizes:?} vs read whole");
    if stream.len() <= 1024 {
        let (bytewise, _) = run(stream, &[1]);
        assert_eq!(split, bytewise, "split into {sizes:?} vs one byte per read");
    }
}
