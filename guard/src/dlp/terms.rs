//! `blocked_terms`: approximate substring matching over normalised text.
//!
//! Normalisation: lower case (Unicode), and every run of characters that are
//! not letters or digits (whitespace, punctuation, symbols) becomes one space.
//! A term matches where some substring of the normalised text is within
//! `max_distance` character edits (insert, delete, substitute) of the
//! normalised term; `fuzzy_matching: false` means distance 0.
//!
//! Speed: by the pigeonhole principle, if a term is cut into `k + 2`
//! disjoint space-free pieces (its words, longer words halved when more are
//! needed), any match with at most `k` edits keeps at least two pieces
//! unchanged, and so at least one of the `k + 1` longest. Pieces are letters
//! and digits only, so they appear in the raw text exactly as in the
//! normalised text (ASCII case aside). The `k + 1` longest pieces are
//! searched for in their own pass: each is represented by its rarest
//! three-letter stretch (its anchor), and the anchors are searched for with
//! one packed SIMD literal search over a lower-cased copy of the text, made
//! a small cache-resident chunk at a time (searching the raw text for every
//! case spelling instead is several times slower); an anchor hit is
//! confirmed by comparing the whole piece, ASCII case ignored. At each
//! confirmed piece, a window just wide enough for a match is taken (sized by
//! a count over the raw bytes that never exceeds the normalised characters
//! there), a second piece must appear in it, then Myers' bit-parallel
//! algorithm (masks built once per term) finds the best match end in the
//! normalised window and a second, reversed pass finds where it starts.
//! ASCII windows (nearly all) are normalised inside the first pass, byte by
//! byte; others are normalised to `char`s first.
//!
//! Cost: on text with no piece of any term the pass costs about 0.1 ns per
//! byte; each confirmed piece costs roughly 100 ns more (the search restart,
//! the window, the second-piece test), so text dense in a term's words
//! ("production", "billing", …) is where the time goes (`cargo xtask bench
//! dlp`, `nearmiss` rows). Terms that cannot be cut into `k + 2` pieces of at least 3
//! characters use `k + 1` pieces and no second-piece test; terms that cannot
//! be cut at all (non-ASCII, or too short) are run with Myers' algorithm over
//! the whole normalised text.

use super::DlpError;
use super::literals::LiteralSet;
use super::scratch;

/// A compiled term.
struct Term {
    /// Rule id: `blocked-term:<normalised term>`.
    id: String,
    norm: Vec<char>,
    /// Edits allowed: `max_distance` (0 unless fuzzy), at most `(len - 1) / 2`.
    k: usize,
    /// How many of its pieces must appear in a candidate window before the
    /// window is checked: 2 when it could be cut into `k + 2` pieces (then
    /// at least two survive any `k` edits), else 1.
    needed: usize,
    /// Its pieces' text (lower case), longest first.
    pieces: Vec<Vec<u8>>,
    /// How many of `pieces`, from the first, are searched for (the rest are
    /// only looked for inside a candidate's window).
    searched: usize,
    /// Myers' match masks of `norm`, when it has at most 64 characters.
    peq: Option<Peq>,
    /// The same for `norm` reversed (finds where a match starts).
    rpeq: Option<Peq>,
}

/// A piece of a term: which term, where the piece starts in it, how long.
struct Piece {
    term: usize,
    idx: usize,
    offset: usize,
    len: usize,
    /// The piece's text (lower case).
    lit: Vec<u8>,
}

/// What an anchor literal stands for: searched piece `piece`, whose anchor
/// starts `off` bytes into it.
struct Anchor {
    piece: usize,
    off: usize,
}

/// What a literal of the case-folded pass stands for.
enum Folded {
    /// A blocked term's anchor.
    Anchor(Anchor),
    /// A case-insensitive word that starts a pattern rule's match (the
    /// context word of a context rule): its rule, as the caller numbers it.
    Word(usize),
}

/// Scratch state of one buffer's scan (see [`Terms::on_hit`]).
#[derive(Default)]
struct TermState {
    /// Per term: the last window checked, to skip a second piece of the same occurrence.
    last: Vec<(usize, usize)>,
    /// Confirmed pieces: (position, index into `Terms::searched`).
    cands: Vec<(usize, usize)>,
    /// The normalised window being checked, and each character's byte range.
    chars: Vec<char>,
    spans: Vec<(usize, usize)>,
    /// The same for ASCII windows: normalised bytes and where each starts.
    norm: Vec<u8>,
    starts: Vec<usize>,
}

impl TermState {
    /// Frees what an unusually large scan left behind (candidates are a few
    /// words per kilobyte of text; windows are term-sized).
    fn trim(&mut self) {
        const KEEP: usize = 64 * 1024;
        for cap in [
            self.cands.capacity(),
            self.spans.capacity(),
            self.starts.capacity(),
        ] {
            if cap > KEEP {
                *self = TermState::default();
                return;
            }
        }
    }
}

