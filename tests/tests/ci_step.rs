//! The GitHub Action (`.github/actions/kt/action.yml`) is a valid
//! composite action: it parses, every step says its shell, every input it
//! uses is declared, each `run` script passes `bash -n`, and the keys input
//! reaches kt only through the environment (never a command line).

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use saphyr_parser::{Event, Parser};

#[derive(Debug)]
enum Y {
    S(String),
    L(Vec<Y>),
    M(BTreeMap<String, Y>),
}

impl Y {
    fn get(&self, k: &str) -> Option<&Y> {
        match self {
            Y::M(m) => m.get(k),
            _ => None,
        }
    }
    fn str(&self) -> Option<&str> {
        match self {
            Y::S(s) => Some(s),
            _ => None,
        }
    }
}

fn node(events: &mut std::vec::IntoIter<Event<'_>>) -> Y {
    match events.next().expect("more YAML") {
        Event::Scalar(s, ..) => Y::S(s.into_owned()),
        Event::SequenceStart(..) => {
            let mut v = Vec::new();
            loop {
                if matches!(events.as_slice().first(), Some(Event::SequenceEnd)) {
                    events.next();
                    return Y::L(v);
                }
                v.push(node(events));
            }
        }
        Event::MappingStart(..) => {
            let mut m = BTreeMap::new();
            loop {
                if matches!(events.as_slice().first(), Some(Event::MappingEnd)) {
                    events.next();
                    return Y::M(m);
                }
                let Y::S(k) = node(events) else {
                    panic!("a non-scalar key")
                };
                let v = node(events);
                assert!(m.insert(k.clone(), v).is_none(), "duplicate key {k}");
            }
        }
        e => panic!("unexpected {e:?}"),
    }
}

fn parse(text: &str) -> Y {
    let events: Vec<Event<'_>> = Parser::new_from_str(text)
        .map(|r| r.expect("valid YAML").0)
        .filter(|e| {
            !matches!(
                e,
                Event::StreamStart
                    | Event::StreamEnd
                    | Event::DocumentStart(_)
                    | Event::DocumentEnd
            )
        })
        .collect();
    node(&mut events.into_iter())
}

#[test]
fn the_github_action_is_a_valid_composite_action_that_never_puts_a_key_on_a_command_line() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../.github/actions/kt/action.yml"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let doc = parse(&text);
    for k in ["name", "description"] {
        assert!(
            doc.get(k).and_then(Y::str).is_some_and(|s| !s.is_empty()),
            "{k}"
        );
    }
    let Some(Y::M(inputs)) = doc.get("inputs") else {
        panic!("no inputs")
    };
    for (name, i) in inputs {
        assert!(
            i.get("description").is_some(),
            "input {name} has no description"
        );
    }
    let runs = doc.get("runs").expect("runs");
    assert_eq!(runs.get("using").and_then(Y::str), Some("composite"));
    let Some(Y::L(steps)) = runs.get("steps") else {
        panic!("no steps")
    };
    assert!(steps.len() >= 2);
    for step in steps {
        let run = step.get("run").and_then(Y::str).expect("a run step");
        assert_eq!(step.get("shell").and_then(Y::str), Some("bash"));
        // Inputs reach scripts through `env:` only (no expression
        // injection, no key in argv).
        assert!(
            !run.contains("${{"),
            "an expression inside a run script:\n{run}"
        );
        let out = Command::new("bash")
            .args(["-n", "-c", run])
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "bash -n: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(Y::M(env)) = step.get("env") {
            for v in env.values() {
                let v = v.str().unwrap_or_default();
                if let Some(name) = v
                    .strip_prefix("${{ inputs.")
                    .and_then(|r| r.strip_suffix(" }}"))
                {
                    assert!(inputs.contains_key(name), "undeclared input {name}");
                }
            }
        }
    }
    // The keys are read from the environment and fed on stdin.
    let start = steps[0].get("run").and_then(Y::str).unwrap();
    assert!(start.contains("<<< \"$KT_KEYS\""), "{start}");
    assert!(
        start.contains("printf '%s' \"$value\" | sudo -E kt secrets add"),
        "{start}"
    );
}
