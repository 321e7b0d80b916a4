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

use aho_corasick::{AhoCorasick, Input, MatchKind, packed};

/// One literal and what it stands for.
struct Entry<T> {
    lit: Vec<u8>,
    payload: T,
}

/// The searcher: aho-corasick's packed (SIMD Teddy) searcher when it can be
/// built (up to a few dozen literals on x86-64/aarch64), which is much faster
/// than letting aho-corasick pick a rare-byte prefilter on ordinary text;
/// otherwise a full aho-corasick automaton.
enum Engine {
    Packed(packed::Searcher),
    Automaton(AhoCorasick),
}

/// See the module docs.
pub(crate) struct LiteralSet<T> {
    engine: Engine,
    groups: Vec<Vec<Entry<T>>>,
}

impl<T> LiteralSet<T> {
    /// Builds the set; `None` when there are no literals.
    pub(crate) fn new(mut lits: Vec<(Vec<u8>, T)>) -> Option<LiteralSet<T>> {
        if lits.is_empty() {
            return None;
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
        let packed = packed::Config::new()
            .match_kind(packed::MatchKind::LeftmostFirst)
            .builder()
            .extend(&heads)
            .build();
        let engine = match packed {
            Some(p) => Engine::Packed(p),
            None => Engine::Automaton(
                AhoCorasick::builder()
                    .match_kind(MatchKind::LeftmostFirst)
                    .build(&heads)
                    .ok()?,
            ),
        };
        Some(LiteralSet { engine, groups })
    }

    /// Whether the fast SIMD searcher is used (up to 64 literals after
    /// grouping; beyond that the automaton is several times slower).
    pub(crate) fn is_packed(&self) -> bool {
        matches!(self.engine, Engine::Packed(_))
    }

    /// Calls `f(payload, position)` for every occurrence of every literal in
    /// `hay` that starts before `limit`, in order of position.
    pub(crate) fn for_each(&self, hay: &[u8], limit: usize, mut f: impl FnMut(&T, usize)) {
        let mut at = 0;
        while at < limit.min(hay.len()) {
            let m = match &self.engine {
                Engine::Packed(p) => p.find_in(hay, aho_corasick::Span::from(at..hay.len())),
                Engine::Automaton(ac) => ac.find(Input::new(hay).span(at..hay.len())),
            };
            let Some(m) = m else {
                return;
            };
            let p = m.start();
            if p >= limit {
                return;
            }
            for e in &self.groups[m.pattern().as_usize()] {
                let rest = &hay[p..];
                let hit = rest.starts_with(&e.lit);
                if hit {
                    f(&e.payload, p);
                }
            }
            at = p + 1;
        }
    }
}
