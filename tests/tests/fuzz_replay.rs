//! Replays every fuzz corpus entry and every crash ever found through the
//! same harness the fuzz target runs (`guard::fuzzing`), on stable, with no
//! cargo-fuzz: `tests/fuzz/corpus/<target>/` and
//! `tests/fuzz/regressions/<target>/`. `cargo xtask fuzz` grows them.
//!
//! A regression named `open-*` is a finding not fixed yet (described in
//! `tests/fuzz/RESULTS.md`): it must still fail, so fixing it makes this
//! test say to drop the `open-` prefix.

use std::path::{Path, PathBuf};

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = rd
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

fn replay(target: &str) {
    let (_, harness) = guard::fuzzing::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .expect("a known target");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let corpus = files(&root.join("corpus").join(target));
    assert!(
        !corpus.is_empty(),
        "tests/fuzz/corpus/{target} holds the seeds of this target"
    );
    let inputs = corpus
        .into_iter()
        .chain(files(&root.join("regressions").join(target)));
    for path in inputs {
        let data = std::fs::read(&path).expect("read a corpus file");
        // The path names the failing input when a harness asserts.
        eprintln!("replaying {}", path.display());
        let open = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("open-"));
        if open {
            let failed = std::panic::catch_unwind(|| harness(&data)).is_err();
            assert!(
                failed,
                "{} passes now: drop its `open-` prefix and update RESULTS.md",
                path.display()
            );
        } else {
            harness(&data);
        }
    }
}

#[test]
fn every_target_has_a_replay_test() {
    let names: Vec<&str> = guard::fuzzing::TARGETS.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names,
        [
            "config",
            "dlp",
            "client_hello",
            "connect",
            "relay",
            "event_store",
            "secret_store"
        ]
    );
}

#[test]
fn config_corpus() {
    replay("config");
}

#[test]
fn dlp_corpus() {
    replay("dlp");
}

#[test]
fn client_hello_corpus() {
    replay("client_hello");
}

#[test]
fn connect_corpus() {
    replay("connect");
}

#[test]
fn relay_corpus() {
    replay("relay");
}

#[test]
fn event_store_corpus() {
    replay("event_store");
}

#[test]
fn secret_store_corpus() {
    replay("secret_store");
}
