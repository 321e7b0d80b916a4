//! Turning addresses and CIDRs into LPM-trie keys.

use std::net::IpAddr;

use crate::config::IpPrefix;

/// A prefix that cannot be a trie key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("prefix length {len} is too long for {addr}")]
pub struct PrefixError {
    /// The address.
    pub addr: IpAddr,
    /// The length given.
    pub len: u8,
}

/// A host prefix (/32 or /128) for one address.
pub fn prefix_of(addr: IpAddr) -> IpPrefix {
    let len = match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    };
    IpPrefix { addr, len }
}

/// IPv4 and IPv6 trie entries: (address bytes, prefix length).
pub(crate) type TrieEntries = (Vec<([u8; 4], u32)>, Vec<([u8; 16], u32)>);

/// Splits prefixes into IPv4 and IPv6 trie entries (an IPv4-mapped IPv6
/// prefix becomes an IPv4 one: connect6 checks mapped addresses there).
pub(crate) fn split(prefixes: &[IpPrefix]) -> Result<TrieEntries, PrefixError> {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for p in prefixes {
        match p.addr {
            IpAddr::V4(a) if p.len <= 32 => v4.push((a.octets(), u32::from(p.len))),
            IpAddr::V6(a) if p.len <= 128 => match a.to_ipv4_mapped() {
                Some(m) if p.len >= 96 => v4.push((m.octets(), u32::from(p.len - 96))),
                _ => v6.push((a.octets(), u32::from(p.len))),
            },
            addr => return Err(PrefixError { addr, len: p.len }),
        }
    }
    Ok((v4, v6))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_families_and_unmaps_v4_mapped() {
        let prefixes = [
            IpPrefix {
                addr: "127.77.0.0".parse().unwrap(),
                len: 16,
            },
            IpPrefix {
                addr: "::1".parse().unwrap(),
                len: 128,
            },
            IpPrefix {
                addr: "::ffff:10.0.0.0".parse().unwrap(),
                len: 104,
            },
        ];
        let (v4, v6) = split(&prefixes).unwrap();
        assert_eq!(v4, vec![([127, 77, 0, 0], 16), ([10, 0, 0, 0], 8)]);
        assert_eq!(v6.len(), 1);
        let bad = [IpPrefix {
            addr: "1.2.3.4".parse().unwrap(),
            len: 33,
        }];
        assert!(split(&bad).is_err());
    }
}
