//! The response body passed to the client: upstream frames forwarded one by
//! one as they arrive, with an idle-gap timeout. A failure after the first
//! byte never looks like a clean end: event streams get an SSE `error` event
//! and then the stream is aborted; other bodies are aborted at once.
//!
//! The decision was recorded when the headers went out; a cut (upstream
//! failure, idle gap, or the body dropped before its end because the client
//! went away) is reported to the sink once, as an amendment to it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::record::{CutReason, RecordSink, StreamCut, codes};

/// Boxed error type of relayed bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a relayed stream was cut.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The upstream sent nothing for longer than `gateway.idle_timeout`.
    #[error("upstream {target}: no data for {0:?}", .idle)]
    Idle {
        /// Target id.
        target: String,
        /// The configured gap.
        idle: Duration,
    },
    /// The upstream connection failed mid-body.
    #[error("upstream {target}: stream failed: {message}")]
    Upstream {
        /// Target id.
        target: String,
        /// What broke (no secrets: hyper's error text).
        message: String,
    },
}

enum State {
    Streaming,
    /// The SSE error event went out; abort after one yield, so the server
    /// flushes the event before the connection is torn down (hyper drops
    /// its write buffer when a body fails).
    Aborting {
        err: Option<RelayError>,
        yielded: bool,
    },
    Done,
}

/// Where a cut is reported: the recorded decision it amends.
pub struct Amend {
    /// The sink that recorded the decision.
    pub sink: Arc<dyn RecordSink>,
    /// The decision's request id.
    pub request_id: String,
    /// The decision's time.
    pub time: SystemTime,
}

/// Wraps an upstream body.
pub struct Relay<B> {
    inner: B,
    sse: bool,
    target: String,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
    state: State,
    /// Taken by the first report, so a request is amended at most once.
    amend: Option<Amend>,
    /// Upstream data bytes passed on so far.
    bytes: u64,
    /// The upstream body's exact length, when it declared one.
    expected: Option<u64>,
}

impl<B: Body> Relay<B> {
    /// `sse`: the response is `text/event-stream`. `amend`: where to report
    /// a cut; `None` for responses the server sends without a body (it drops
    /// the body unread, which is no cut).
    pub fn new(inner: B, sse: bool, target: String, idle: Duration, amend: Option<Amend>) -> Self {
        // An upstream body already at its end: nothing to relay, nothing
        // that could be cut.
        let state = if inner.is_end_stream() {
            State::Done
        } else {
            State::Streaming
        };
        let expected = inner.size_hint().exact();
        Relay {
            inner,
            sse,
            target,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            state,
            amend,
            bytes: 0,
            expected,
        }
    }
}

impl<B> Relay<B> {
    fn report(&mut self, reason: CutReason) {
        if let Some(a) = self.amend.take() {
            a.sink.amend(
                &a.request_id,
                a.time,
                StreamCut {
                    reason,
                    bytes: self.bytes,
                },
            );
        }
    }
}

impl<B> Drop for Relay<B> {
    fn drop(&mut self) {
        // Dropped while still streaming: the server gave up on the body
        // (client gone, or shutdown) before it ended. A body of declared
        // length is dropped unpolled once that length went out: not a cut.
        if matches!(self.state, State::Streaming) && self.expected != Some(self.bytes) {
            self.report(CutReason::ClientClosed);
        }
    }
}

/// The SSE event sent when an event stream breaks.
pub fn sse_error_event(message: &str) -> Bytes {
    let data = serde_json::json!({
        "type": "error",
        "error": {
            "type": "gateway_error",
            "code": codes::UPSTREAM_STREAM_FAILED,
            "message": message,
        }
    });
    Bytes::from(format!("\n\nevent: error\ndata: {data}\n\n"))
}

impl<B> Relay<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    fn poll_frame_again(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(self).poll_frame(cx)
    }
}

impl<B> Body for Relay<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match &mut this.state {
            State::Done => return Poll::Ready(None),
            State::Aborting { err, yielded } => {
                if !*yielded {
                    *yielded = true;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                let err = err.take();
                this.state = State::Done;
                return Poll::Ready(err.map(|e| Err(Box::new(e) as BoxError)));
            }
            State::Streaming => {}
        }
        let failure = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.timer.as_mut().reset(Instant::now() + this.idle);
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                }
                // A body of known length may be dropped by the server right
                // after its last byte, without a final poll: it ended here.
                if this.inner.is_end_stream() {
                    this.state = State::Done;
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(None) => {
                this.state = State::Done;
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Err(e))) => RelayError::Upstream {
                target: this.target.clone(),
                message: e.to_string(),
            },
            Poll::Pending => {
                ready!(this.timer.as_mut().poll(cx));
                RelayError::Idle {
                    target: this.target.clone(),
                    idle: this.idle,
                }
            }
        };
        tracing::warn!(error = %failure, "upstream stream cut after the response started");
        this.report(match &failure {
            RelayError::Idle { idle, .. } => CutReason::IdleTimeout { idle: *idle },
            RelayError::Upstream { message, .. } => CutReason::UpstreamFailed {
                message: message.clone(),
            },
        });
        if this.sse {
            let event = sse_error_event(&failure.to_string());
            this.state = State::Aborting {
                err: Some(failure),
                yielded: false,
            };
            Poll::Ready(Some(Ok(Frame::data(event))))
        } else {
            this.state = State::Aborting {
                err: Some(failure),
                yielded: false,
            };
            this.poll_frame_again(cx)
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            // An event stream may get the error event appended: the server
            // must not announce the upstream's length (it would send a
            // Content-Length of its own from an exact hint).
            State::Streaming if !self.sse => self.inner.size_hint(),
            _ => SizeHint::default(),
        }
    }
}
