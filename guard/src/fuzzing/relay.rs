//! The response relay: an upstream body that sends data, trailers, waits,
//! stalls or fails at any point, and a client that may stop reading.
//!
//! Input: a flags byte (bit 0: an event stream; bit 1: the upstream declares
//! its exact length; bit 2: it reports its end with its last frame; bits
//! 3-6: the client stops after that many frames, 0 = reads to the end),
//! then operations: `0-3 n bytes…` data of `n` bytes, `4 …0` a failure
//! with that message, `5` not ready once, `6` a stall (the idle timeout
//! fires), `7` trailers.
//!
//! The relay's idle timer runs on the wall clock: a script without a stall
//! gets an idle timeout of an hour, one with a stall 1 ms.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;

use crate::gateway::relay::{Amend, Relay};
use crate::record::{CutReason, RecordSink, RequestRecord, StreamCut};

const IDLE: Duration = Duration::from_millis(1);

#[derive(Clone, Debug)]
enum Op {
    Data(Vec<u8>),
    Fail(String),
    NotReady,
    Stall,
    Trailers,
}

struct Upstream {
    ops: VecDeque<Op>,
    exact: Option<u64>,
    ends_with_last: bool,
}

impl Body for Upstream {
    type Data = Bytes;
    type Error = String;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, String>>> {
        match self.ops.pop_front() {
            None => Poll::Ready(None),
            Some(Op::Data(d)) => Poll::Ready(Some(Ok(Frame::data(Bytes::from(d))))),
            Some(Op::Fail(m)) => Poll::Ready(Some(Err(m))),
            Some(Op::Trailers) => Poll::Ready(Some(Ok(Frame::trailers(http::HeaderMap::new())))),
            Some(Op::NotReady) => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Some(Op::Stall) => {
                // Never ready again: only the idle timer ends this.
                self.ops.push_front(Op::Stall);
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ends_with_last && self.ops.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        self.exact
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

#[derive(Default)]
struct Cuts(Mutex<Vec<StreamCut>>);

impl RecordSink for Cuts {
    fn record(&self, _r: RequestRecord) {}
    fn amend(&self, _request_id: &str, _time: SystemTime, cut: StreamCut) {
        self.0.lock().unwrap().push(cut);
    }
}

fn parse_ops(mut data: &[u8]) -> Vec<Op> {
    let mut ops = Vec::new();
    while let Some((&b, rest)) = data.split_first() {
        data = rest;
        ops.push(match b % 8 {
            0..=3 => {
                let Some((&n, rest)) = data.split_first() else {
                    break;
                };
                let n = usize::from(n).min(rest.len());
                let (d, rest) = rest.split_at(n);
                data = rest;
                Op::Data(d.to_vec())
            }
            4 => {
                let (m, rest) = super::split_once(data, 0);
                data = rest;
                Op::Fail(String::from_utf8_lossy(m).into_owned())
            }
            5 => Op::NotReady,
            6 => Op::Stall,
            _ => Op::Trailers,
        });
    }
    ops
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a runtime")
    })
}

/// What the client saw.
#[derive(Debug, PartialEq)]
enum End {
    Clean,
    Error,
    Stopped,
}

/// A failure after the first byte never looks like a clean end; an event
/// stream gets one well-formed SSE `error` event first; the data passed is
/// the upstream's, in order; a cut is reported once, a clean end never.
pub fn relay(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let sse = flags & 1 != 0;
    let stop_after = usize::from((flags >> 3) & 0x0f);
    let mut ops = parse_ops(rest);
    // The idle timer runs on the wall clock: only a script with a stall
    // gets a short one, and then no "not ready" steps, whose real time
    // could add up to it before the stall.
    let stalls = ops.iter().any(|o| matches!(o, Op::Stall));
    if stalls {
        ops.retain(|o| !matches!(o, Op::NotReady));
    }
    let idle = if stalls {
        IDLE
    } else {
        Duration::from_secs(3600)
    };
    let total: u64 = ops
        .iter()
        .map(|o| match o {
            Op::Data(d) => d.len() as u64,
            _ => 0,
        })
        .sum();
    // Data before the first failure, and that failure.
    let mut before = Vec::new();
    let mut failure = None;
    for op in &ops {
        match op {
            Op::Data(d) => before.extend_from_slice(d),
            Op::Fail(_) | Op::Stall => {
                failure = Some(op.clone());
                break;
            }
            _ => {}
        }
    }
    let upstream = Upstream {
        ops: ops.into(),
        exact: (flags & 2 != 0).then_some(total),
        ends_with_last: flags & 4 != 0,
    };
    let cuts = Arc::new(Cuts::default());
    let amend = Amend {
        sink: cuts.clone(),
        request_id: "req".into(),
        time: SystemTime::UNIX_EPOCH,
    };

    let (end, out, frames) = runtime().block_on(async {
        let mut relay = Relay::new(upstream, sse, "t1".into(), idle, Some(amend));
        let mut out = Vec::new();
        let mut frames: Vec<Bytes> = Vec::new();
        let mut n = 0;
        let end = loop {
            if stop_after != 0 && n == stop_after {
                let done = relay.is_end_stream();
                drop(relay);
                break if done { End::Clean } else { End::Stopped };
            }
            match relay.frame().await {
                None => break End::Clean,
                Some(Err(_)) => break End::Error,
                Some(Ok(f)) => {
                    n += 1;
                    if let Some(d) = f.data_ref() {
                        out.extend_from_slice(d);
                        frames.push(d.clone());
                    }
                }
            }
        };
        (end, out, frames)
    });
    let cuts = cuts.0.lock().unwrap();
    assert!(
        cuts.len() <= 1,
        "a request is amended at most once: {}",
        cuts.len()
    );

    match end {
        End::Clean => {
            assert!(cuts.is_empty(), "a clean end is no cut");
            if stop_after == 0 {
                assert!(failure.is_none(), "a failed upstream ended cleanly");
                assert_eq!(out.len() as u64, total, "every byte passed");
            }
        }
        End::Error => {
            let failure = failure.expect("an error only after an upstream failure");
            let cut = cuts.first().expect("a cut is reported");
            assert_eq!(
                cut.bytes,
                before.len() as u64,
                "bytes passed before the cut"
            );
            match (&failure, &cut.reason) {
                (Op::Fail(m), CutReason::UpstreamFailed { message }) => assert_eq!(m, message),
                (Op::Stall, CutReason::IdleTimeout { idle }) => assert_eq!(*idle, IDLE),
                other => panic!("cut reported as {other:?}"),
            }
            if sse {
                let event = frames.last().expect("the error event");
                assert!(out.starts_with(&before) && out.len() == before.len() + event.len());
                check_error_event(&out);
            } else {
                assert_eq!(out, before, "a plain body is aborted at once");
            }
        }
        End::Stopped => {
            if failure.is_none() {
                assert!(out.len() as u64 <= total, "more out than the upstream sent");
            }
            if flags & 2 != 0 && out.len() as u64 == total {
                assert!(
                    cuts.is_empty(),
                    "a body of declared length that went out whole"
                );
            } else if let Some(cut) = cuts.first() {
                assert!(
                    matches!(cut.reason, CutReason::ClientClosed) || failure.is_some(),
                    "{:?}",
                    cut.reason
                );
            } else {
                panic!("a body dropped before its end is a cut");
            }
        }
    }
}

/// Reads `stream` as an event stream (the WHATWG rules: lines end in CR,
/// LF or CRLF; a blank line dispatches) and checks the last event is kt's
/// error event with a JSON payload.
fn check_error_event(stream: &[u8]) {
    let text = String::from_utf8_lossy(stream);
    let mut events: Vec<(String, String)> = Vec::new();
    let (mut kind, mut data) = (String::new(), String::new());
    let mut rest = text.as_ref();
    while !rest.is_empty() {
        let end = rest.find(['\r', '\n']).unwrap_or(rest.len());
        let line = &rest[..end];
        rest = &rest[end..];
        rest = rest
            .strip_prefix("\r\n")
            .or_else(|| rest.strip_prefix('\r'))
            .or_else(|| rest.strip_prefix('\n'))
            .unwrap_or(rest);
        if line.is_empty() {
            if !data.is_empty() {
                events.push((std::mem::take(&mut kind), std::mem::take(&mut data)));
            }
            kind.clear();
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => kind = value.to_string(),
            "data" => {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(value);
            }
            _ => {}
        }
    }
    let (kind, data) = events.last().expect("at least the error event");
    assert_eq!(kind, "error", "the last event is kt's error event");
    let v: serde_json::Value = serde_json::from_str(data).expect("its data is JSON");
    assert_eq!(v["error"]["type"], "gateway_error");
}
