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
//! Cost: every rule at the three alignments makes 140 spellings (the
//! built-in pack). Only their first `HEAD` (4) characters are searched for;
//! spellings that share them share one searched literal and are told apart
//! by comparison at a hit. That leaves 111 literals, which
//! aho-corasick's 16-bucket ("fat") Teddy still takes (its default limit is
//! 64; the hard one 128: see `literals`). That search runs only inside
//! base64 runs long enough to hold an encoded match of the rule (see
//! `long_runs`: two clean 8-byte words in a row for matches of 19 bytes or
//! more), so on prose and code, which have next to no such runs, the number
//! of rules costs almost nothing; rules with shorter matches (Slack's) are
//! searched for in all the text (`cargo xtask bench dlp`). A policy whose
//! `detect_patterns` bring more
//! distinct spellings than 128 keeps the group-start spellings only, and
//! `kt gateway check --verbose` says so.
//!
//! A rule whose literal is not its prefix (Azure's `JQQJ9` signature, 52
//! characters into the key) decodes from enough whole groups before the
//! hit to hold the start of the key.
//!
//! Not covered: URL-safe base64 (`-` and `_`), and a 3-byte prefix off a
//! group start, where its spelling would be shorter than `MIN_SPELLING`:
//! the bare `sk-` of a legacy OpenAI key and of the seed's pattern, Slack's
//! `xox`, Hugging Face's `hf_`, Replicate's `r8_` and Fireworks' `fw_`.
//! Every other rule is found at every alignment.

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

/// Characters of a spelling the literal pass searches for; the rest is
/// compared at a hit. Spellings sharing their first characters share one
/// searched literal, which keeps every rule at every alignment within the
/// packed searcher's 64 literals.
pub(crate) const HEAD: usize = 4;

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
    IS_B64[usize::from(c)]
}

/// `is_b64` as a table (the run search looks at bytes one by one).
static IS_B64: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        t[c] = b.is_ascii_alphanumeric() || b == b'+' || b == b'/';
        c += 1;
    }
    t
};

/// The shortest run the gate in [`long_runs`] looks for.
pub(crate) const MIN_RUN: usize = MIN_SPELLING;

/// Runs this long hold two whole aligned 8-byte words, which
/// [`long_runs`] asks of a candidate (far rarer in prose than one: a long
/// word, or two glued at a removed line break).
pub(crate) const LONG_RUN: usize = 23;

/// Calls `f(start, end)` for every maximal run of base64 characters of at
/// least `min` bytes in `data`, in order.
///
/// A run of 15 bytes or more holds a whole 8-byte word at an offset that is
/// a multiple of 8, with no byte below `+` (no space, no quote, no line
/// break) and none above 0x7f. Such words are found 8 bytes at a time with
/// two bit tricks; on prose nearly every word has a space, so only a few are
/// looked at byte by byte (see `runs_in`). For runs of `LONG_RUN` bytes or
/// more (two such words in a row) prose is passed 16 bytes a load.
pub(crate) fn long_runs(data: &[u8], min: usize, mut f: impl FnMut(usize, usize)) {
    const SHORTEST_GATED: usize = 15;
    if min < SHORTEST_GATED {
        runs_in(data, 0, data.len(), min, &mut f);
        return;
    }
    const HIGH: u64 = 0x8080_8080_8080_8080;
    const ONES: u64 = 0x0101_0101_0101_0101;
    let n = data.len();
    // Bytes before `done` were looked at already.
    let mut done = 0;
    let mut k = 0;
    let word_at = |k: usize| {
        let mut word = [0u8; 8];
        word.copy_from_slice(&data[k..k + 8]);
        u64::from_le_bytes(word)
    };
    // Any byte >= 0x80, or below b'+' (for bytes < 0x80: the classic
    // "has a byte less than" test).
    let rejected =
        |w: u64| w & HIGH != 0 || (w.wrapping_sub(ONES * u64::from(b'+')) & !w & HIGH) != 0;
    while k + 8 <= n {
        // A run of LONG_RUN bytes or more holds two whole words in a row
        // (k, k + 8). The second is looked at first: when it is not clean,
        // neither pair it belongs to is, and the search moves on 16 bytes
        // with one load (on prose, nearly always).
        if min >= LONG_RUN {
            if k + 16 > n {
                break;
            }
            if rejected(word_at(k + 8)) {
                k += 16;
                continue;
            }
            if rejected(word_at(k)) {
                k += 8;
                continue;
            }
        } else if rejected(word_at(k)) {
            k += 8;
            continue;
        }
        let mut lo = k;
        while lo > done && is_b64(data[lo - 1]) {
            lo -= 1;
        }
        let mut hi = k + 8;
        while hi < n && is_b64(data[hi]) {
            hi += 1;
        }
        runs_in(data, lo, hi, min, &mut f);
        done = hi;
        k = hi.div_ceil(8).max(k / 8 + 1) * 8;
    }
    // A run of 15 bytes or more ending in the last 7 holds a whole word
    // before them: nothing is left to look at.
}