thread_local! {
    static STATE: std::cell::RefCell<TermState> = std::cell::RefCell::new(TermState::default());
}

/// A case-insensitive word found in a buffer (see [`Terms::new`]).
pub(crate) struct WordHit {
    /// The rule the word was given with.
    pub rule: usize,
    /// Where it starts in the buffer.
    pub at: usize,
}

/// A term found in a buffer: byte range in that buffer.
pub(crate) struct TermHit {
    pub term: usize,
    pub start: usize,
    pub end: usize,
}

/// All blocked terms of a policy.
pub(crate) struct Terms {
    terms: Vec<Term>,
    /// The pieces searched for.
    searched: Vec<Piece>,
    /// Every searched piece's anchor and every case-insensitive word, lower case.
    anchors: Option<LiteralSet<Folded>>,
    /// Bytes a lower-cased chunk reaches past its end, so a literal that
    /// starts in one chunk and ends in the next is found (longest literal - 1).
    overlap: usize,
    full_scan: Vec<usize>,
}

/// Shortest piece worth prefiltering on.
const MIN_PIECE: usize = 3;

/// Bytes lower-cased and searched at a time (stays in a core's L1 cache).
const FOLD_CHUNK: usize = 16 * 1024;

/// Length of a piece's anchor (see the module docs): at most `MIN_PIECE`.
const ANCHOR: usize = 3;

/// ASCII letters from most to least frequent in English prose and code.
const BY_FREQUENCY: &[u8] = b"etaoinsrhldcumfpgwybvkxjqz";

/// Where the rarest `ANCHOR`-byte stretch of `lit` (lower case, at least
/// `ANCHOR` bytes) starts, judged by letter frequency (digits count as rare).
fn anchor(lit: &[u8]) -> usize {
    let rarity = |c: &u8| {
        BY_FREQUENCY
            .iter()
            .position(|f| f == c)
            .unwrap_or(BY_FREQUENCY.len())
    };
    (0..=lit.len().saturating_sub(ANCHOR))
        .max_by_key(|&i| {
            let s: usize = lit[i..i + ANCHOR].iter().map(rarity).sum();
            // Ties go to the earliest stretch.
            (s, std::cmp::Reverse(i))
        })
        .unwrap_or(0)
}

impl Terms {
    /// Compiles `terms`; `words` (lower case, each with its pattern rule)
    /// are searched for in the same case-folded pass and reported by
    /// [`Terms::scan`] as [`WordHit`]s.
    pub(crate) fn new(
        terms: &[String],
        fuzzy: bool,
        max_distance: u8,
        words: Vec<(Vec<u8>, usize)>,
    ) -> Result<Terms, DlpError> {
        let k = if fuzzy { usize::from(max_distance) } else { 0 };
        let mut compiled = Vec::new();
        let mut lits = Vec::new();
        let mut full_scan = Vec::new();
        let mut searched_pieces = Vec::new();
        for (index, raw) in terms.iter().enumerate() {
            let norm = normalise_str(raw);
            if norm.is_empty() {
                return Err(DlpError::EmptyTerm { index });
            }
            let term = compiled.len();
            // At least half of a term must match: `max_distance` 3 on a
            // 4-letter term would otherwise match nearly any text.
            let k = k.min((norm.len() - 1) / 2);
            let (needed, pieces) = match cut(&norm, k + 1) {
                Some(c) => (2, c),
                None => (1, cut(&norm, k).unwrap_or_default()),
            };
            if pieces.is_empty() {
                full_scan.push(term);
            }
            // With k + 2 pieces, at least one of the k + 1 longest survives
            // any k edits: only those go to the prefilter, so the shortest
            // (often a common word such as "key") costs nothing until then.
            let searched = if needed == 2 {
                pieces.len() - 1
            } else {
                pieces.len()
            };
            for (idx, &(offset, len)) in pieces.iter().enumerate().take(searched) {
                let lit: String = norm[offset..offset + len].iter().collect();
                let lit = lit.into_bytes();
                let off = anchor(&lit);
                lits.push((
                    lit[off..off + ANCHOR].to_vec(),
                    Folded::Anchor(Anchor {
                        piece: searched_pieces.len(),
                        off,
                    }),
                ));
                searched_pieces.push(Piece {
                    term,
                    idx,
                    offset,
                    len,
                    lit,
                });
            }
            let piece_bytes = pieces
                .iter()
                .map(|&(o, l)| norm[o..o + l].iter().collect::<String>().into_bytes())
                .collect();
            compiled.push(Term {
                id: format!("blocked-term:{}", norm.iter().collect::<String>()),
                peq: Peq::new(&norm),
                rpeq: Peq::new(&norm.iter().rev().copied().collect::<Vec<_>>()),
                norm,
                k,
                needed,
                pieces: piece_bytes,
                searched,
            });
        }
        lits.extend(words.into_iter().map(|(w, r)| (w, Folded::Word(r))));
        let overlap = lits.iter().map(|(l, _)| l.len()).max().unwrap_or(1) - 1;
        Ok(Terms {
            terms: compiled,
            searched: searched_pieces,
            anchors: LiteralSet::new(lits),
            overlap,
            full_scan,
        })
    }

