//! The policy chain as configured (`policies.chain`): `dlp-filter` scans
//! what a request carries and blocks, redacts or records; `audit-logger`
//! refuses traffic while events cannot be recorded (in the store, or by an
//! event sink with `on_failure: refuse`), when configured to.

use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;

use super::{Policy, PolicyRequest, PolicyVerdict, Refusal};
use crate::config::{Config, DlpAction, PolicyKind};
use crate::dlp::{Finding, Location, RequestView, Scanner};
use crate::record::{AuditHealth, PolicyAction, PolicyId, PolicyNote, SinkHealth, codes};

/// Errors compiling the chain.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The DLP filter did not compile.
    #[error("dlp-filter")]
    Dlp(#[source] crate::dlp::DlpError),
}

/// The compiled chain, run in config order.
pub struct Chain {
    steps: Vec<Step>,
}

enum Step {
    Dlp(Box<Scanner>),
    Audit {
        health: Option<Arc<dyn AuditHealth>>,
        refuse_when_unhealthy: bool,
        sinks: Option<Arc<dyn SinkHealth>>,
    },
}

impl Chain {
    /// Compiles the chain of `config`. `health` says whether the audit log
    /// is storing records; with `refuse_when_unhealthy` the audit-logger
    /// step refuses requests while it is not.
    pub fn new(
        config: &Config,
        health: Option<Arc<dyn AuditHealth>>,
        refuse_when_unhealthy: bool,
    ) -> Result<Chain, ChainError> {
        let mut steps = Vec::new();
        for p in &config.chain {
            match p {
                PolicyKind::DlpFilter => {
                    let cfg = config.dlp.clone().unwrap_or_default();
                    let scanner = Scanner::new(&cfg).map_err(ChainError::Dlp)?;
                    steps.push(Step::Dlp(Box::new(scanner)));
                }
                PolicyKind::AuditLogger => steps.push(Step::Audit {
                    health: health.clone(),
                    refuse_when_unhealthy,
                    sinks: None,
                }),
            }
        }
        Ok(Chain { steps })
    }

    /// The audit-logger also refuses requests while `sinks` names an event
    /// sink with `on_failure: refuse` that is down.
    pub fn with_sinks(mut self, sinks: Option<Arc<dyn SinkHealth>>) -> Chain {
        for step in &mut self.steps {
            if let Step::Audit { sinks: s, .. } = step {
                s.clone_from(&sinks);
            }
        }
        self
    }
}

impl Policy for Chain {
    fn check(&self, request: &PolicyRequest<'_>, notes: &mut Vec<PolicyNote>) -> PolicyVerdict {
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
                    health,
                    refuse_when_unhealthy,
                    sinks,
                } => {
                    if let Some(down) = sinks.as_ref().and_then(|s| s.refusing()) {
                        notes.push(PolicyNote {
                            policy: PolicyId::AuditLogger,
                            action: PolicyAction::Block,
                            rule: "event-sink-unavailable".into(),
                            location: Some(down.to_string()),
                        });
                        return PolicyVerdict::Block(Refusal {
                            status: StatusCode::SERVICE_UNAVAILABLE,
                            code: codes::AUDIT_UNAVAILABLE,
                            message: "kt: an event sink is unavailable and this gateway is configured to refuse traffic until it recovers (policy.audit-logger.sinks: on_failure: refuse)".into(),
                        });
                    }
                    let healthy = health.as_ref().is_none_or(|h| h.healthy());
                    if !healthy && *refuse_when_unhealthy {
                        notes.push(PolicyNote {
                            policy: PolicyId::AuditLogger,
                            action: PolicyAction::Block,
                            rule: "event-store-unavailable".into(),
                            location: None,
                        });
                        return PolicyVerdict::Block(Refusal {
                            status: StatusCode::SERVICE_UNAVAILABLE,
                            code: codes::AUDIT_UNAVAILABLE,
                            message: "kt: the audit log is unavailable and this gateway is configured to refuse traffic until it recovers (policy.audit-logger.on_store_failure: refuse)".into(),
                        });
                    }
                }
            }
        }
        match rewritten {
            Some(b) => PolicyVerdict::Rewrite(b),
            None => PolicyVerdict::Allow,
        }
    }

    fn working_bytes(&self, body_len: usize, content_encoding: Option<&str>) -> usize {
        // Steps run one after another and free their buffers, but a
        // rewritten body is kept for the next: summing covers both.
        self.steps
            .iter()
            .map(|s| match s {
                Step::Dlp(scanner) => scanner.working_bytes(body_len, content_encoding),
                Step::Audit { .. } => 0,
            })
            .fold(0, usize::saturating_add)
    }
}

/// Runs the DLP filter over what the request carries (the gateway already
/// removed credential headers and query keys).
fn dlp(
    scanner: &Scanner,
    request: &PolicyRequest<'_>,
    body: &Bytes,
    notes: &mut Vec<PolicyNote>,
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
        .map_or("/", |p| p.as_str());
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
            notes.push(PolicyNote {
                policy: PolicyId::DlpFilter,
                action: PolicyAction::Block,
                rule: "undecodable-body".into(),
                location: None,
            });
            return PolicyVerdict::Block(Refusal {
                status: StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::BAD_REQUEST),
                code: codes::UNDECODABLE_BODY,
                message: format!("kt: the request body could not be checked for secrets: {e}"),
            });
        }
    };
    if scan.findings.is_empty() {
        return PolicyVerdict::Allow;
    }
    let action = match scanner.action() {
        DlpAction::Block => PolicyAction::Block,
        DlpAction::Redact => PolicyAction::Redact,
        DlpAction::Audit => PolicyAction::Audit,
    };
    for f in &scan.findings {
        notes.push(PolicyNote {
            policy: PolicyId::DlpFilter,
            action,
            rule: f.rule_id.clone(),
            location: Some(where_(&f.location)),
        });
    }
    match action {
        // The observe-mode actions are set by the gateway afterwards.
        PolicyAction::Audit | PolicyAction::WouldBlock | PolicyAction::WouldRedact => {
            PolicyVerdict::Allow
        }
        PolicyAction::Block => PolicyVerdict::Block(blocked(&scan.findings)),
        PolicyAction::Redact => {
            // Only the body can be rewritten on the way out; a secret in the
            // URL or a header cannot be forwarded, so refuse those.
            if scan
                .findings
                .iter()
                .any(|f| !matches!(f.location, Location::Body { .. }))
            {
                return PolicyVerdict::Block(blocked(&scan.findings));
            }
            match scanner.redact(&view) {
                Ok(r) => match r.body {
                    Some(b) => PolicyVerdict::Rewrite(Bytes::from(b)),
                    None => PolicyVerdict::Allow,
                },
                Err(_) => PolicyVerdict::Block(blocked(&scan.findings)),
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

fn blocked(findings: &[Finding]) -> Refusal {
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
    Refusal {
        status: StatusCode::FORBIDDEN,
        code: codes::DLP_BLOCKED,
        message,
    }
}
