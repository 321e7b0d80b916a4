//! Which host an event comes from, so the events of a fleet (each host's
//! sink lines, collected in one place) can be merged and told apart.
//!
//! - `name`: `KT_HOSTNAME` when set, else the kernel's host name.
//! - `id`: `KT_HOST_ID` when set, else a hash of `/etc/machine-id` (stable
//!   across reinstalls of kt, and not the machine id itself, which some
//!   software treats as confidential), else a random id generated once in
//!   `<data_dir>/host-id`.
//!
//! The two variables override the identity for tests and for hosts whose
//! name or machine id is not unique (cloned images): documented as such.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

/// A host's identity in events.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Host {
    /// Its name (`KT_HOSTNAME`, else the kernel's host name).
    pub name: String,
    /// A stable id (`KT_HOST_ID`, else derived from /etc/machine-id, else
    /// generated once in the data dir).
    pub id: String,
}

impl Host {
    /// This host, as events name it.
    pub fn local(data_dir: &Path) -> Host {
        let name = std::env::var("KT_HOSTNAME")
            .ok()
            .filter(|n| !n.trim().is_empty())
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|n| n.trim().to_string())
                    .filter(|n| !n.is_empty())
            })
            .unwrap_or_else(|| "unknown".to_string());
        let id = std::env::var("KT_HOST_ID")
            .ok()
            .filter(|n| !n.trim().is_empty())
            .or_else(machine_id)
            .or_else(|| data_dir_id(data_dir))
            .unwrap_or_else(|| "unknown".to_string());
        Host {
            name: bounded(&name),
            id: bounded(&id),
        }
    }
}

fn bounded(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(128).collect()
}

fn machine_id() -> Option<String> {
    let text = std::fs::read_to_string("/etc/machine-id").ok()?;
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    let digest = sha2::Sha256::digest(format!("kt host id\n{text}").as_bytes());
    Some(digest[..8].iter().map(|b| format!("{b:02x}")).collect())
}

fn data_dir_id(data_dir: &Path) -> Option<String> {
    let path = data_dir.join("host-id");
    if let Ok(t) = std::fs::read_to_string(&path)
        && !t.trim().is_empty()
    {
        return Some(t.trim().to_string());
    }
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).ok()?;
    let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    crate::datadir::create_private_dir(data_dir).ok()?;
    std::fs::write(&path, &id).ok()?;
    Some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_has_a_name_and_an_id_that_stays_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let a = Host::local(dir.path());
        let b = Host::local(dir.path());
        assert_eq!(a, b);
        assert!(!a.name.is_empty() && !a.id.is_empty());
        assert_ne!(a.id, "unknown");
    }
}
