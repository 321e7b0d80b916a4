//! A literal prefilter that reports every (literal, position) occurrence in
//! one left-to-right pass, on top of a leftmost-first aho-corasick searcher
//! (the fast, SIMD "packed" kind is only available for leftmost searches).
//!
//! Leftmost-first reports one literal per position. Literals that have a
//! shorter literal of the set as a prefix are therefore grouped under it: a
//! hit on the short one is checked against each longer one by comparison.
//! After that at most one searched literal can start at any position, and
//! restarting the search one byte after each hit enumerates them all,
//! overlapping occurrences included.

use aho_corasick::{AhoCorasick, Input, MatchKind};

/// One literal and what it stands for.
struct Entry<T> {
    lit: Vec<u8>,
    payload: T,
}

/// See the module docs.
pub(crate) struct LiteralSet<T> {
    ac: AhoCorasick,
    groups: Vec<Vec<Entry<T>>>,
    ascii_ci: bool,
}

impl<T> LiteralSet<T> {
    /// Builds the set; `None` when there are no literals.
    pub(crate) fn new(mut lits: Vec<(Vec<u8>, T)>, ascii_ci: bool) -> Option<LiteralSet<T>> {
        if lits.is_empty() {
            return None;
        }
        if ascii_ci {
            for (l, _) in &mut lits {
                l.make_ascii_lowercase();
            }
        }
        lits.sort_by_key(|(l, _)| l.len());
        let mut heads: Vec<Vec<u8>> = Vec::new();
        let mut groups: Vec<Vec<Entry<T>>> = Vec::new();
        for (lit, payload) in lits {
            let entry = Entry {
                lit: lit.clone(),
                payload,
            };
            match heads.iter().position(|h| lit.starts_with(h)) {
                Some(g) => groups[g].push(entry),
                None => {
                    heads.push(lit);
                    groups.push(vec![entry]);
                }
            }
        }
        let ac = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostFirst)
            .ascii_case_insensitive(ascii_ci)
            .build(&heads)
            .ok()?;
        Some(LiteralSet {
            ac,
            groups,
            ascii_ci,
        })
    }

    /// Calls `f(payload, position)` for every occurrence of every literal in
    /// `hay`, in order of position.
    pub(crate) fn for_each(&self, hay: &[u8], mut f: impl FnMut(&T, usize)) {
        let mut at = 0;
        while at < hay.len() {
            let Some(m) = self.ac.find(Input::new(hay).span(at..hay.len())) else {
                return;
            };
            let p = m.start();
            for e in &self.groups[m.pattern().as_usize()] {
                let rest = &hay[p..];
                let hit = rest.len() >= e.lit.len()
                    && if self.ascii_ci {
                        rest[..e.lit.len()].eq_ignore_ascii_case(&e.lit)
                    } else {
                        rest[..e.lit.len()] == e.lit[..]
                    };
                if hit {
                    f(&e.payload, p);
                }
            }
            at = p + 1;
        }
    }
}
