//! Strict egress records as events: what the egress hooks saw (audit) or
//! refused (enforce), one guard event per destination and process.

use crate::capture::EgressSeen;
use crate::capture::egress::egress_location;
pub use crate::capture::egress::{EGRESS_AUDIT_RULE, EGRESS_REFUSED_RULE};
use crate::record::{Arrival, ClientInfo, PolicyAction, codes};

use super::Gateway;

impl Gateway {
    /// Records one destination the egress hooks saw; `name` is the host
    /// name kt resolved to that address, when it did.
    pub fn record_egress(&self, seen: &EgressSeen, client: ClientInfo, name: Option<&str>) {
        let (action, rule) = if seen.refused {
            (PolicyAction::Block, EGRESS_REFUSED_RULE)
        } else {
            (PolicyAction::Audit, EGRESS_AUDIT_RULE)
        };
        let proto = seen.proto();
        let mut rec = self.inner().guard_record(
            Arrival::Capture,
            None,
            client,
            &proto.to_ascii_uppercase(),
            action,
            rule,
        );
        if let Some(note) = rec.policy.first_mut() {
            note.location = Some(egress_location(seen, name));
        }
        rec.path = seen.dst.to_string();
        let shown = match name {
            Some(n) => format!("{} ({n})", seen.dst),
            None => seen.dst.to_string(),
        };
        rec.note = Some(if seen.refused {
            format!("egress: {proto} to {shown} refused (not in capture.egress.allow)")
        } else {
            format!("egress: {proto} to {shown} recorded (audit)")
        });
        if seen.refused {
            rec.error_code = Some(codes::CONNECTION_REFUSED);
        }
        self.inner().sink.record(rec);
    }
}
