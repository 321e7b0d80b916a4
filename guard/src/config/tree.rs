//! A small YAML tree that remembers where every node starts, built from
//! `saphyr-parser` events. serde_yaml stops at the first problem and loses
//! positions; this tree lets the converter report every problem with a
//! line and column. Built with an explicit stack, so deep nesting cannot
//! overflow ours.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScalarStyle, ScanError, Span};

/// Deepest nesting accepted; a config needs about six levels.
const MAX_DEPTH: usize = 64;
/// Most nodes a document may expand to through aliases (stops "billion laughs").
const MAX_NODES: usize = 100_000;

/// A 1-based line and column (in characters).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(crate) struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    fn of(span: &Span) -> Pos {
        Pos {
            line: span.start.line(),
            column: span.start.col() + 1,
        }
    }
}

/// One YAML node and where it starts.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Node {
    pub pos: Pos,
    pub kind: Kind,
}

/// The shape of a node. Scalars keep their text; the converter decides what
/// it means for the field it expects.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Kind {
    /// `plain` is false for quoted and block scalars (always strings).
    Scalar {
        text: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    /// Entries in file order, duplicates kept so the converter can name them.
    Map(Vec<(Node, Node)>),
}

/// Why the text is not a single YAML document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TreeError {
    pub pos: Pos,
    pub message: String,
}

/// A collection being built.
enum Frame {
    Seq {
        pos: Pos,
        anchor: usize,
        items: Vec<Node>,
    },
    Map {
        pos: Pos,
        anchor: usize,
        entries: Vec<(Node, Node)>,
        key: Option<Node>,
    },
}

/// Parses `text` into one tree; `Ok(None)` for an empty document.
pub(crate) fn parse(text: &str) -> Result<Option<Node>, TreeError> {
    let mut stack: Vec<Frame> = Vec::new();
    let mut anchors: HashMap<usize, Node> = HashMap::new();
    let mut root: Option<Node> = None;
    let mut documents = 0usize;
    let mut nodes = 0usize;

    for event in Parser::new_from_str(text) {
        let (event, span) = event.map_err(scan_error)?;
        let pos = Pos::of(&span);
        let done = match event {
            Event::StreamStart | Event::StreamEnd | Event::DocumentEnd | Event::Nothing => None,
            Event::DocumentStart(_) => {
                documents += 1;
                if documents > 1 {
                    return Err(TreeError {
                        pos,
                        message: "a second YAML document starts here; a config file holds one"
                            .into(),
                    });
                }
                None
            }
            Event::Alias(id) => {
                let node = anchors.get(&id).cloned().ok_or_else(|| TreeError {
                    pos,
                    message: "alias to an unknown anchor".into(),
                })?;
                // Keep the expanded tree within the depth limit, so walking it stays shallow.
                if stack.len() + depth(&node) > MAX_DEPTH + 1 {
                    return Err(TreeError {
                        pos,
                        message: format!("alias nests deeper than {MAX_DEPTH} levels"),
                    });
                }
                nodes += count(&node);
                Some((node, 0))
            }
            Event::Scalar(text, style, anchor, tag) => {
                let mut plain = style == ScalarStyle::Plain;
                if let Some(tag) = tag {
                    // `!!str` only makes a plain scalar a string; other tags mean nothing here.
                    if tag.is_yaml_core_schema() && tag.suffix == "str" {
                        plain = false;
                    } else {
                        return Err(unsupported_tag(pos, &tag.to_string()));
                    }
                }
                let kind = Kind::Scalar {
                    text: text.into_owned(),
                    plain,
                };
                Some((Node { pos, kind }, anchor))
            }
            Event::SequenceStart(anchor, ref tag) | Event::MappingStart(anchor, ref tag) => {
                if let Some(tag) = tag {
                    return Err(unsupported_tag(pos, &tag.to_string()));
                }
                if stack.len() >= MAX_DEPTH {
                    return Err(TreeError {
                        pos,
                        message: format!("nesting deeper than {MAX_DEPTH} levels"),
                    });
                }
                stack.push(if matches!(event, Event::SequenceStart(..)) {
                    Frame::Seq {
                        pos,
                        anchor,
                        items: Vec::new(),
                    }
                } else {
                    Frame::Map {
                        pos,
                        anchor,
                        entries: Vec::new(),
                        key: None,
                    }
                });
                None
            }
            Event::SequenceEnd | Event::MappingEnd => match stack.pop() {
                Some(Frame::Seq { pos, anchor, items }) => Some((
                    Node {
                        pos,
                        kind: Kind::Seq(items),
                    },
                    anchor,
                )),
                Some(Frame::Map {
                    pos,
                    anchor,
                    entries,
                    ..
                }) => Some((
                    Node {
                        pos,
                        kind: Kind::Map(entries),
                    },
                    anchor,
                )),
                None => None,
            },
        };

        let Some((node, anchor)) = done else { continue };
        nodes += 1;
        if nodes > MAX_NODES {
            return Err(TreeError {
                pos,
                message: format!("the document expands to more than {MAX_NODES} nodes"),
            });
        }
        if anchor != 0 {
            anchors.insert(anchor, node.clone());
        }
        match stack.last_mut() {
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map { entries, key, .. }) => match key.take() {
                Some(k) => entries.push((k, node)),
                None => *key = Some(node),
            },
            None => root = Some(node),
        }
    }
    Ok(root)
}

fn count(node: &Node) -> usize {
    match &node.kind {
        Kind::Scalar { .. } => 1,
        Kind::Seq(items) => 1 + items.iter().map(count).sum::<usize>(),
        Kind::Map(entries) => {
            1 + entries
                .iter()
                .map(|(k, v)| count(k) + count(v))
                .sum::<usize>()
        }
    }
}

fn depth(node: &Node) -> usize {
    match &node.kind {
        Kind::Scalar { .. } => 1,
        Kind::Seq(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Kind::Map(entries) => {
            1 + entries
                .iter()
                .map(|(k, v)| depth(k).max(depth(v)))
                .max()
                .unwrap_or(0)
        }
    }
}

fn scan_error(e: ScanError) -> TreeError {
    let m = e.marker();
    TreeError {
        pos: Pos {
            line: m.line(),
            column: m.col() + 1,
        },
        message: e.info().to_string(),
    }
}

fn unsupported_tag(pos: Pos, tag: &str) -> TreeError {
    TreeError {
        pos,
        message: format!("unsupported YAML tag `{tag}`"),
    }
}