    /// The rule id of term `i`.
    pub(crate) fn id(&self, i: usize) -> &str {
        &self.terms[i].id
    }

    /// Whether there is nothing to search for.
    pub(crate) fn is_empty(&self) -> bool {
        self.terms.is_empty() && self.anchors.is_none()
    }

    /// Finds every term in `buf`. `bounds` (sorted) are offsets where the
    /// buffer joins two separate texts; each counts as a separator.
    /// Also reports, in `words`, where a case-insensitive word starts.
    pub(crate) fn scan(
        &self,
        buf: &[u8],
        bounds: &[usize],
        out: &mut Vec<TermHit>,
        words: &mut Vec<WordHit>,
    ) {
        // The scratch state is kept per thread: growing fresh vectors on
        // every request's first candidate was a fifth of a match's cost.
        STATE.with(|st| match st.try_borrow_mut() {
            Ok(mut st) => {
                self.scan_with(buf, bounds, &mut st, out, words);
                st.trim();
            }
            Err(_) => self.scan_with(buf, bounds, &mut TermState::default(), out, words),
        });
    }

    fn scan_with(
        &self,
        buf: &[u8],
        bounds: &[usize],
        state: &mut TermState,
        out: &mut Vec<TermHit>,
        words: &mut Vec<WordHit>,
    ) {
        if let Some(anchors) = &self.anchors {
            state.last.clear();
            let mut cands = std::mem::take(&mut state.cands);
            let mut lower = scratch::take(&scratch::BYTES);
            cands.clear();
            // Lower-case a small, cache-resident chunk at a time (the overlap
            // lets an anchor that starts in one chunk end in the next).
            let mut start = 0;
            while start < buf.len() {
                let end = (start + FOLD_CHUNK).min(buf.len());
                lower.clear();
                lower.extend(
                    buf[start..(end + self.overlap).min(buf.len())]
                        .iter()
                        .map(u8::to_ascii_lowercase),
                );
                anchors.for_each(&lower, end - start, |f, p| match f {
                    Folded::Anchor(a) => {
                        let piece = &self.searched[a.piece];
                        if let Some(q) = (start + p).checked_sub(a.off)
                            && buf
                                .get(q..q + piece.len)
                                .is_some_and(|t| t.eq_ignore_ascii_case(&piece.lit))
                        {
                            cands.push((q, a.piece));
                        }
                    }
                    Folded::Word(rule) => words.push(WordHit {
                        rule: *rule,
                        at: start + p,
                    }),
                });
                start = end;
            }
            scratch::give(&scratch::BYTES, lower);
            // Anchors sit at different offsets in their pieces: check the
            // pieces in the order they start.
            cands.sort_unstable();
            for at in 0..cands.len() {
                self.on_hit(buf, bounds, &cands, at, state, out);
            }
            state.cands = cands;
        }
        self.scan_full(buf, bounds, out);
    }

