//! The hook where the policy chain (DLP, audit) plugs in: called with the
//! request parts and the whole body before anything is forwarded.

use bytes::Bytes;

use crate::config::Provider;
use crate::gateway::ClientInfo;

/// What a policy sees.
#[derive(Debug)]
pub struct PolicyRequest<'a> {
    /// Method, URI (credentials already removed), headers (credentials already removed).
    pub parts: &'a http::request::Parts,
    /// The provider the request is for.
    pub provider: &'a Provider,
    /// The API path relative to the provider root (credentials removed).
    pub api_path: &'a str,
    /// The request body, complete.
    pub body: &'a Bytes,
    /// The process behind the connection, when captured.
    pub client: &'a ClientInfo,
}

/// The error code a blocking response carries (`kt_dlp_blocked`, …), as a
/// response extension, so the decision event names the same code the
/// client saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockCode(pub &'static str);

/// A policy's answer.
#[derive(Debug)]
pub enum PolicyVerdict {
    /// Forward as is.
    Allow,
    /// Answer the client with this response; nothing is forwarded. Put a
    /// [`BlockCode`] in its extensions to name the reason in the event
    /// (otherwise `kt_policy_blocked`).
    Block(http::Response<Bytes>),
    /// Forward this body instead (redaction).
    Rewrite(Bytes),
}

/// A policy (or the whole chain). `notes` collects short lines for the
/// decision record (`dlp-filter: block rule=openai-key`), never matched text.
pub trait Policy: Send + Sync {
    /// Judges one request.
    fn check(&self, request: &PolicyRequest<'_>, notes: &mut Vec<String>) -> PolicyVerdict;
}

/// Allows everything (no chain configured).
#[derive(Clone, Copy, Debug, Default)]
pub struct AllowAll;

impl Policy for AllowAll {
    fn check(&self, _request: &PolicyRequest<'_>, _notes: &mut Vec<String>) -> PolicyVerdict {
        PolicyVerdict::Allow
    }
}
