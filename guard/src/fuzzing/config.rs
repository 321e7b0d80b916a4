//! The config loader: any bytes as a config file.

use std::path::Path;

use crate::config::{self, ConfigErrors, LoadError};

/// Any YAML (deep nesting, anchors and aliases, huge scalars, invalid
/// UTF-8) gives a config or errors, never a panic or a blown stack; every
/// error names the file and a position inside it.
pub fn config(data: &[u8]) {
    let source = Path::new("fuzz.yaml");
    match std::str::from_utf8(data) {
        Ok(text) => {
            match config::parse(text, source) {
                Ok(cfg) => {
                    // The loader checked the DLP policy: the scanner must
                    // build from what it accepted (else a 500 at start-up).
                    if let Some(dlp) = cfg.dlp {
                        let user_part = config::DlpFilter {
                            builtin_rules: false,
                            ..dlp
                        };
                        if let Err(e) = crate::dlp::Scanner::new(&user_part) {
                            panic!("the loader accepted a DLP policy the scanner refuses: {e}");
                        }
                    }
                }
                Err(errors) => check_errors(&errors, yaml_lines(text)),
            }
        }
        Err(_) => {
            // The byte path goes through `load`, which reads a file.
            let dir = super::stores::scratch_dir("config");
            let path = dir.join("fuzz.yaml");
            std::fs::write(&path, data).expect("write the scratch config");
            match config::load(&path) {
                Err(LoadError::Invalid(errors)) => {
                    check_errors(&errors, yaml_lines(&String::from_utf8_lossy(data)));
                    assert!(
                        errors.iter().any(|e| e.message.contains("UTF-8")),
                        "invalid UTF-8 not named: {errors}"
                    );
                }
                other => panic!("invalid UTF-8 must be refused as such: {other:?}"),
            }
        }
    }
}

fn check_errors(errors: &ConfigErrors, lines: usize) {
    assert!(!errors.is_empty(), "an Err carries at least one problem");
    for e in errors {
        assert!(e.line >= 1 && e.column >= 1, "positions are 1-based: {e}");
        assert!(
            e.line <= lines + 1,
            "line {} past the end of a {lines}-line file: {e}",
            e.line
        );
        assert!(!e.message.is_empty(), "an error says what is wrong");
    }
    // Rendering must not panic either.
    let _ = errors.to_string();
}

/// Lines as YAML counts them: a lone CR breaks a line too (editors differ;
/// the YAML spec and kt's positions follow it).
fn yaml_lines(text: &str) -> usize {
    text.replace("\r\n", "\n").matches(['\r', '\n']).count() + 1
}
