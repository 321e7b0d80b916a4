//! Secrets wrapped in base64, anywhere in the encoded data: a Kubernetes
//! Secret pasted into a prompt (`data: {api-key: c2stcHJvai0…}`), a base64
//! `tls.key` PEM (`LS0tLS1CRUdJTi…`), a `.env` file encoded whole, a Docker
//! `config.json` or `Basic` credential (`base64(user:ghp_…)`).
//!
//! A rule's literal prefix, encoded, has a fixed spelling for each of the
//! three byte positions it can take in a 3-byte group: the characters that
//! depend on the prefix alone. The spellings are searched for in a literal
//! pass of their own (joining them to the rule prefixes' pass made that
//! pass slower than two passes). At a hit, a bounded window is decoded from
//! the hit's group start and the rule's regex runs over the decoded bytes,
//! anchored at the prefix.
//!
//! Cost: the three alignments make 54 literals, which aho-corasick searches
//! with its 16-bucket ("fat") Teddy; the no-match scan is 6-12% slower than
//! with the first alignment alone (`cargo xtask bench dlp`). Past 64
//! literals aho-corasick has no packed searcher and the scan gets about 3.5
//! times slower, so a policy with many more prefixed `detect_patterns`
//! keeps the group-start spellings only, and `kt gateway check --verbose`
//! says so.
//!
//! The built-in rules added with the provider catalog (Groq, xAI,
//! OpenRouter, Perplexity, Hugging Face, Anthropic OAuth) are searched for
//! at a group start only (`BuiltinRule::base64_every_alignment`): at every
//! alignment they would take the set past 64 literals. A key base64-encoded
//! alone, or after a prefix of 3, 6, ... bytes, is found; one after 1 or 2
//! bytes more is not.
//!
//! Not covered: URL-safe base64 (`-` and `_`), and a 3-byte prefix off a
//! group start, where its spelling would be shorter than `MIN_SPELLING`:
//! the bare `sk-` of a legacy OpenAI key and of the seed's pattern, and
//! Slack's `xox` (its `xoxb-` forms would add 15 literals). `sk-proj-`,
//! `sk-ant-api03-`, AWS, GitHub, Google, Stripe and PEM are found at every
//! alignment.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// Where a base64 spelling of a prefix sits: decoding from `group_back`
/// characters before the hit puts the prefix `byte_offset` bytes into the
/// decoded text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Spelling {
    /// Characters from the start of the 4-character group to the hit.
    pub group_back: usize,
    /// Decoded bytes from the group start to the prefix.
    pub byte_offset: usize,
}

/// Byte alignments of the prefix in its 3-byte group (see the module docs).
const ALIGNMENTS: std::ops::Range<usize> = 0..3;

/// Fewest characters a spelling may have (shorter ones would match
/// ordinary base64 data, such as images, far too often).
const MIN_SPELLING: usize = 4;

/// Decoded bytes looked at after the prefix: room for any key and a PEM
/// header line.
pub(crate) const WINDOW: usize = 1024;

/// The base64 spellings of `lit` at each alignment, with where each puts
/// the decoded prefix.
pub(crate) fn spellings(lit: &[u8]) -> Vec<(Vec<u8>, Spelling)> {
    let mut out = Vec::new();
    for a in ALIGNMENTS {
        let mut bytes = vec![0u8; a];
        bytes.extend_from_slice(lit);
        bytes.extend_from_slice(&[0, 0]);
        let enc = STANDARD.encode(&bytes);
        let enc = enc.as_bytes();
        // Character j holds bits [6j, 6j + 6): keep those inside the prefix.
        let first = (8 * a).div_ceil(6);
        let end = (8 * (a + lit.len())) / 6;
        if end >= first + MIN_SPELLING && end <= enc.len() {
            out.push((
                enc[first..end].to_vec(),
                Spelling {
                    group_back: first,
                    byte_offset: a,
                },
            ));
        }
    }
    out
}

/// Whether `c` is in the standard base64 alphabet (padding excluded).
pub(crate) fn is_b64(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'+' || c == b'/'
}

/// Decodes the window of `data` for a spelling hit at `p`: the bytes from
/// the hit's group start, at most `WINDOW` past the prefix, stopping where
/// the base64 run ends. `None` when the hit is not really in base64 text
/// (the group would start before the run or out of bounds, or nothing
/// decodes).
pub(crate) fn decode_at(data: &[u8], p: usize, s: Spelling) -> Option<(usize, Vec<u8>)> {
    let start = p.checked_sub(s.group_back)?;
    let group = data.get(start..p)?;
    if !group.iter().all(|&c| is_b64(c)) {
        return None;
    }
    let want = 4 * (s.byte_offset + WINDOW).div_ceil(3);
    let run = data[start..]
        .iter()
        .take(want)
        .take_while(|&&c| is_b64(c))
        .count();
    // A final group completed by padding decodes too (the last key bytes).
    let pad = (4 - run % 4) % 4;
    let padded = pad > 0
        && run < want
        && data
            .get(start + run..start + run + pad)
            .is_some_and(|p| p.iter().all(|&c| c == b'='));
    let len = if padded { run + pad } else { run - run % 4 };
    let chars = &data[start..start + len];
    let decoded = STANDARD.decode(chars).ok()?;
    Some((start, decoded))
}

/// The extent of the base64 run around `p` (padding included at the end),
/// looking at most `limit` bytes each way.
pub(crate) fn run_around(data: &[u8], p: usize, limit: usize) -> (usize, usize) {
    let lo = p.saturating_sub(limit);
    let start = data[lo..p]
        .iter()
        .rposition(|&c| !is_b64(c))
        .map_or(lo, |i| lo + i + 1);
    let hi = (p + limit).min(data.len());
    let mut end = data[p..hi]
        .iter()
        .position(|&c| !is_b64(c))
        .map_or(hi, |i| p + i);
    let pad = data[end..]
        .iter()
        .take(2)
        .take_while(|&&c| c == b'=')
        .count();
    end += pad;
    (start, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_alignment_spells_the_prefix_and_decodes_back() {
        let key = b"sk-proj-abcdefghijklmnopqrstuvwxyz0123456789";
        for a in ALIGNMENTS {
            let mut raw = b"xyz"[..a].to_vec();
            raw.extend_from_slice(key);
            let text = format!("data: {} end", STANDARD.encode(&raw));
            let hits: Vec<_> = spellings(b"sk-proj-")
                .into_iter()
                .filter_map(|(sp, s)| {
                    let p = text.find(std::str::from_utf8(&sp).ok()?)?;
                    Some((p, s))
                })
                .collect();
            assert!(!hits.is_empty(), "alignment {a}: no spelling in {text}");
            let (p, s) = hits[0];
            let (_, decoded) = decode_at(text.as_bytes(), p, s).unwrap();
            // The window ends at the last whole group of the run.
            assert!(
                decoded[s.byte_offset..].starts_with(&key[..key.len() - 2]),
                "alignment {a}: {:?}",
                String::from_utf8_lossy(&decoded)
            );
        }
    }

    #[test]
    fn runs_stop_at_non_base64_and_keep_padding() {
        let t = b"x: YWJj ZA== y";
        assert_eq!(run_around(t, 4, 100), (3, 7));
        assert_eq!(run_around(t, 9, 100), (8, 12));
    }
}