    /// Checks candidate `at` of `cands` (every searched piece found in
    /// `buf`, ASCII case ignored, sorted by position). `bounds` (sorted) are
    /// offsets where the buffer joins two separate texts; each counts as a
    /// separator.
    fn on_hit(
        &self,
        buf: &[u8],
        bounds: &[usize],
        cands: &[(usize, usize)],
        at: usize,
        state: &mut TermState,
        out: &mut Vec<TermHit>,
    ) {
        let (q, piece) = (cands[at].0, &self.searched[cands[at].1]);
        let last = &mut state.last;
        // Sized on the first candidate of a buffer only.
        if last.is_empty() {
            last.resize(self.terms.len(), (usize::MAX, 0));
        }
        let term = &self.terms[piece.term];
        let before = piece.offset + term.k + 1;
        let after = term.norm.len() - piece.offset - piece.len + term.k + 1;
        let a = expand_back(buf, q, before);
        let b = expand_forward(buf, q + piece.len, after);
        // Last window checked for this term: skip a second piece of the same occurrence.
        let (la, lb) = last[piece.term];
        if la <= a && b <= lb {
            return;
        }
        last[piece.term] = (a, b);
        if term.needed == 2 {
            // A match would hold a second intact piece inside this window:
            // a searched one is a neighbouring candidate (they are sorted by
            // position); only the others need looking for in the text.
            let inside = |&(p, i): &(usize, usize)| {
                let other = &self.searched[i];
                other.term == piece.term && other.idx != piece.idx && p + other.len <= b
            };
            let another = cands[..at]
                .iter()
                .rev()
                .take_while(|c| c.0 >= a)
                .any(inside)
                || cands[at + 1..].iter().take_while(|c| c.0 < b).any(inside)
                || term.pieces[term.searched..]
                    .iter()
                    .any(|p| contains_ignore_case(&buf[a..b], p));
            if !another {
                return;
            }
        }
        let found = match (&term.peq, &term.rpeq) {
            (Some(peq), Some(rpeq)) if buf[a..b].is_ascii() => {
                ascii_match(buf, bounds, a..b, peq, rpeq, term.k, state)
            }
            _ => {
                let (chars, spans) = (&mut state.chars, &mut state.spans);
                normalise_window(buf, bounds, a, b, chars, spans);
                let found = match (&term.peq, &term.rpeq) {
                    (Some(peq), Some(rpeq)) => peq.best(chars, term.k).and_then(|(e, d)| {
                        let back = rpeq.anchored_within(chars[..=e].iter().copied().rev(), d)?;
                        Some((e - back, e + 1))
                    }),
                    _ => best_match(&term.norm, chars, term.k).map(|(s, e, _)| (s, e)),
                };
                found
                    .filter(|(s, e)| s < e)
                    .map(|(s, e)| (spans[s].0, spans[e - 1].1))
            }
        };
        if let Some((start, end)) = found {
            out.push(TermHit {
                term: piece.term,
                start,
                end,
            });
        }
    }

    /// Runs the terms that have no pieces over the whole of `buf`.
    fn scan_full(&self, buf: &[u8], bounds: &[usize], out: &mut Vec<TermHit>) {
        if self.full_scan.is_empty() {
            return;
        }
        let (mut chars, mut spans) = (Vec::new(), Vec::new());
        normalise_window(buf, bounds, 0, buf.len(), &mut chars, &mut spans);
        for &t in &self.full_scan {
            let p = &self.terms[t].norm;
            let k = self.terms[t].k;
            let mut next_free = 0;
            let mut check = |end: usize| {
                if end < next_free {
                    return;
                }
                let lo = (end + 1).saturating_sub(p.len() + k);
                let hi = (end + 1 + k).min(chars.len());
                if let Some((s, e, _)) = best_match(p, &chars[lo..hi], k)
                    && s < e
                {
                    out.push(TermHit {
                        term: t,
                        start: spans[lo + s].0,
                        end: spans[lo + e - 1].1,
                    });
                    next_free = lo + e;
                }
            };
            if let Some(peq) = &self.terms[t].peq {
                peq.ends(&chars, k, |j, _| check(j));
            } else if let Some((_, e, _)) = best_match(p, &chars, k)
                && e > 0
            {
                check(e - 1);
            }
        }
    }
}

/// Normalises a term (see the module docs).
pub(crate) fn normalise_str(s: &str) -> Vec<char> {
    let mut out = Vec::new();
    let mut sep = false;
    for c in s.chars() {
        if c.is_alphanumeric() {
            if sep && !out.is_empty() {
                out.push(' ');
            }
            sep = false;
            out.extend(c.to_lowercase());
        } else {
            sep = true;
        }
    }
    out
}

/// Cuts a normalised term into `k + 1` disjoint space-free pieces of at
/// least `MIN_PIECE` ASCII characters: `(offset, len)` pairs.
fn cut(norm: &[char], k: usize) -> Option<Vec<(usize, usize)>> {
    if !norm.iter().all(char::is_ascii) {
        return None;
    }
    let mut pieces: Vec<(usize, usize)> = Vec::new();
    let mut start = 0;
    for (i, c) in norm
        .iter()
        .enumerate()
        .chain(std::iter::once((norm.len(), &' ')))
    {
        if *c == ' ' {
            if i > start {
                pieces.push((start, i - start));
            }
            start = i + 1;
        }
    }
    while pieces.len() < k + 1 {
        let (idx, &(off, len)) = pieces.iter().enumerate().max_by_key(|(_, p)| p.1)?;
        if len < 2 * MIN_PIECE {
            return None;
        }
        pieces[idx] = (off, len / 2);
        pieces.push((off + len / 2, len - len / 2));
    }
    pieces.sort_by_key(|p| std::cmp::Reverse(p.1));
    pieces.truncate(k + 1);
    pieces.iter().all(|p| p.1 >= MIN_PIECE).then_some(pieces)
}

