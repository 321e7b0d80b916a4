//! The policy chain (`policies.chain`): called with a request's parts and
//! whole body before anything is forwarded. `dlp-filter` scans what the
//! request carries and blocks, redacts or records; `audit-logger` refuses
//! traffic while events cannot be recorded, when configured to.
//!
//! Verdicts and notes are typed: the gateway shapes a refusal as the
//! provider's own error body, and the event store stores the notes.
#![forbid(unsafe_code)]

mod chain;

pub use chain::{Chain, ChainError};

use bytes::Bytes;
use http::StatusCode;

use crate::provider::Provider;
use crate::record::{ClientInfo, PolicyNote};

/// What a policy sees.
#[derive(Debug)]
pub struct PolicyRequest<'a> {
    /// Method, URI and headers, credentials already removed.
    pub parts: &'a http::request::Parts,
    /// The provider the request is for.
    pub provider: &'a Provider,
    /// The API path relative to the provider root (credentials removed).
    pub api_path: &'a str,
    /// The request body, complete.
    pub body: &'a Bytes,
    /// The process behind the connection, when known.
    pub client: &'a ClientInfo,
}

/// Why a policy refused a request; the gateway answers it in the
/// provider's error shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The status the client gets.
    pub status: StatusCode,
    /// kt's error code (see [`crate::record::codes`]).
    pub code: &'static str,
    /// What the client is told (never matched text).
    pub message: String,
}

/// A policy's answer.
#[derive(Debug)]
pub enum PolicyVerdict {
    /// Forward as is.
    Allow,
    /// Refuse: nothing is forwarded.
    Block(Refusal),
    /// Forward this body instead (redaction; it comes back decoded).
    Rewrite(Bytes),
}

/// A policy (or the whole chain). `notes` collects what it decided, for the
/// record; never matched text.
pub trait Policy: Send + Sync {
    /// Judges one request.
    fn check(&self, request: &PolicyRequest<'_>, notes: &mut Vec<PolicyNote>) -> PolicyVerdict;

    /// About how many bytes [`Policy::check`] may allocate beyond the body
    /// for a `body_len`-byte body with this `Content-Encoding` (the DLP
    /// scan's decoded copies and views, a rewritten body); the gateway
    /// counts them in `gateway.max_buffered_bytes` before calling it.
    fn working_bytes(&self, _body_len: usize, _content_encoding: Option<&str>) -> usize {
        0
    }
}

/// Allows everything (no chain configured).
#[derive(Clone, Copy, Debug, Default)]
pub struct AllowAll;

impl Policy for AllowAll {
    fn check(&self, _request: &PolicyRequest<'_>, _notes: &mut Vec<PolicyNote>) -> PolicyVerdict {
        PolicyVerdict::Allow
    }
}
