//! Decoding what a request carries into the text the rules run over:
//! content-encodings (with size and ratio caps), JSON string values
//! (unescaped, with their paths) and percent-encoding.

use std::borrow::Cow;
use std::io::Read;

use super::{DecodeLimits, DlpError};

/// Undoes `Content-Encoding` (a comma-separated list, applied in order, so
/// undone last to first). Identity bodies are borrowed, not copied.
pub(crate) fn decompress<'a>(
    body: &'a [u8],
    encoding: Option<&str>,
    limits: &DecodeLimits,
) -> Result<Cow<'a, [u8]>, DlpError> {
    let Some(encoding) = encoding else {
        return Ok(Cow::Borrowed(body));
    };
    let codings: Vec<&str> = encoding
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    let mut current: Cow<'a, [u8]> = Cow::Borrowed(body);
    for coding in codings.iter().rev() {
        let lower = coding.to_ascii_lowercase();
        let input: &[u8] = &current;
        let next = match lower.as_str() {
            "identity" => continue,
            "gzip" | "x-gzip" => read_capped(
                flate2::read::MultiGzDecoder::new(input),
                body.len(),
                limits,
                "gzip",
            )?,
            // HTTP "deflate" is zlib-wrapped, but raw deflate is common in the wild.
            "deflate" => match read_capped(
                flate2::read::ZlibDecoder::new(input),
                body.len(),
                limits,
                "deflate",
            ) {
                Err(DlpError::Corrupt { .. }) => read_capped(
                    flate2::read::DeflateDecoder::new(input),
                    body.len(),
                    limits,
                    "deflate",
                )?,
                other => other?,
            },
            "br" => read_capped(
                brotli::Decompressor::new(input, 4096),
                body.len(),
                limits,
                "br",
            )?,
            "zstd" => {
                let mut decoder = zstd::stream::read::Decoder::new(input)
                    .map_err(|_| DlpError::Corrupt { encoding: "zstd" })?;
                // A frame may ask for a huge window; cap the memory it can claim.
                decoder
                    .window_log_max(ZSTD_WINDOW_LOG_MAX)
                    .map_err(|_| DlpError::Corrupt { encoding: "zstd" })?;
                read_capped(decoder, body.len(), limits, "zstd")?
            }
            _ => return Err(DlpError::UnsupportedEncoding((*coding).to_string())),
        };
        current = Cow::Owned(next);
    }
    Ok(current)
}

/// How many content-codings in `encoding` are undone (a copy each);
/// `identity` and empty entries copy nothing.
pub(crate) fn coding_layers(encoding: Option<&str>) -> usize {
    encoding.map_or(0, |e| {
        e.split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case("identity"))
            .count()
    })
}

/// The most bytes one decoded copy of a `body_len`-byte encoded body can
/// take: [`read_capped`] stops past the size cap or (beyond the ratio
/// floor) the ratio cap, at most one read chunk later, and never grows
/// its buffer past this.
pub(crate) fn decoded_cap(body_len: usize, limits: &DecodeLimits) -> usize {
    let by_ratio = body_len
        .saturating_mul(limits.max_ratio as usize)
        .max(limits.ratio_floor);
    by_ratio
        .min(limits.max_decoded_bytes)
        .saturating_add(READ_CHUNK)
}

/// What [`read_capped`] reads at a time.
const READ_CHUNK: usize = 64 * 1024;