/// 1 for ASCII letters and digits, 0 for every other byte. Counting over
/// raw bytes treats every non-ASCII character as a separator, whatever it
/// is: then a count never exceeds the normalised characters really there (a
/// letter would add one or more, a symbol next to a space none), so windows
/// always come out wide enough.
static WORD: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = (i as u8).is_ascii_alphanumeric() as u8;
        i += 1;
    }
    t
};

/// Whether `c` is a UTF-8 continuation byte (never a window edge).
fn continuation(c: u8) -> bool {
    c & 0xC0 == 0x80
}

/// Moves back from `q` (a piece start) over at least `need` normalised
/// characters: a letter or digit counts one, a run of separators one (at
/// its last byte: a byte counts when it or the byte after it is a letter or
/// digit, which keeps the loop free of branches). Joins between texts are
/// not counted: they only add separators, so the window can only come out
/// larger than needed, never smaller.
fn expand_back(buf: &[u8], q: usize, need: usize) -> usize {
    let mut pos = q.min(buf.len());
    let mut units = 0;
    let mut after = buf.get(pos).copied().unwrap_or(b' ');
    while pos > 0 && units < need {
        pos -= 1;
        let b = buf[pos];
        units += usize::from(WORD[usize::from(b)] | WORD[usize::from(after)]);
        after = b;
    }
    while pos > 0 && continuation(buf[pos]) {
        pos -= 1;
    }
    pos
}

/// Moves forward from `q` (a piece end) over at least `need` normalised
/// characters (see `expand_back`; here a separator run counts at its first
/// byte).
fn expand_forward(buf: &[u8], q: usize, need: usize) -> usize {
    let mut pos = q;
    let mut units = 0;
    let mut before = if q > 0 { buf[q - 1] } else { b' ' };
    while pos < buf.len() && units < need {
        let b = buf[pos];
        units += usize::from(WORD[usize::from(b)] | WORD[usize::from(before)]);
        before = b;
        pos += 1;
    }
    while pos < buf.len() && continuation(buf[pos]) {
        pos += 1;
    }
    pos
}

/// Whether `hay` contains `needle` (lower case), ASCII case ignored.
fn contains_ignore_case(hay: &[u8], needle: &[u8]) -> bool {
    let Some(&first) = needle.first() else {
        return true;
    };
    if hay.len() < needle.len() {
        return false;
    }
    let starts = &hay[..=hay.len() - needle.len()];
    memchr::memchr2_iter(first, first.to_ascii_uppercase(), starts)
        .any(|i| hay[i..i + needle.len()].eq_ignore_ascii_case(needle))
}

/// The match of a term in the ASCII `window` of `buf`, as a byte range:
/// the window is normalised and fed to Myers' algorithm in the same loop,
/// without building the `char` text and spans (which cost more than the
/// match itself). Same result as [`normalise_window`] and [`Peq::best`].
fn ascii_match(
    buf: &[u8],
    bounds: &[usize],
    window: std::ops::Range<usize>,
    peq: &Peq,
    rpeq: &Peq,
    k: usize,
    state: &mut TermState,
) -> Option<(usize, usize)> {
    let (a, b) = (window.start, window.end);
    let (norm, starts) = (&mut state.norm, &mut state.starts);
    norm.clear();
    starts.clear();
    let mut bi = bounds.partition_point(|&x| x <= a);
    let mut sep_start: Option<usize> = None;
    let mut col = Column::new(peq.m, false);
    let mut best: Option<(usize, usize)> = None;
    let mut step = |c: u8, at: usize, norm: &mut Vec<u8>, starts: &mut Vec<usize>| {
        let d = col.step(peq.ascii[usize::from(c)]);
        if d <= k && best.is_none_or(|(_, bd)| d < bd) {
            best = Some((norm.len(), d));
        }
        norm.push(c);
        starts.push(at);
    };
    for (at, &c) in buf.iter().enumerate().take(b).skip(a) {
        while bi < bounds.len() && bounds[bi] <= at {
            sep_start.get_or_insert(at);
            bi += 1;
        }
        if WORD[usize::from(c)] == 0 {
            sep_start.get_or_insert(at);
            continue;
        }
        if let Some(s) = sep_start.take()
            && !norm.is_empty()
        {
            step(b' ', s, norm, starts);
        }
        step(c.to_ascii_lowercase(), at, norm, starts);
    }
    let (e, d) = best?;
    let back = rpeq.anchored_within(norm[..=e].iter().map(|&c| char::from(c)).rev(), d)?;
    // A separator is only ever emitted before a letter or digit, so the
    // character after one exists and its start ends the separator run.
    let end = if norm[e] == b' ' {
        starts[e + 1]
    } else {
        starts[e] + 1
    };
    Some((starts[e - back], end))
}