/// The runs of at least `min` bytes inside `data[from..to]` (`from` must be
/// a run boundary: 0, or right after a byte that is not base64). Looks at
/// the byte `min - 1` ahead of where a run could start: when it is not
/// base64 no run of `min` bytes covers it and the search jumps past it.
fn runs_in(data: &[u8], from: usize, to: usize, min: usize, f: &mut impl FnMut(usize, usize)) {
    let min = min.max(1);
    // Invariant: `i` is `from`, or right after a byte that is not base64.
    let mut i = from;
    while i + min <= to {
        let probe = i + min - 1;
        // The last byte that is not base64 among the (up to) 8 ending at the
        // probe, found without a branch per byte.
        let lo = probe.saturating_sub(7).max(i);
        let mut bad = 0u32;
        for (k, &c) in data[lo..=probe].iter().enumerate() {
            bad |= u32::from(!is_b64(c)) << k;
        }
        if bad != 0 {
            i = lo + (31 - bad.leading_zeros()) as usize + 1;
            continue;
        }
        let mut j = lo;
        while j > i && is_b64(data[j - 1]) {
            j -= 1;
        }
        if j > i {
            i = j;
            continue;
        }
        let mut e = probe + 1;
        while e < to && is_b64(data[e]) {
            e += 1;
        }
        f(i, e);
        i = e + 1;
    }
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
    fn long_runs_finds_exactly_the_runs_of_at_least_min_bytes() {
        let mut texts: Vec<Vec<u8>> = vec![
            b"a short words here; c2stcHJvai0xMjM0NTY3ODkw= and AKIAABCDEFGHIJKLMNOP12 end"
                .to_vec(),
            b"c2stcHJvai0xMjM0NTY3ODkwabcdefgh".to_vec(),
            b"x".repeat(100),
        ];
        // Mixed runs of every length at every offset (a small LCG).
        let mut state = 7u64;
        for _ in 0..40 {
            let mut t = Vec::new();
            for _ in 0..30 {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1);
                let len = (state >> 40) as usize % 40;
                t.extend(std::iter::repeat_n(b'Q', len));
                t.push(if state & 1 == 0 { b' ' } else { b'-' });
            }
            texts.push(t);
        }
        for text in &texts {
            let text = &text[..];
            for min in 1..40 {
                let mut got = Vec::new();
                long_runs(text, min, |s, e| got.push((s, e)));
                // The plain way: split on every byte that is not base64.
                let mut want = Vec::new();
                let mut start = None;
                for (i, &c) in text.iter().chain(b" ").enumerate() {
                    match (is_b64(c), start) {
                        (true, None) => start = Some(i),
                        (false, Some(s)) => {
                            if i - s >= min {
                                want.push((s, i));
                            }
                            start = None;
                        }
                        _ => {}
                    }
                }
                assert_eq!(got, want, "min {min}");
            }
        }
    }

    #[test]
    fn a_shortest_long_run_is_found_at_every_offset_and_near_the_end() {
        // The gate skips 16 bytes when the second of two words is not
        // clean: a run of exactly LONG_RUN bytes must still be found
        // wherever it sits, also when it ends the text.
        for len in [LONG_RUN - 1, LONG_RUN, LONG_RUN + 1] {
            for at in 0..24 {
                for tail in [0, 1, 7, 8, 9, 30] {
                    let mut t = vec![b' '; at];
                    t.extend(std::iter::repeat_n(b'Q', len));
                    t.extend(std::iter::repeat_n(b' ', tail));
                    let mut got = Vec::new();
                    long_runs(&t, LONG_RUN, |s, e| got.push((s, e)));
                    let want = if len >= LONG_RUN {
                        vec![(at, at + len)]
                    } else {
                        vec![]
                    };
                    assert_eq!(got, want, "len {len} at {at} tail {tail}");
                }
            }
        }
    }

    #[test]
    fn runs_stop_at_non_base64_and_keep_padding() {
        let t = b"x: YWJj ZA== y";
        assert_eq!(run_around(t, 4, 100), (3, 7));
        assert_eq!(run_around(t, 9, 100), (8, 12));
    }
}