/// 8 MiB zstd window: plenty for request bodies.
const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// Reads a decoder to the end, refusing as soon as the output passes the
/// size cap or the ratio cap (output / compressed input), so a bomb never
/// gets to allocate its full size.
fn read_capped(
    mut reader: impl Read,
    compressed_len: usize,
    limits: &DecodeLimits,
    encoding: &'static str,
) -> Result<Vec<u8>, DlpError> {
    let ratio_limit = compressed_len.saturating_mul(limits.max_ratio as usize);
    // Grown by doubling as usual, but never past the cap the gateway
    // counted (`Scanner::working_bytes`), so the capacity stays within it.
    let cap = decoded_cap(compressed_len, limits);
    let mut out = Vec::new();
    let mut chunk = vec![0u8; READ_CHUNK];
    loop {
        let n = match reader.read(&mut chunk) {
            Ok(0) => return Ok(out),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return Err(DlpError::Corrupt { encoding }),
        };
        let need = out.len() + n;
        if need > out.capacity() {
            let grown = out.capacity().saturating_mul(2).min(cap).max(need);
            out.reserve_exact(grown - out.len());
        }
        out.extend_from_slice(&chunk[..n]);
        if out.len() > limits.max_decoded_bytes {
            return Err(DlpError::TooLarge {
                limit: limits.max_decoded_bytes,
            });
        }
        if out.len() > limits.ratio_floor && out.len() > ratio_limit {
            return Err(DlpError::RatioExceeded {
                ratio: limits.max_ratio,
            });
        }
    }
}

/// Percent-decodes `s`; returns the bytes and, for each decoded byte, the
/// offset in `s` where it starts (plus one final entry: `s.len()`), so
/// matches map back to the raw URL. With no `%` in `s` (the usual case)
/// nothing is copied and the map is empty, meaning offsets are unchanged
/// (see [`url_offset`]).
pub(crate) fn percent_decode(s: &str) -> (Cow<'_, [u8]>, Vec<usize>) {
    let b = s.as_bytes();
    if memchr::memchr(b'%', b).is_none() {
        return (Cow::Borrowed(b), Vec::new());
    }
    let mut out = Vec::with_capacity(b.len());
    let mut map = Vec::with_capacity(b.len() + 1);
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).and_then(|c| hex_val(*c)),
                b.get(i + 2).and_then(|c| hex_val(*c)),
            )
        {
            out.push(h << 4 | l);
            map.push(i);
            i += 3;
            continue;
        }
        out.push(b[i]);
        map.push(i);
        i += 1;
    }
    map.push(b.len());
    (Cow::Owned(out), map)
}