/// Normalises `buf[a..b]` into `chars` and, for each character, its byte
/// range in `buf` into `spans` (a separator spans its whole run). Invalid
/// UTF-8 counts as separator.
fn normalise_window(
    buf: &[u8],
    bounds: &[usize],
    a: usize,
    b: usize,
    chars: &mut Vec<char>,
    spans: &mut Vec<(usize, usize)>,
) {
    chars.clear();
    spans.clear();
    // At most one character per byte (lower-casing that expands is rare).
    chars.reserve(b - a);
    spans.reserve(b - a);
    let mut bi = bounds.partition_point(|&x| x <= a);
    let mut sep_start: Option<usize> = None;
    // One character `c` of `len` bytes at `at`; invalid UTF-8 comes in as
    // U+FFFD, a separator.
    let mut push = |at: usize, c: char, len: usize| {
        while bi < bounds.len() && bounds[bi] <= at {
            sep_start.get_or_insert(at);
            bi += 1;
        }
        if !c.is_alphanumeric() {
            sep_start.get_or_insert(at);
            return;
        }
        if let Some(s) = sep_start.take()
            && !chars.is_empty()
        {
            chars.push(' ');
            spans.push((s, at));
        }
        if c.is_ascii() {
            chars.push(c.to_ascii_lowercase());
            spans.push((at, at + 1));
        } else {
            for lc in c.to_lowercase() {
                chars.push(lc);
                spans.push((at, at + len));
            }
        }
    };
    let window = &buf[a..b];
    if window.is_ascii() {
        // The usual window: no UTF-8 decoding (half the cost of this step).
        for (i, &c) in window.iter().enumerate() {
            push(a + i, char::from(c), 1);
        }
        return;
    }
    let mut pos = a;
    for chunk in window.utf8_chunks() {
        for (i, c) in chunk.valid().char_indices() {
            push(pos + i, c, c.len_utf8());
        }
        let invalid_at = pos + chunk.valid().len();
        if !chunk.invalid().is_empty() {
            push(
                invalid_at,
                char::REPLACEMENT_CHARACTER,
                chunk.invalid().len(),
            );
        }
        pos = invalid_at + chunk.invalid().len();
    }
}

/// Sellers' dynamic programme for approximate substring matching, tracking
/// where each alignment starts: the best `(start, end, distance)` with
/// distance at most `k` (lowest distance, then earliest end), in character
/// indices of `t`.
fn best_match(p: &[char], t: &[char], k: usize) -> Option<(usize, usize, usize)> {
    let m = p.len();
    let mut cost: Vec<usize> = (0..=m).collect();
    let mut start: Vec<usize> = vec![0; m + 1];
    let mut best: Option<(usize, usize, usize)> = None;
    for (j, &tc) in t.iter().enumerate() {
        let (mut diag_cost, mut diag_start) = (cost[0], start[0]);
        cost[0] = 0;
        start[0] = j + 1;
        for i in 1..=m {
            let (up_cost, up_start) = (cost[i], start[i]);
            let mut c = diag_cost + usize::from(p[i - 1] != tc);
            let mut s = diag_start;
            if up_cost + 1 < c {
                c = up_cost + 1;
                s = up_start;
            }
            if cost[i - 1] + 1 < c {
                c = cost[i - 1] + 1;
                s = start[i - 1];
            }
            diag_cost = up_cost;
            diag_start = up_start;
            cost[i] = c;
            start[i] = s;
        }
        if cost[m] <= k && best.is_none_or(|(_, _, d)| cost[m] < d) {
            best = Some((start[m], j + 1, cost[m]));
        }
    }
    best
}

/// Myers' bit-parallel approximate matching for a pattern of at most 64
/// characters: its per-character match masks, built once per term.
struct Peq {
    m: usize,
    ascii: [u64; 128],
    other: Vec<(char, u64)>,
}

impl Peq {
    /// The masks of `p`; `None` when it is empty or longer than 64.
    fn new(p: &[char]) -> Option<Peq> {
        let m = p.len();
        if m == 0 || m > 64 {
            return None;
        }
        let mut ascii = [0u64; 128];
        let mut other: Vec<(char, u64)> = Vec::new();
        for (i, &c) in p.iter().enumerate() {
            if c.is_ascii() {
                ascii[c as usize] |= 1 << i;
            } else if let Some(e) = other.iter_mut().find(|(oc, _)| *oc == c) {
                e.1 |= 1 << i;
            } else {
                other.push((c, 1 << i));
            }
        }
        Some(Peq { m, ascii, other })
    }

