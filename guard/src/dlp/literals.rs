//! A literal prefilter that reports every (literal, position) occurrence in
//! one left-to-right pass, on top of a leftmost-first aho-corasick searcher
//! (the fast, SIMD "packed" kind is only available for leftmost searches).
//!
//! Leftmost-first reports one literal per position. Literals that have a
//! shorter literal of the set as a prefix are therefore grouped under it: a
//! hit on the short one is checked against each longer one by comparison.
//! After that at most one searched literal can start at any position, and
//! restarting the search one byte after each hit enumerates them all,
//! overlapping occurrences included. Heads shorter than 4 bytes are
//! searched for apart from the longer ones (see `SPLIT_HEAD`); the two
//! searches' hits are merged in order of position.

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

impl Engine {
    fn build(heads: &[Vec<u8>], max_head: usize) -> Option<Engine> {
        // Past 64 literals aho-corasick gives up on Teddy by default (the
        // verification gets slower); with 4-byte heads the buckets' false
        // hits stay rare enough on text that Teddy still beats the
        // automaton several times, up to its hard limit of 128.
        let packed = packed::Config::new()
            .match_kind(packed::MatchKind::LeftmostFirst)
            .heuristic_pattern_limits(heads.len() <= 64 || max_head > 4)
            .builder()
            .extend(heads)
            .build();
        Some(match packed {
            Some(p) => Engine::Packed(p),
            None => Engine::Automaton(
                AhoCorasick::builder()
                    .match_kind(MatchKind::LeftmostFirst)
                    .build(heads)
                    .ok()?,
            ),
        })
    }

    /// The first occurrence in `hay[at..end]`: (start, head index).
    fn find(&self, hay: &[u8], at: usize, end: usize) -> Option<(usize, usize)> {
        let m = match self {
            Engine::Packed(p) => p.find_in(hay, aho_corasick::Span::from(at..end)),
            Engine::Automaton(ac) => ac.find(Input::new(hay).span(at..end)),
        }?;
        Some((m.start(), m.pattern().as_usize()))
    }
}

/// One searcher and the literal groups of its heads.
struct Part<T> {
    engine: Engine,
    groups: Vec<Vec<Entry<T>>>,
}

/// Heads shorter than this are searched for apart from the longer ones.
/// Teddy compares as many leading bytes as the shortest head has (at most
/// 4): a few 3-byte heads among many longer ones make it compare 3 bytes
/// for all of them, and on prose its buckets then fire several times as
/// often. Two searches, one per length class, measured 4x faster than
/// one over the built-in pack's 27 heads on a megabyte of code and prose.
const SPLIT_HEAD: usize = 4;

/// See the module docs.
pub(crate) struct LiteralSet<T> {
    parts: Vec<Part<T>>,
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
            // so at most one head starts at any position (in all parts).
            match heads.iter().position(|h| lit.starts_with(h)) {
                Some(g) => groups[g].push(entry),
                None => {
                    heads.push(lit[..lit.len().min(max_head)].to_vec());
                    groups.push(vec![entry]);
                }
            }
        }
        let mut parts = Vec::new();
        for short in [true, false] {
            let (class_heads, class_groups): (Vec<_>, Vec<_>) = heads
                .iter()
                .zip(groups.iter_mut())
                .filter(|(h, _)| (h.len() < SPLIT_HEAD) == short)
                .map(|(h, g)| (h.clone(), std::mem::take(g)))
                .unzip();
            if class_heads.is_empty() {
                continue;
            }
            parts.push(Part {
                engine: Engine::build(&class_heads, max_head)?,
                groups: class_groups,
            });
        }
        Some(LiteralSet { parts })
    }

    /// Whether the fast SIMD searcher is used (up to 64 literals after
    /// grouping; beyond that the automaton is several times slower).
    pub(crate) fn is_packed(&self) -> bool {
        self.parts
            .iter()
            .all(|p| matches!(p.engine, Engine::Packed(_)))
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

    /// Occurrences inside `hay[start..end]` starting before `limit`, the
    /// parts' searches merged in order of position.
    fn search(
        &self,
        hay: &[u8],
        start: usize,
        end: usize,
        limit: usize,
        mut f: impl FnMut(&T, usize),
    ) {
        let end = end.min(hay.len());
        let limit = limit.min(end);
        if start >= limit {
            return;
        }
        // The next occurrence of each part (none: that part is done).
        let mut next: [Option<(usize, usize)>; 2] = [None, None];
        for (i, part) in self.parts.iter().enumerate() {
            next[i] = part.engine.find(hay, start, end).filter(|m| m.0 < limit);
        }
        loop {
            let i = match next {
                [Some(a), Some(b)] => usize::from(b.0 < a.0),
                [Some(_), None] => 0,
                [None, Some(_)] => 1,
                [None, None] => return,
            };
            let Some((p, head)) = next[i] else {
                return;
            };
            let part = &self.parts[i];
            let rest = &hay[p..];
            for e in &part.groups[head] {
                if rest.starts_with(&e.lit) {
                    f(&e.payload, p);
                }
            }
            next[i] = part.engine.find(hay, p + 1, end).filter(|m| m.0 < limit);
        }
    }
}

#[cfg(test)]
impl<T> LiteralSet<T> {
    /// How many heads the searcher looks for.
    pub(crate) fn heads(&self) -> usize {
        self.parts.iter().map(|p| p.groups.len()).sum()
    }
}