/// The raw URL offset of decoded offset `i` (see [`percent_decode`]).
pub(crate) fn url_offset(map: &[usize], i: usize) -> usize {
    map.get(i).copied().unwrap_or(i)
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Keys whose string values are structure, not content ("role": "user"):
/// they are scanned on their own but left out of the joined view, so they do
/// not sit between two halves of a key split across messages.
const STRUCTURAL_KEYS: &[&[u8]] = &[
    b"role",
    b"type",
    b"model",
    b"id",
    b"name",
    b"object",
    b"media_type",
    b"tool_call_id",
    b"tool_use_id",
];

/// One string of a JSON document. Its value is not decoded here: most are
/// only ever read once, straight into the joined view (see `segments`).
pub(crate) struct JsonStr {
    /// Byte range of the token in the body, quotes included.
    pub raw: std::ops::Range<usize>,
    /// Whether it holds any backslash escape.
    pub escaped: bool,
    /// An object key rather than a value.
    pub is_key: bool,
    /// The value of a structural key (see `STRUCTURAL_KEYS`).
    pub structural: bool,
}

/// A container on the walker's stack.
enum Frame<'a> {
    /// An object, with the key of the member being read.
    Obj(Option<(usize, Cow<'a, [u8]>)>),
    /// An array, with the index of the element being read.
    Arr(usize),
}

/// Every string of `body` if it is one JSON document, else `None` (the
/// caller then scans the body as text).
/// Calls `on_str` for every string of `body` (keys included), with the body
/// offsets of its backslashes, right after scanning it (while its bytes are
/// still in cache). `None` when `body` is not one JSON document; the
/// strings seen before that was clear were still reported.
pub(crate) fn json_strings(
    body: &[u8],
    escapes: &mut Vec<usize>,
    mut on_str: impl FnMut(JsonStr, &[usize]),
) -> Option<()> {
    walk(body, Some(escapes), |_, s, esc| {
        on_str(s, esc);
        true
    })
}

/// The JSON paths of the string tokens starting at the offsets in `wanted`
/// (sorted): `$.a[0].b`, with `.{key}` appended when the token is itself an
/// object key. Keys listed in `masked` (those holding a finding) are shown
/// as `{key}`, never spelled out.
pub(crate) fn json_paths(
    body: &[u8],
    wanted: &[usize],
    masked: &[usize],
) -> std::collections::HashMap<usize, String> {
    let mut found = std::collections::HashMap::new();
    walk(body, None, |stack, s, _| {
        if wanted.binary_search(&s.raw.start).is_err() {
            return true;
        }
        let mut path = String::from("$");
        let n = stack.len();
        for (idx, frame) in stack.iter().enumerate() {
            // For a key, the innermost object's slot still holds the previous key.
            let own_object = s.is_key && idx + 1 == n;
            match frame {
                Frame::Arr(i) => {
                    path.push('[');
                    path.push_str(&i.to_string());
                    path.push(']');
                }
                Frame::Obj(Some((start, key))) if !own_object => {
                    push_key(&mut path, *start, key, masked);
                }
                Frame::Obj(_) => {}
            }
        }
        if s.is_key {
            path.push_str(".{key}");
        }
        found.insert(s.raw.start, path);
        found.len() < wanted.len()
    });
    found
}

fn push_key(path: &mut String, start: usize, key: &[u8], masked: &[usize]) {
    let plain = !key.is_empty()
        && key.len() <= 64
        && key
            .iter()
            .enumerate()
            .all(|(i, c)| c.is_ascii_alphabetic() || *c == b'_' || (i > 0 && c.is_ascii_digit()));
    if masked.contains(&start) {
        path.push_str(".{key}");
    } else if plain {
        path.push('.');
        path.push_str(&String::from_utf8_lossy(key));
    } else {
        let quoted = serde_json::to_string(&String::from_utf8_lossy(key)).unwrap_or_default();
        path.push('[');
        path.push_str(&quoted);
        path.push(']');
    }
}

/// Walks one JSON document without building it, calling `on_str` for every
/// string (keys included) with the stack of enclosing containers; stops
/// early when `on_str` returns false. Iterative, so deep nesting cannot
/// overflow the stack. `None` when `body` is not a single JSON document.
fn walk<'a>(
    body: &'a [u8],
    mut escapes: Option<&mut Vec<usize>>,
    mut on_str: impl FnMut(&[Frame<'a>], JsonStr, &[usize]) -> bool,
) -> Option<()> {
    #[derive(Clone, Copy)]
    enum St {
        Value,
        After,
        ObjFirst,
        ObjKey,
        ArrFirst,
    }
    let mut stack: Vec<Frame<'a>> = Vec::new();
    let mut st = St::Value;
    let mut i = 0;
    loop {
        i = skip_ws(body, i);
        match st {
            St::Value => match *body.get(i)? {
                b'{' => {
                    stack.push(Frame::Obj(None));
                    i += 1;
                    st = St::ObjFirst;
                }
                b'[' => {
                    stack.push(Frame::Arr(0));
                    i += 1;
                    st = St::ArrFirst;
                }
                b'"' => {
                    let first_esc = escapes.as_ref().map_or(0, |e| e.len());
                    let (end, escaped) = string_end(body, i, escapes.as_deref_mut())?;
                    let esc_end = escapes.as_ref().map_or(0, |e| e.len());
                    let structural = matches!(stack.last(), Some(Frame::Obj(Some((_, k)))) if STRUCTURAL_KEYS.contains(&&k[..]));
                    let s = JsonStr {
                        raw: i..end,
                        escaped,
                        is_key: false,
                        structural,
                    };
                    let esc = escapes
                        .as_deref()
                        .map_or(&[][..], |e| &e[first_esc..esc_end]);
                    if !on_str(&stack, s, esc) {
                        return Some(());
                    }
                    i = end;
                    st = St::After;
                }
                c if c == b'-' || c.is_ascii_digit() || c.is_ascii_lowercase() => {
                    let len = body[i..]
                        .iter()
                        .take_while(|c| {
                            c.is_ascii_alphanumeric() || matches!(c, b'-' | b'+' | b'.')
                        })
                        .count();
                    let tok = &body[i..i + len];
                    // Strictly: a lenient number (`1sk-proj-…`) would make
                    // a body "JSON" whose text is never scanned.
                    let ok = matches!(tok, b"true" | b"false" | b"null") || json_number(tok);
                    if !ok {
                        return None;
                    }
                    i += len;
                    st = St::After;
                }
                _ => return None,
            },
            St::ObjFirst => {
                if *body.get(i)? == b'}' {
                    stack.pop();
                    i += 1;
                    st = St::After;
                } else {
                    st = St::ObjKey;
                }
            }
            St::ObjKey => {
                if *body.get(i)? != b'"' {
                    return None;
                }
                let first_esc = escapes.as_ref().map_or(0, |e| e.len());
                let (end, escaped) = string_end(body, i, escapes.as_deref_mut())?;
                let esc_end = escapes.as_ref().map_or(0, |e| e.len());
                let text = string_value(&body[i + 1..end - 1], escaped);
                let key = JsonStr {
                    raw: i..end,
                    escaped,
                    is_key: true,
                    structural: false,
                };
                let esc = escapes
                    .as_deref()
                    .map_or(&[][..], |e| &e[first_esc..esc_end]);
                if !on_str(&stack, key, esc) {
                    return Some(());
                }
                if let Some(Frame::Obj(slot)) = stack.last_mut() {
                    *slot = Some((i, text));
                }
                i = skip_ws(body, end);
                if *body.get(i)? != b':' {
                    return None;
                }
                i += 1;
                st = St::Value;
            }
            St::ArrFirst => {
                if *body.get(i)? == b']' {
                    stack.pop();
                    i += 1;
                    st = St::After;
                } else {
                    st = St::Value;
                }
            }
            St::After => {
                let Some(top) = stack.last_mut() else {
                    return (i == body.len()).then_some(());
                };
                let c = *body.get(i)?;
                i += 1;
                match (top, c) {
                    (Frame::Obj(_), b',') => st = St::ObjKey,
                    (Frame::Arr(n), b',') => {
                        *n += 1;
                        st = St::Value;
                    }
                    (Frame::Obj(_), b'}') | (Frame::Arr(_), b']') => {
                        stack.pop();
                    }
                    _ => return None,
                }
            }
        }
    }
}

/// Whether `tok` is a JSON number as RFC 8259 spells it:
/// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`.
fn json_number(tok: &[u8]) -> bool {
    let digits = |i: &mut usize| {
        let start = *i;
        while tok.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i > start
    };
    let mut i = usize::from(tok.first() == Some(&b'-'));
    match tok.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            digits(&mut i);
        }
        _ => return false,
    }
    if tok.get(i) == Some(&b'.') {
        i += 1;
        if !digits(&mut i) {
            return false;
        }
    }
    if matches!(tok.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(tok.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if !digits(&mut i) {
            return false;
        }
    }
    i == tok.len()
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while let Some(c) = b.get(i) {
        if !matches!(c, b' ' | b'\t' | b'\n' | b'\r') {
            break;
        }
        i += 1;
    }
    i
}

/// The first `"` or `\\` in `b` at or after `j`. The next one is usually
/// near (a chat body escapes a line break every ~60 bytes), where a few
/// 8-byte words compared in registers beat a call into `memchr2`'s vector
/// code; past 64 bytes `memchr2` takes over.
fn quote_or_backslash(b: &[u8], mut j: usize) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    const QUOTE: u64 = LO * b'"' as u64;
    const BACKSLASH: u64 = LO * b'\\' as u64;
    let stop = j.saturating_add(64).min(b.len());
    while j + 8 <= stop {
        let mut word = [0u8; 8];
        word.copy_from_slice(&b[j..j + 8]);
        let w = u64::from_le_bytes(word);
        let (q, s) = (w ^ QUOTE, w ^ BACKSLASH);
        // A zero byte in q or s is a quote or a backslash; the lowest flag
        // of this classic test is exact (borrows only run upwards).
        let m = (q.wrapping_sub(LO) & !q | s.wrapping_sub(LO) & !s) & HI;
        if m != 0 {
            return Some(j + (m.trailing_zeros() / 8) as usize);
        }
        j += 8;
    }
    memchr::memchr2(b'"', b'\\', b.get(j..)?).map(|p| j + p)
}

/// Finds the end of the string token at `b[start] == '"'`: the offset just
/// past the closing quote, and whether it holds escapes.
fn string_end(
    b: &[u8],
    start: usize,
    mut escapes: Option<&mut Vec<usize>>,
) -> Option<(usize, bool)> {
    let mut j = start + 1;
    let mut escaped = false;
    loop {
        j = quote_or_backslash(b, j)?;
        if b[j] == b'"' {
            return Some((j + 1, escaped));
        }
        if let Some(e) = escapes.as_deref_mut() {
            e.push(j);
        }
        escaped = true;
        j += 2;
    }
}

/// The value of a JSON string (`inner`: between the quotes), unescaped.
/// Invalid escapes are kept as written (the walker only checked the quotes).
pub(crate) fn string_value(inner: &[u8], escaped: bool) -> Cow<'_, [u8]> {
    if !escaped {
        return Cow::Borrowed(inner);
    }
    let mut out = Vec::with_capacity(inner.len());
    segments(inner, true, |seg| match seg {
        Segment::Bytes(b) => out.extend_from_slice(b),
        Segment::Break(c) => out.push(c),
    });
    Cow::Owned(out)
}

