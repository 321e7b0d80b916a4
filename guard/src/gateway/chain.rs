//! The policy chain as configured (`policies.chain`): `dlp-filter` scans
//! what a request carries and blocks, redacts or records; `audit-logger`
//! refuses traffic while events cannot be recorded, when configured to.

use bytes::Bytes;
use http::StatusCode;

use super::policy::{BlockCode, Policy, PolicyRequest, PolicyVerdict};
use crate::config::{Config, DlpAction, PolicyKind, Provider};
use crate::dlp::{Finding, Location, RequestView, Scanner};
use crate::events::EventWriter;
use crate::routing::error_body;

/// Error code of a request refused by the DLP filter.
pub const DLP_BLOCKED: &str = "kt_dlp_blocked";

/// Error code of a request refused because the audit log is down
/// (`on_store_failure: refuse`).
pub const AUDIT_UNAVAILABLE: &str = "kt_audit_unavailable";

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
    Dlp(Box<Scanner>),
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
                PolicyKind::DlpFilter => {
                    let cfg = config.dlp.clone().unwrap_or_default();
                    let scanner = Scanner::new(&cfg).map_err(|e| ChainError::Dlp(e.to_string()))?;
                    steps.push(Step::Dlp(Box::new(scanner)));
                }
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
        let mut rewritten: Option<Bytes> = None;
        for step in &self.steps {
            match step {
                Step::Dlp(scanner) => {
                    let body = rewritten.as_ref().unwrap_or(request.body);
                    match dlp(scanner, request, body, notes) {
                        PolicyVerdict::Allow => {}
                        PolicyVerdict::Rewrite(b) => rewritten = Some(b),
                        block @ PolicyVerdict::Block(_) => return block,
                    }
                }
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
        match rewritten {
            Some(b) => PolicyVerdict::Rewrite(b),
            None => PolicyVerdict::Allow,
        }
    }
}

/// Runs the DLP filter over what the request carries (the gateway already
/// removed credential headers and query keys).
fn dlp(
    scanner: &Scanner,
    request: &PolicyRequest<'_>,
    body: &Bytes,
    notes: &mut Vec<String>,
) -> PolicyVerdict {
    let headers: Vec<(&str, &[u8])> = request
        .parts
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_bytes()))
        .collect();
    let encoding = request
        .parts
        .headers
        .get(http::header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok());
    let path = request
        .parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let view = RequestView {
        path_and_query: path,
        headers: &headers,
        content_encoding: encoding,
        body,
    };
    let scan = match scanner.scan(&view) {
        Ok(s) => s,
        Err(e) => {
            // Undecodable or oversized bodies cannot be checked: fail closed.
            notes.push("dlp-filter: block rule=undecodable-body".into());
            let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
            return PolicyVerdict::Block(response(
                request.provider,
                status,
                &format!("kt: the request body could not be checked for secrets: {e}"),
            ));
        }
    };
    if scan.findings.is_empty() {
        return PolicyVerdict::Allow;
    }
    let action = scanner.action();
    let verb = match action {
        DlpAction::Block => "block",
        DlpAction::Redact => "redact",
        DlpAction::Audit => "audit",
    };
    for f in &scan.findings {
        notes.push(format!(
            "dlp-filter: {verb} rule={} at={}",
            f.rule_id,
            where_(&f.location)
        ));
    }
    match action {
        DlpAction::Audit => PolicyVerdict::Allow,
        DlpAction::Block => PolicyVerdict::Block(blocked(request.provider, &scan.findings)),
        DlpAction::Redact => {
            // Only the body can be rewritten on the way out; a secret in the
            // URL or a header cannot be forwarded, so refuse those.
            if scan
                .findings
                .iter()
                .any(|f| !matches!(f.location, Location::Body { .. }))
            {
                return PolicyVerdict::Block(blocked(request.provider, &scan.findings));
            }
            match scanner.redact(&view) {
                Ok(r) => match r.body {
                    Some(b) => PolicyVerdict::Rewrite(Bytes::from(b)),
                    None => PolicyVerdict::Allow,
                },
                Err(_) => PolicyVerdict::Block(blocked(request.provider, &scan.findings)),
            }
        }
    }
}

/// Where a finding is, for notes and messages (never the text itself).
fn where_(l: &Location) -> String {
    match l {
        Location::Body {
            json_path: Some(p),
            start,
            end,
        } => {
            format!("body:{}[{start}..{end}]", p.replace(' ', ""))
        }
        Location::Body {
            json_path: None,
            start,
            end,
        } => format!("body[{start}..{end}]"),
        Location::Header { name } => format!("header:{name}"),
        Location::Url { start, end } => format!("url[{start}..{end}]"),
    }
}

fn blocked(provider: &Provider, findings: &[Finding]) -> http::Response<Bytes> {
    let list: Vec<String> = findings
        .iter()
        .take(5)
        .map(|f| format!("{} at {}", f.rule_id, where_(&f.location)))
        .collect();
    let more = findings.len().saturating_sub(5);
    let message = format!(
        "kt: request blocked by dlp-filter before it left this host: {}{}. Remove the secret from the request; if it is a live key, rotate it.",
        list.join("; "),
        if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        }
    );
    response(provider, StatusCode::FORBIDDEN, &message)
}

fn response(provider: &Provider, status: StatusCode, message: &str) -> http::Response<Bytes> {
    let body = error_body(Some(provider), status, DLP_BLOCKED, message, &[]);
    http::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .extension(BlockCode(DLP_BLOCKED))
        .body(Bytes::from(body))
        .unwrap_or_else(|_| http::Response::new(Bytes::new()))
}

fn unavailable() -> http::Response<Bytes> {
    let body = serde_json::json!({"error": {
        "message": "kt: the audit log is unavailable and this gateway is configured to refuse traffic until it recovers (policy.audit-logger.on_store_failure: refuse)",
        "type": "kt_gateway_error",
        "code": AUDIT_UNAVAILABLE
    }});
    http::Response::builder()
        .status(503)
        .header("content-type", "application/json")
        .extension(BlockCode(AUDIT_UNAVAILABLE))
        .body(Bytes::from(body.to_string()))
        .unwrap_or_else(|_| http::Response::new(Bytes::new()))
}
