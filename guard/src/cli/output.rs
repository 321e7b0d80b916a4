//! What every command prints, in one place: data on stdout as human text or
//! typed JSON (`--output`), messages on stderr, tables for people, and the
//! rule that a closed stdout (`kt events | head`) ends a command with
//! success rather than an error or a panic.

use std::fmt::Display;
use std::io::{self, Write};

use serde::Serialize;

/// `--output`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OutputFormat {
    /// For people.
    #[default]
    Human,
    /// For machines: one JSON document (or JSON Lines for streams).
    Json,
}

/// A command's two streams and the format its data is shown in. Nothing
/// here panics on a closed stream: errors are returned, and
/// [`crate::cli::finish`] turns a broken pipe into success.
pub struct Output<'a> {
    format: OutputFormat,
    out: &'a mut dyn Write,
    err: &'a mut dyn Write,
}

impl<'a> Output<'a> {
    /// Data goes to `out`, messages to `err`.
    pub fn new(format: OutputFormat, out: &'a mut dyn Write, err: &'a mut dyn Write) -> Output<'a> {
        Output { format, out, err }
    }

    /// The format data is shown in.
    pub fn format(&self) -> OutputFormat {
        self.format
    }

    /// Shows `value`: one JSON document, or for people what `human` writes.
    pub fn data<T: Serialize + ?Sized>(
        &mut self,
        value: &T,
        human: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    ) -> io::Result<()> {
        match self.format {
            OutputFormat::Json => {
                serde_json::to_writer_pretty(&mut *self.out, value).map_err(io::Error::from)?;
                writeln!(self.out)
            }
            OutputFormat::Human => human(self.out),
        }
    }

    /// One line of a JSON Lines stream (`kt events --output json`).
    pub fn json_line<T: Serialize + ?Sized>(&mut self, value: &T) -> io::Result<()> {
        serde_json::to_writer(&mut *self.out, value).map_err(io::Error::from)?;
        writeln!(self.out)
    }

    /// A message for people on stderr, in both formats.
    pub fn note(&mut self, message: impl Display) -> io::Result<()> {
        writeln!(self.err, "{message}")
    }

    /// The data stream.
    pub fn out(&mut self) -> &mut dyn Write {
        self.out
    }

    /// The message stream.
    pub fn err(&mut self) -> &mut dyn Write {
        self.err
    }
}

/// Left-aligned columns separated by two spaces; the last is not padded.
pub fn write_table(out: &mut dyn Write, header: &[&str], rows: &[Vec<String>]) -> io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        s
    };
    writeln!(out, "{}", line(header.to_vec()))?;
    for row in rows {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

/// Whether `e` is, or was caused by, a write to a closed pipe: the reader
/// is done, which is not a failure of the command.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
            || cause
                .downcast_ref::<serde_json::Error>()
                .and_then(serde_json::Error::io_error_kind)
                == Some(io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context as _;

    #[test]
    fn json_is_one_document_and_human_is_what_the_command_writes() {
        #[derive(Serialize)]
        struct Doc {
            name: &'static str,
        }
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut o = Output::new(OutputFormat::Json, &mut out, &mut err);
        o.data(&Doc { name: "a" }, |w| writeln!(w, "never"))
            .unwrap();
        o.json_line(&Doc { name: "b" }).unwrap();
        o.note("to stderr").unwrap();
        let text = String::from_utf8(out).unwrap();
        let mut docs = serde_json::Deserializer::from_str(&text).into_iter::<serde_json::Value>();
        assert_eq!(docs.next().unwrap().unwrap()["name"], "a");
        assert_eq!(docs.next().unwrap().unwrap()["name"], "b");
        assert_eq!(text.lines().last(), Some(r#"{"name":"b"}"#));
        assert_eq!(err, b"to stderr\n");

        let mut out = Vec::new();
        let mut o = Output::new(OutputFormat::Human, &mut out, &mut err);
        o.data(&Doc { name: "a" }, |w| writeln!(w, "for people"))
            .unwrap();
        assert_eq!(out, b"for people\n");
    }

    #[test]
    fn a_broken_pipe_is_recognised_through_context_and_json() {
        let e: anyhow::Error = io::Error::from(io::ErrorKind::BrokenPipe).into();
        assert!(is_broken_pipe(&e.context("printing")));
        let json = serde_json::Error::io(io::Error::from(io::ErrorKind::BrokenPipe));
        assert!(is_broken_pipe(&anyhow::Error::new(json)));
        let other: anyhow::Result<()> =
            Err(io::Error::from(io::ErrorKind::NotFound)).context("reading");
        assert!(!is_broken_pipe(&other.unwrap_err()));
    }

    #[test]
    fn table_columns_line_up() {
        let mut out = Vec::new();
        write_table(
            &mut out,
            &["A", "BB"],
            &[
                vec!["long".into(), "x".into()],
                vec!["s".into(), "y".into()],
            ],
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "A     BB\nlong  x\ns     y\n"
        );
    }
}