/// A run of decoded text, or a line break (`\n` or `\r`).
pub(crate) enum Segment<'s> {
    Bytes(&'s [u8]),
    Break(u8),
}

/// Walks `text` as decoded bytes: with `json`, `text` is the inside of a
/// JSON string and escapes are decoded on the way. Line breaks come out as
/// `Segment::Break`, everything else as `Segment::Bytes`, in order, so the
/// joined view is built in one pass without decoding into a copy first.
pub(crate) fn segments(text: &[u8], json: bool, mut f: impl FnMut(Segment<'_>)) {
    let mut i = 0;
    while i < text.len() {
        let rest = &text[i..];
        let next = if json {
            memchr::memchr3(b'\\', b'\n', b'\r', rest)
        } else {
            memchr::memchr2(b'\n', b'\r', rest)
        };
        let Some(p) = next else {
            f(Segment::Bytes(rest));
            return;
        };
        if p > 0 {
            f(Segment::Bytes(&rest[..p]));
        }
        i += p;
        match text[i] {
            c @ (b'\n' | b'\r') => {
                f(Segment::Break(c));
                i += 1;
            }
            _ => {
                match unescape_one(text, i + 1) {
                    Some((next, bytes, len)) => {
                        match &bytes[..len] {
                            [c @ (b'\n' | b'\r')] => f(Segment::Break(*c)),
                            decoded => f(Segment::Bytes(decoded)),
                        }
                        i = next;
                    }
                    None => {
                        // Not a valid escape: keep the backslash as written.
                        f(Segment::Bytes(&text[i..i + 1]));
                        i += 1;
                    }
                }
            }
        }
    }
}

/// `text` with its JSON escapes decoded (`\u0073` → `s`, `\n` → a line
/// break, …; invalid ones kept as written), and for each decoded byte the
/// offset in `text` of what it came from, plus `text.len()` at the end.
/// `None` when `text` has no valid escape (nothing to decode).
pub(crate) fn json_escapes(text: &[u8]) -> Option<(Vec<u8>, Vec<usize>)> {
    let first = memchr::memchr(b'\\', text)?;
    let mut out = Vec::with_capacity(text.len());
    let mut map = Vec::with_capacity(text.len() + 1);
    out.extend_from_slice(&text[..first]);
    map.extend(0..first);
    let mut i = first;
    let mut any = false;
    while i < text.len() {
        if text[i] == b'\\'
            && let Some((next, bytes, len)) = unescape_one(text, i + 1)
        {
            out.extend_from_slice(&bytes[..len]);
            map.extend(std::iter::repeat_n(i, len));
            i = next;
            any = true;
            continue;
        }
        out.push(text[i]);
        map.push(i);
        i += 1;
    }
    map.push(text.len());
    any.then_some((out, map))
}

/// Decodes the escape whose letter is at `s[i]` (just after the backslash):
/// the offset after it, and the UTF-8 bytes it stands for.
pub(crate) fn unescape_one(s: &[u8], mut i: usize) -> Option<(usize, [u8; 4], usize)> {
    let c = *s.get(i)?;
    i += 1;
    let simple = |b: u8| Some((i, [b, 0, 0, 0], 1));
    match c {
        b'"' | b'\\' | b'/' => simple(c),
        b'n' => simple(b'\n'),
        b't' => simple(b'\t'),
        b'r' => simple(b'\r'),
        b'b' => simple(0x08),
        b'f' => simple(0x0c),
        b'u' => {
            let cp = hex4(s.get(i..i + 4)?)?;
            i += 4;
            let ch = if (0xD800..0xDC00).contains(&cp) {
                // A high surrogate: pair it with the low one that should follow.
                let low = (s.get(i..i + 2) == Some(b"\\u"))
                    .then(|| s.get(i + 2..i + 6).and_then(hex4))
                    .flatten()
                    .filter(|lo| (0xDC00..0xE000).contains(lo));
                match low {
                    Some(lo) => {
                        i += 6;
                        char::from_u32(0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00))
                    }
                    None => None,
                }
            } else {
                char::from_u32(cp)
            };
            let ch = ch.unwrap_or(char::REPLACEMENT_CHARACTER);
            let mut buf = [0u8; 4];
            let len = ch.encode_utf8(&mut buf).len();
            Some((i, buf, len))
        }
        _ => None,
    }
}