    /// Calls `on_end(j, d)` for every index `j` of `t` where a match with
    /// `d <= k` edits (the fewest for that end) ends.
    fn ends(&self, t: &[char], k: usize, mut on_end: impl FnMut(usize, usize)) {
        // Text may start anywhere (substring search): no carry into row 0.
        let mut col = Column::new(self.m, false);
        for (j, &c) in t.iter().enumerate() {
            let score = col.step(self.mask(c));
            if score <= k {
                on_end(j, score);
            }
        }
    }

    /// The best end of a match in `t`: `(index, distance)` with the lowest
    /// distance up to `k`, the earliest among those.
    fn best(&self, t: &[char], k: usize) -> Option<(usize, usize)> {
        let mut best: Option<(usize, usize)> = None;
        self.ends(t, k, |j, d| {
            if best.is_none_or(|(_, bd)| d < bd) {
                best = Some((j, d));
            }
        });
        best
    }

    /// The first index `i` of `t` where the whole pattern is within `d`
    /// edits of `t[..=i]` (the text start is fixed, unlike [`Peq::ends`]).
    /// Over a reversed text this finds where a match ending at a known
    /// place starts, keeping the match as short as the distance allows.
    fn anchored_within(&self, t: impl Iterator<Item = char>, d: usize) -> Option<usize> {
        // The text start is fixed: row 0 grows by one per character.
        let mut col = Column::new(self.m, true);
        t.enumerate()
            .find_map(|(j, c)| (col.step(self.mask(c)) <= d).then_some(j))
    }

    /// The match mask of character `c`.
    fn mask(&self, c: char) -> u64 {
        if c.is_ascii() {
            self.ascii[c as usize]
        } else {
            self.other
                .iter()
                .find(|(oc, _)| *oc == c)
                .map_or(0, |e| e.1)
        }
    }
}

/// One column of Myers' bit-vector edit-distance matrix, advanced a text
/// character at a time.
struct Column {
    pv: u64,
    mv: u64,
    score: usize,
    high: u64,
    /// Whether the text start is fixed (row 0 grows by one per character)
    /// rather than free (substring search).
    anchored: bool,
}

impl Column {
    fn new(m: usize, anchored: bool) -> Column {
        Column {
            pv: if m == 64 { !0 } else { (1u64 << m) - 1 },
            mv: 0,
            score: m,
            high: 1u64 << (m - 1),
            anchored,
        }
    }

    /// Advances over a character whose match mask is `eq`; returns the
    /// distance of the whole pattern at this column.
    fn step(&mut self, eq: u64) -> usize {
        let (pv, mv) = (self.pv, self.mv);
        let xv = eq | mv;
        let xh = ((eq & pv).wrapping_add(pv) ^ pv) | eq;
        let mut ph = mv | !(xh | pv);
        let mut mh = pv & xh;
        if ph & self.high != 0 {
            self.score += 1;
        } else if mh & self.high != 0 {
            self.score -= 1;
        }
        ph = (ph << 1) | u64::from(self.anchored);
        mh <<= 1;
        self.pv = mh | !(xv | ph);
        self.mv = ph & xv;
        self.score
    }
}

#[cfg(test)]
mod unit {
    use super::*;
    use crate::dlp::tests::Lcg;

    fn chars(s: &str) -> Vec<char> {
        s.chars().collect()
    }

    #[test]
    fn myers_and_sellers_agree_on_ends() {
        let p = chars("openai production key");
        let t = chars("xx the openai prodution key is here and openai production keys");
        let mut ends = Vec::new();
        let peq = Peq::new(&p).unwrap();
        peq.ends(&t, 1, |e, _| ends.push(e));
        assert!(!ends.is_empty());
        for &e in &ends {
            let lo = (e + 1).saturating_sub(p.len() + 1);
            assert!(best_match(&p, &t[lo..=e], 1).is_some(), "end {e}");
        }
        let none = chars("openai product roadmap review");
        let mut count = 0;
        peq.ends(&none, 1, |_, _| count += 1);
        assert_eq!(count, 0);
    }

    /// Text made of the terms' words (some with one or two random edits,
    /// random ASCII case), filler words and separator runs of every kind.
    fn random_text(rng: &mut Lcg) -> String {
        const WORDS: &[&str] = &[
            "openai",
            "production",
            "key",
            "anthropic",
            "billing",
            "token",
            "the",
            "a",
            "prod",
            "keys",
            "geheimer",
            "schlüssel",
            "ab",
            "cd",
            "tok",
            "monkey",
            "Ünïcode",
        ];
        const SEPS: &[&str] = &[
            " ", "  ", "-", "\n", ", ", "...", "\t \t", "_", "/", "é", " ¿ ",
        ];
        const LETTERS: &[u8] = b"abcdeiknoprtuy";
        let mut text = String::new();
        for _ in 0..1 + rng.below(24) {
            let mut w: Vec<char> = WORDS[rng.below(WORDS.len())].chars().collect();
            for _ in 0..rng.below(4).saturating_sub(1) {
                let at = rng.below(w.len() + 1);
                let c = char::from(LETTERS[rng.below(LETTERS.len())]);
                match rng.below(3) {
                    0 => w.insert(at, c),
                    1 if at < w.len() => {
                        w.remove(at);
                    }
                    _ if at < w.len() => w[at] = c,
                    _ => {}
                }
            }
            for c in &mut w {
                if rng.below(4) == 0 {
                    *c = c.to_ascii_uppercase();
                }
            }
            text.extend(w);
            text.push_str(SEPS[rng.below(SEPS.len())]);
        }
        text
    }

