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
    pub(crate) fn new(lits: Vec<(Vec<u8>, T)>) -> Option<LiteralSet<T>> {
        LiteralSet::with_heads(lits, usize::MAX)
    }

    /// As [`LiteralSet::new`], searching only for the first `max_head`
    /// bytes of each literal (the rest is compared at a hit): literals that
    /// share those bytes share one searched head, so many long literals
    /// with common starts (base64 spellings) stay within the packed
    /// searcher's limit.
    pub(crate) fn with_heads(
        mut lits: Vec<(Vec<u8>, T)>,
        max_head: usize,
    ) -> Option<LiteralSet<T>> {
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
            // Sorted by length: no head is a proper prefix of a later one,
            // so at most one head starts at any position.
            match heads.iter().position(|h| lit.starts_with(h)) {
                Some(g) => groups[g].push(entry),
                None => {
                    heads.push(lit[..lit.len().min(max_head)].to_vec());
                    groups.push(vec![entry]);
                }
            }
        }
        // Past 64 literals aho-corasick gives up on Teddy by default (the
        // verification gets slower); with 4-byte heads the buckets' false
        // hits stay rare enough on text that Teddy still beats the
        // automaton several times, up to its hard limit of 128.
        let packed = packed::Config::new()
            .match_kind(packed::MatchKind::LeftmostFirst)
            .heuristic_pattern_limits(heads.len() <= 64 || max_head > 4)
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
    pub(crate) fn for_each(&self, hay: &[u8], limit: usize, f: impl FnMut(&T, usize)) {
        self.search(hay, 0, hay.len(), limit, f);
    }

    /// As [`LiteralSet::for_each`], for occurrences that lie inside
    /// `hay[start..end]` (a base64 run).
    pub(crate) fn for_each_in(
        &self,
        hay: &[u8],
        start: usize,
        end: usize,
        f: impl FnMut(&T, usize),
    ) {
        self.search(hay, start, end, end, f);
    }

    /// Occurrences inside `hay[start..end]` starting before `limit`.
    fn search(
        &self,
        hay: &[u8],
        start: usize,
        end: usize,
        limit: usize,
        mut f: impl FnMut(&T, usize),
    ) {
        let end = end.min(hay.len());
        let mut at = start;
        while at < limit.min(end) {
            let m = match &self.engine {
                Engine::Packed(p) => p.find_in(hay, aho_corasick::Span::from(at..end)),
                Engine::Automaton(ac) => ac.find(Input::new(hay).span(at..end)),
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

#[cfg(test)]
impl<T> LiteralSet<T> {
    /// How many heads the searcher looks for.
    pub(crate) fn heads(&self) -> usize {
        self.groups.len()
    }
}