fn hex4(h: &[u8]) -> Option<u32> {
    h.iter()
        .try_fold(0u32, |acc, c| Some(acc << 4 | u32::from(hex_val(*c)?)))
}

#[cfg(test)]
mod tests {
    use super::{json_number, quote_or_backslash};

    #[test]
    fn numbers_are_json_numbers_only() {
        for ok in ["0", "-0", "12", "-3.25", "1e9", "1E+2", "2.5e-3", "10"] {
            assert!(json_number(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            "-",
            "01",
            "1.",
            ".5",
            "1e",
            "1e+",
            "+1",
            "1x",
            "3f2a9c1e-7b4d",
            "1sk-proj-abc",
            "0x10",
            "1-2",
            "NaN",
            "Infinity",
        ] {
            assert!(!json_number(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn quote_or_backslash_agrees_with_memchr2_everywhere() {
        // Every position of a quote or backslash (and none) in texts of 0 to
        // 150 bytes, searched from every start: word and tail paths alike.
        for len in 0..150 {
            for special in [None, Some(b'"'), Some(b'\\')] {
                for at in 0..len.max(1) {
                    let mut text: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
                    if let Some(c) = special
                        && at < len
                    {
                        text[at] = c;
                        // A byte just above each special one (0x22 + 1, 0x5c + 1)
                        // must not be taken for it.
                        if at + 1 < len {
                            text[at + 1] = c + 1;
                        }
                    }
                    for from in 0..=len {
                        let want = memchr::memchr2(b'"', b'\\', &text[from..]).map(|p| from + p);
                        assert_eq!(quote_or_backslash(&text, from), want, "{len} {at} {from}");
                    }
                }
            }
        }
    }
}