    /// Plain Levenshtein distance, for checking reported spans.
    fn distance(a: &[char], b: &[char]) -> usize {
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.iter().enumerate() {
            let mut diag = row[0];
            row[0] = i + 1;
            for (j, cb) in b.iter().enumerate() {
                let up = row[j + 1];
                row[j + 1] = (diag + usize::from(ca != cb)).min(up + 1).min(row[j] + 1);
                diag = up;
            }
        }
        row[b.len()]
    }

    /// The prefiltered search finds exactly the terms that a plain dynamic
    /// programme over the whole normalised text finds, for every distance.
    #[test]
    fn fast_search_agrees_with_the_plain_dynamic_programme() {
        let raw: Vec<String> = [
            "openai production key",
            "anthropic billing token",
            "Geheimer Schlüssel",
            "ab cd",
            "tok",
            "production production",
        ]
        .map(String::from)
        .to_vec();
        let mut rng = Lcg(11);
        let mut found = 0;
        for k in 0..=2u8 {
            let terms = Terms::new(&raw, true, k, Vec::new()).unwrap();
            for _ in 0..4000 {
                let text = random_text(&mut rng);
                // Up to two joins between texts (each counts as a separator).
                let mut bounds: Vec<usize> = (0..rng.below(3))
                    .map(|_| rng.below(text.len() + 1))
                    .filter(|&b| text.is_char_boundary(b))
                    .collect();
                bounds.sort_unstable();
                let (mut chars, mut spans) = (Vec::new(), Vec::new());
                normalise_window(
                    text.as_bytes(),
                    &bounds,
                    0,
                    text.len(),
                    &mut chars,
                    &mut spans,
                );
                let mut out = Vec::new();
                terms.scan(text.as_bytes(), &bounds, &mut out, &mut Vec::new());
                // Every reported span really holds the term within its distance.
                for h in &out {
                    let term = &terms.terms[h.term];
                    let (mut got, mut spans) = (Vec::new(), Vec::new());
                    normalise_window(
                        text.as_bytes(),
                        &bounds,
                        h.start,
                        h.end,
                        &mut got,
                        &mut spans,
                    );
                    // A span that starts or ends on a separator run loses
                    // that space when normalised on its own.
                    let spaced = |pre: bool, post: bool| {
                        let mut v: Vec<char> = Vec::new();
                        v.extend(pre.then_some(' '));
                        v.extend(&got);
                        v.extend(post.then_some(' '));
                        distance(&term.norm, &v)
                    };
                    let d = [(false, false), (true, false), (false, true), (true, true)]
                        .map(|(a, b)| spaced(a, b))
                        .into_iter()
                        .min()
                        .unwrap_or(usize::MAX);
                    assert!(
                        d <= term.k,
                        "k={k} span {got:?} is {d} from {:?} in {text:?}",
                        term.norm
                    );
                }
                for (t, term) in terms.terms.iter().enumerate() {
                    let want = best_match(&term.norm, &chars, term.k).is_some();
                    let got = out.iter().any(|h| h.term == t);
                    assert_eq!(got, want, "k={k} term {:?} in {text:?}", terms.id(t));
                    found += usize::from(want);
                }
            }
        }
        // The generator must actually produce matches for this to mean anything.
        assert!(found > 1000, "only {found} matches generated");
    }

    #[test]
    fn anchors_are_rare_stretches() {
        // The behaviour tests break exactly these stretches.
        assert_eq!(anchor(b"production"), 3);
        assert_eq!(anchor(b"openai"), 1);
        assert_eq!(anchor(b"billing"), 0);
    }

    #[test]
    fn term_is_cut_into_k_plus_one_pieces() {
        let n = normalise_str("OpenAI production-key");
        assert_eq!(n.iter().collect::<String>(), "openai production key");
        assert_eq!(cut(&n, 1).map(|c| c.len()), Some(2));
        assert_eq!(cut(&n, 3).map(|c| c.len()), Some(4));
        assert_eq!(cut(&normalise_str("ab"), 1), None);
    }
}
