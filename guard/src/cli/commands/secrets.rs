//! `kt secrets add|list|rm|status|verify`: manage stored secrets, show how
//! each target's `secret_key_ref` resolves, and prove the keys work. Values come from standard input or a
//! no-echo prompt, never from argv, and are never printed: output carries
//! names, backends and fingerprints only.

use std::io::{self, IsTerminal, Read, Write};
use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::Context;

use crate::cli::output::write_table;
use crate::cli::{ExitStatus, Global, Output, OutputFormat};
use crate::events::EventStore;
use crate::secrets::status::{StatusReport, TargetState};
use crate::secrets::vault::VaultStore;
use crate::secrets::{
    FileStore, Fingerprint, Fingerprinter, Keychain, MAX_VALUE_LEN, PutOutcome, Resolver,
    SecretStore, SecretValue, SecretsError, Source, validate_name, validate_value,
};

/// `kt secrets ...`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum SecretsCmd {
    /// Add or replace a secret. The value is read from standard input, or
    /// prompted for without echo on a terminal; never from the command line.
    #[command(group(
        clap::ArgGroup::new("backend")
            .required(true)
            .multiple(false)
            .args(["store", "keychain"])
    ))]
    Add {
        /// Secret name: letters, digits and underscores, not starting with a digit.
        name: String,
        /// Keep it in the guard's encrypted secret store (survives reboots).
        #[arg(long)]
        store: bool,
        /// Keep it in the kernel user keyring (lost at reboot).
        #[arg(long)]
        keychain: bool,
        /// Replace an existing value without asking (rotation in place; a
        /// running kt switches to it within a second or two).
        #[arg(long = "replace", alias = "force")]
        force: bool,
        /// A config whose `secrets.store` names a central store: `--store`
        /// writes there (connected mode), nothing goes to the data dir.
        #[arg(long, short, env = "KT_CONFIG")]
        config: Option<PathBuf>,
    },
    /// List stored secrets: name, backend, fingerprint, created and updated times.
    List {
        /// A config whose `secrets.store` names a central store: list it
        /// (and the keychain) instead of the local store.
        #[arg(long, short, env = "KT_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Remove a secret from the store and the keychain; exit 1 when it did not exist.
    Rm {
        /// Secret name.
        name: String,
        /// A config whose `secrets.store` names a central store: remove it
        /// there (and from the keychain) instead of the local store.
        #[arg(long, short, env = "KT_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Show, per target of a config file, where its secret resolves.
    Status {
        /// The policy config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Prove keys work: per target, one unbilled request (a list-models
    /// call) with its managed key through the gateway's upstream path.
    /// Exit 1 when a required target is not ok.
    Verify {
        /// Only the targets whose secret has one of these names (default: all).
        names: Vec<String>,
        /// The policy config file.
        #[arg(long, short)]
        config: PathBuf,
    },
}

/// Runs a `kt secrets` command. `Err` means the command itself failed
/// (exit 2), and its message is safe to print.
pub fn run(cmd: SecretsCmd, global: &Global) -> anyhow::Result<ExitStatus> {
    run_with(
        cmd,
        global,
        &mut StdConsole {
            out: io::stdout(),
            err: io::stderr(),
        },
    )
}

/// Terminal and standard streams, abstracted so tests can drive the commands.
trait Console {
    /// Whether standard input is a terminal (prompt and confirm) or a pipe.
    fn interactive(&self) -> bool;
    /// Reads at most `limit` bytes of standard input.
    fn read_stdin(&mut self, limit: u64) -> io::Result<Vec<u8>>;
    /// Prompts on the terminal without echo.
    fn prompt_secret(&mut self, prompt: &str) -> io::Result<String>;
    /// Asks a yes/no question on the terminal; default no.
    fn confirm(&mut self, question: &str) -> io::Result<bool>;
    /// Data output and messages (stdout, stderr).
    fn streams(&mut self) -> (&mut dyn Write, &mut dyn Write);
    /// Messages, warnings.
    fn err(&mut self) -> &mut dyn Write {
        self.streams().1
    }
    /// Data and messages in the format of `--output`.
    fn output(&mut self, format: OutputFormat) -> Output<'_> {
        let (out, err) = self.streams();
        Output::new(format, out, err)
    }
}

struct StdConsole {
    out: io::Stdout,
    err: io::Stderr,
}

impl Console for StdConsole {
    fn interactive(&self) -> bool {
        io::stdin().is_terminal()
    }

    fn read_stdin(&mut self, limit: u64) -> io::Result<Vec<u8>> {
        let mut buf = Vec::new();
        io::stdin().lock().take(limit).read_to_end(&mut buf)?;
        Ok(buf)
    }

    fn prompt_secret(&mut self, prompt: &str) -> io::Result<String> {
        rpassword::prompt_password(prompt)
    }

    fn confirm(&mut self, question: &str) -> io::Result<bool> {
        let mut err = io::stderr().lock();
        write!(err, "{question} [y/N] ")?;
        err.flush()?;
        let mut line = String::new();
        io::stdin().read_line(&mut line)?;
        Ok(matches!(line.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
    }

    fn streams(&mut self) -> (&mut dyn Write, &mut dyn Write) {
        (&mut self.out, &mut self.err)
    }
}

fn run_with(cmd: SecretsCmd, global: &Global, con: &mut dyn Console) -> anyhow::Result<ExitStatus> {
    match cmd {
        SecretsCmd::Add {
            name,
            store,
            keychain,
            force,
            config,
        } => {
            let backend = match (store, keychain) {
                (true, false) => Source::Store,
                (false, true) => Source::Keychain,
                _ => anyhow::bail!("give exactly one of --store or --keychain"),
            };
            let Some(stores) = Stores::open(config.as_deref(), global, con)? else {
                return Ok(ExitStatus::Failure);
            };
            add(&name, backend, force, &stores, global, con)
        }
        SecretsCmd::List { config } => {
            let Some(stores) = Stores::open(config.as_deref(), global, con)? else {
                return Ok(ExitStatus::Failure);
            };
            list(&stores, global, con)
        }
        SecretsCmd::Rm { name, config } => {
            let Some(stores) = Stores::open(config.as_deref(), global, con)? else {
                return Ok(ExitStatus::Failure);
            };
            rm(&name, &stores, global, con)
        }
        SecretsCmd::Status { config } => {
            let mut out = con.output(global.output);
            let Some(config) = crate::cli::load_config(&config, &mut out)? else {
                return Ok(ExitStatus::Failure);
            };
            let resolver = Resolver::live_for_config(&config, &global.data_dir)
                .context("cannot set up the central secret store")?;
            if let (Some(vault), Some(store)) = (resolver.vault(), &config.secrets.store) {
                // One pass over the store says whether it answers at all.
                let checked = resolver.refresh(&config).unwrap_or_default();
                match &checked.problem {
                    None => out.note(format_args!(
                        "central store: vault at {} answers ({} entries under {})",
                        vault.address(),
                        vault.list().map_or(0, |l| l.len()),
                        vault.entry_path("")
                    ))?,
                    Some(p) => out.note(format_args!(
                        "central store: vault at {} does NOT answer: {p}\nA running gateway serves \
                         its last good values for up to max_stale ({}), then fails closed; see its \
                         log and the kt_secret_store metrics",
                        vault.address(),
                        humantime::format_duration(store.max_stale)
                    ))?,
                }
            }
            // Read-only: without a host key yet, show no fingerprints.
            let fp = Fingerprinter::open_existing(&global.data_dir)
                .context("cannot read the fingerprint key")?;
            let mut report = StatusReport::build(&config, &resolver, fp.as_ref());
            // Read-only too: without an event store the evidence stays empty.
            let events = crate::datadir::events_db(&global.data_dir);
            let evidence = match EventStore::open_read_only(&global.data_dir) {
                Ok(Some(store)) => {
                    // What the gateway of this data dir last said about the store.
                    if config.secrets.store.is_some()
                        && let Ok(Some((t, rule, message))) = store.last_secret_store_event()
                    {
                        out.note(format_args!(
                            "the gateway's last word on the central store: {rule} at {}: {message}",
                            humantime::format_rfc3339_millis(
                                std::time::UNIX_EPOCH
                                    + std::time::Duration::from_millis(
                                        u64::try_from(t).unwrap_or(0)
                                    )
                            )
                        ))?;
                    }
                    report.add_evidence(&config, &store).map(|()| true)
                }
                Ok(None) => Ok(false),
                Err(e) => Err(e),
            };
            match evidence {
                Ok(true) => {}
                Ok(false) => out.note(format_args!(
                    "note: no event store at {} yet: requests served, key users, \
                     rotation alarms and probes are not known",
                    events.display()
                ))?,
                Err(e) => out.note(format_args!(
                    "warning: cannot read the event store, so usage evidence is missing: {e}"
                ))?,
            }
            Ok(write_status(&report, &mut out)?)
        }
        SecretsCmd::Verify { names, config } => verify(&names, &config, global, con),
    }
}

/// `kt secrets verify --output json`.
#[derive(serde::Serialize)]
struct VerifyDoc<'a> {
    config: &'a std::path::Path,
    ok: bool,
    targets: &'a [crate::gateway::ProbeReport],
}

fn verify(
    names: &[String],
    config: &std::path::Path,
    global: &Global,
    con: &mut dyn Console,
) -> anyhow::Result<ExitStatus> {
    let mut out = con.output(global.output);
    let Some(config) = crate::cli::load_config(config, &mut out)? else {
        return Ok(ExitStatus::Failure);
    };
    let unused: Vec<&str> = names
        .iter()
        .filter(|n| {
            !config
                .providers
                .targets
                .iter()
                .any(|t| t.secret_key_ref.name() == n.as_str())
        })
        .map(String::as_str)
        .collect();
    if !unused.is_empty() {
        out.note(format_args!(
            "error: no target of {} uses secret {}",
            config.source.display(),
            unused.join(", ")
        ))?;
        return Ok(ExitStatus::Failure);
    }
    let reports = super::probe::run(&config, global, &|t| {
        names.is_empty() || names.iter().any(|n| *n == t.secret_key_ref.name())
    })?;
    if let Err(e) = super::probe::record(&config, global, &reports) {
        out.note(format_args!(
            "warning: the probe results were not recorded, so `kt secrets status` \
             will not show them: {e}"
        ))?;
    }
    let ok = crate::gateway::all_required_pass(&reports);
    let doc = VerifyDoc {
        config: &config.source,
        ok,
        targets: &reports,
    };
    out.data(&doc, |w| super::probe::write(w, &reports))?;
    for line in super::probe::details(&reports) {
        out.note(line)?;
    }
    Ok(if ok {
        ExitStatus::Success
    } else {
        ExitStatus::Failure
    })
}

fn fingerprinter(global: &Global) -> anyhow::Result<Fingerprinter> {
    Fingerprinter::open(&global.data_dir).context("cannot set up fingerprints")
}

/// Where `--store` goes: the data dir's file store, or the central store
/// a config names (connected mode). `--keychain` is always local.
struct Stores {
    vault: Option<std::sync::Arc<VaultStore>>,
}

impl Stores {
    /// The stores for `config` (`--config` / `KT_CONFIG`); `None` after
    /// an invalid config was reported.
    fn open(
        config: Option<&std::path::Path>,
        global: &Global,
        con: &mut dyn Console,
    ) -> anyhow::Result<Option<Stores>> {
        let Some(path) = config else {
            return Ok(Some(Stores { vault: None }));
        };
        let mut out = con.output(global.output);
        let Some(config) = crate::cli::load_config(path, &mut out)? else {
            return Ok(None);
        };
        let vault = match &config.secrets.store {
            Some(cfg) => Some(std::sync::Arc::new(
                VaultStore::live(cfg).context("cannot set up the central secret store")?,
            )),
            None => None,
        };
        Ok(Some(Stores { vault }))
    }

    fn backend(&self, source: Source, global: &Global) -> Box<dyn SecretStore> {
        match (source, &self.vault) {
            (Source::Keychain, _) => Box::new(Keychain::new(&global.data_dir)),
            (_, Some(v)) => Box::new(SharedStore(std::sync::Arc::clone(v))),
            (_, None) => Box::new(FileStore::new(&global.data_dir)),
        }
    }

    /// Both backends, in resolution order.
    fn backends(&self, global: &Global) -> [Box<dyn SecretStore>; 2] {
        [
            self.backend(Source::Store, global),
            self.backend(Source::Keychain, global),
        ]
    }

    /// What `--store` is called in messages.
    fn store_name(&self) -> String {
        match &self.vault {
            Some(v) => format!("vault at {}", v.address()),
            None => "store".to_string(),
        }
    }
}

/// The central store behind a box.
struct SharedStore(std::sync::Arc<VaultStore>);

impl SecretStore for SharedStore {
    fn source(&self) -> Source {
        self.0.source()
    }
    fn get(&self, name: &str) -> Result<Option<SecretValue>, SecretsError> {
        self.0.get(name)
    }
    fn put(&self, name: &str, value: &SecretValue) -> Result<PutOutcome, SecretsError> {
        self.0.put(name, value)
    }
    fn remove(&self, name: &str) -> Result<bool, SecretsError> {
        self.0.remove(name)
    }
    fn list(&self) -> Result<Vec<crate::secrets::EntryMeta>, SecretsError> {
        self.0.list()
    }
}

/// A value read from a pipe: UTF-8, one trailing newline (`\n` or `\r\n`)
/// stripped, then the usual value rules. Messages never quote the input.
fn parse_piped(bytes: Vec<u8>) -> anyhow::Result<SecretValue> {
    let mut text = String::from_utf8(bytes)
        .map_err(|_| anyhow::anyhow!("secret value on standard input is not valid UTF-8"))?;
    if text.ends_with("\r\n") {
        text.truncate(text.len() - 2);
    } else if text.ends_with('\n') {
        text.truncate(text.len() - 1);
    }
    let value = SecretValue::new(text);
    validate_value(&value)?;
    Ok(value)
}

fn read_value(name: &str, con: &mut dyn Console) -> anyhow::Result<SecretValue> {
    if con.interactive() {
        let typed = con
            .prompt_secret(&format!("Value for {name} (input hidden): "))
            .context("cannot read the value from the terminal")?;
        parse_piped(typed.into_bytes())
    } else {
        // Room for the limit plus "\r\n", and one byte more to notice excess.
        let bytes = con
            .read_stdin(MAX_VALUE_LEN as u64 + 3)
            .context("cannot read the value from standard input")?;
        if bytes.len() > MAX_VALUE_LEN + 2 {
            return Err(SecretsError::ValueTooLong {
                len: bytes.len(),
                max: MAX_VALUE_LEN,
            }
            .into());
        }
        parse_piped(bytes)
    }
}

/// The value a backend holds for `name`, treating a store that does not
/// exist yet as empty.
fn existing(store: &dyn SecretStore, name: &str) -> Result<Option<SecretValue>, SecretsError> {
    match store.get(name) {
        Err(SecretsError::StoreMissing { .. }) => Ok(None),
        other => other,
    }
}

fn add(
    name: &str,
    source: Source,
    force: bool,
    stores: &Stores,
    global: &Global,
    con: &mut dyn Console,
) -> anyhow::Result<ExitStatus> {
    validate_name(name)?;
    let store = stores.backend(source, global);
    let store_name = stores.store_name();
    let where_ = match source {
        Source::Keychain => "keychain",
        _ => store_name.as_str(),
    };

    if let Some(old) = existing(store.as_ref(), name)? {
        let old_fp = fingerprinter(global)?.fingerprint(old.expose());
        writeln!(
            con.err(),
            "{name} already exists in the {where_} ({old_fp})"
        )?;
        if !force {
            if !con.interactive() {
                writeln!(
                    con.err(),
                    "error: not replacing {name}: pass --replace to replace it without a terminal"
                )?;
                return Ok(ExitStatus::Failure);
            }
            if !con.confirm(&format!("Replace {name} in the {where_}?"))? {
                writeln!(con.err(), "{name} left unchanged")?;
                return Ok(ExitStatus::Failure);
            }
        }
    }

    // Read and check the value before creating anything on disk.
    let value = read_value(name, con)?;
    let fp = fingerprinter(global)?;
    let outcome = store.put(name, &value)?;
    let fingerprint = fp.fingerprint(value.expose());
    let replaced = outcome == PutOutcome::Replaced;

    let doc = Added {
        name,
        backend: store.source().name(),
        fingerprint,
        replaced,
    };
    con.output(global.output).data(&doc, |w| {
        writeln!(
            w,
            "{} {name} in the {where_} ({fingerprint})",
            if replaced { "replaced" } else { "added" }
        )
    })?;

    // Say when the other backend also has the name: `store:` references
    // read the store first, so one of the two values is shadowed.
    let other = match source {
        Source::Keychain => Source::Store,
        _ => Source::Keychain,
    };
    let other_name = match other {
        Source::Keychain => "keychain",
        _ => store_name.as_str(),
    };
    if let Ok(Some(v)) = existing(stores.backend(other, global).as_ref(), name) {
        let (first, second) = if source == Source::Store {
            (where_, other_name)
        } else {
            (other_name, where_)
        };
        writeln!(
            con.err(),
            "note: {name} is also in the {other_name} ({}); `store:` references use the {first} \
             value before the {second} one",
            fp.fingerprint(v.expose())
        )?;
    }
    if source == Source::Keychain {
        writeln!(
            con.err(),
            "note: keychain entries live in the kernel user keyring and are lost at reboot"
        )?;
    }
    Ok(ExitStatus::Success)
}

fn time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// `kt secrets add --output json`.
#[derive(serde::Serialize)]
struct Added<'a> {
    name: &'a str,
    backend: &'static str,
    fingerprint: Fingerprint,
    replaced: bool,
}

/// `kt secrets list --output json`.
#[derive(serde::Serialize)]
struct SecretList {
    secrets: Vec<ListedSecret>,
}

/// One stored secret: never its value.
#[derive(serde::Serialize)]
struct ListedSecret {
    name: String,
    backend: &'static str,
    fingerprint: Option<Fingerprint>,
    present: bool,
    created: String,
    updated: String,
}

/// `kt secrets rm --output json`.
#[derive(serde::Serialize)]
struct Removed<'a> {
    name: &'a str,
    removed: &'a [&'static str],
}

/// `kt secrets status --output json`.
#[derive(serde::Serialize)]
struct StatusDoc<'a> {
    config: &'a std::path::Path,
    ok: bool,
    targets: &'a [crate::secrets::status::TargetStatus],
}

fn list(stores: &Stores, global: &Global, con: &mut dyn Console) -> anyhow::Result<ExitStatus> {
    let fp = fingerprinter(global)?;
    let mut rows = Vec::new();
    let mut code = ExitStatus::Success;
    for store in stores.backends(global) {
        match store.entries() {
            Ok(entries) => {
                for (meta, value) in entries {
                    rows.push((
                        meta,
                        store.source(),
                        value.map(|v| fp.fingerprint(v.expose())),
                    ));
                }
            }
            Err(SecretsError::StoreMissing { .. }) => {}
            Err(e) => {
                writeln!(
                    con.err(),
                    "error: cannot list the {}: {e}",
                    store.source().name()
                )?;
                code = ExitStatus::Failure;
            }
        }
    }
    for (meta, source, fingerprint) in &rows {
        if fingerprint.is_none() {
            writeln!(
                con.err(),
                "warning: {} is listed for the {} but its value is gone (keychain \
                 entries do not survive a reboot); add it again or `kt secrets rm {}`",
                meta.name,
                source.name(),
                meta.name
            )?;
        }
    }

    let doc = SecretList {
        secrets: rows
            .iter()
            .map(|(meta, source, fingerprint)| ListedSecret {
                name: meta.name.clone(),
                backend: source.name(),
                fingerprint: *fingerprint,
                present: fingerprint.is_some(),
                created: time(meta.created),
                updated: time(meta.updated),
            })
            .collect(),
    };
    con.output(global.output).data(&doc, |out| {
        // After a backend error "no secrets" would be wrong; the error said it.
        if rows.is_empty() && code != ExitStatus::Success {
            return Ok(());
        }
        if rows.is_empty() {
            return writeln!(
                out,
                "no secrets stored (data dir {})",
                global.data_dir.display()
            );
        }
        let table: Vec<Vec<String>> = rows
            .iter()
            .map(|(meta, source, fingerprint)| {
                vec![
                    meta.name.clone(),
                    source.name().to_string(),
                    fingerprint.map_or_else(|| "missing".to_string(), |f| f.to_string()),
                    time(meta.created),
                    time(meta.updated),
                ]
            })
            .collect();
        write_table(
            out,
            &["NAME", "BACKEND", "FINGERPRINT", "CREATED", "UPDATED"],
            &table,
        )
    })?;
    Ok(code)
}

fn rm(
    name: &str,
    stores: &Stores,
    global: &Global,
    con: &mut dyn Console,
) -> anyhow::Result<ExitStatus> {
    validate_name(name)?;
    let mut removed = Vec::new();
    let mut failures = Vec::new();
    for store in stores.backends(global) {
        match store.remove(name) {
            Ok(true) => removed.push(store.source().name()),
            Ok(false) | Err(SecretsError::StoreMissing { .. }) => {}
            Err(e) => failures.push(e.to_string()),
        }
    }
    for failure in &failures {
        writeln!(con.err(), "error: {failure}")?;
    }
    let doc = Removed {
        name,
        removed: &removed,
    };
    con.output(global.output).data(&doc, |out| {
        for backend in &removed {
            writeln!(out, "removed {name} from the {backend}")?;
        }
        Ok(())
    })?;
    if !removed.is_empty() {
        return Ok(if failures.is_empty() {
            ExitStatus::Success
        } else {
            ExitStatus::Failure
        });
    }
    if !failures.is_empty() {
        anyhow::bail!("cannot remove {name}");
    }
    writeln!(
        con.err(),
        "error: no secret named {name} in the store or the keychain"
    )?;
    Ok(ExitStatus::Failure)
}

/// Shows a status report (table or JSON on stdout, problems on stderr);
/// failure when a required target does not resolve.
fn write_status(report: &StatusReport, out: &mut Output<'_>) -> io::Result<ExitStatus> {
    let doc = StatusDoc {
        config: &report.config,
        ok: report.ok(),
        targets: &report.targets,
    };
    let now = crate::events::now_ms();
    out.data(&doc, |w| {
        let rows: Vec<Vec<String>> = report
            .targets
            .iter()
            .map(|t| {
                vec![
                    t.id.clone(),
                    t.reference.clone(),
                    if t.required { "yes" } else { "no" }.to_string(),
                    match t.state {
                        TargetState::Resolved => t.source.unwrap_or("?").to_string(),
                        TargetState::Missing => "missing".to_string(),
                        TargetState::Error => "error".to_string(),
                    },
                    match (t.state, t.fingerprint) {
                        (_, Some(f)) => f.to_string(),
                        (TargetState::Resolved, None) => "(no host key yet)".to_string(),
                        _ => "-".to_string(),
                    },
                    t.served_24h.map_or_else(|| "-".into(), |n| n.to_string()),
                    t.last_verified.as_ref().map_or_else(
                        || "never".into(),
                        |p| format!("{} {}", p.result, ago(now, p.time_ms)),
                    ),
                ]
            })
            .collect();
        write_table(
            w,
            &[
                "TARGET",
                "REFERENCE",
                "REQUIRED",
                "RESOLVED",
                "FINGERPRINT",
                "SERVED 24H",
                "LAST VERIFIED",
            ],
            &rows,
        )?;
        write_evidence(w, report, now)
    })?;
    for p in report.problems() {
        let level = if p.required { "error" } else { "warning" };
        out.note(format_args!("{level}: {p}"))?;
    }
    Ok(if report.ok() {
        ExitStatus::Success
    } else {
        ExitStatus::Failure
    })
}

/// Below the status table, per target: its last rotation alarm, a probe
/// that did not pass, and who still presents its key. Nothing when no
/// event store was read.
fn write_evidence(w: &mut dyn Write, report: &StatusReport, now: i64) -> io::Result<()> {
    if report.targets.iter().all(|t| t.served_24h.is_none()) {
        return Ok(());
    }
    writeln!(w)?;
    for t in &report.targets {
        if let Some(a) = &t.last_rotation_alarm {
            let status = a.status.map(|s| format!(" ({s})")).unwrap_or_default();
            let served = a
                .served_by
                .as_deref()
                .map(|s| format!(", served by {s}"))
                .unwrap_or_default();
            writeln!(
                w,
                "{}: rotation alarm {}: {} rejected its key{status}{served}",
                t.id,
                ago(now, a.time_ms),
                a.rejected
            )?;
        }
        if let Some(n) = t.secret_kept_24h.filter(|n| *n > 0) {
            writeln!(
                w,
                "{}: its secret could not be read at {n} reload(s) in the last 24 h; the running kt kept the previous key (see `kt events`)",
                t.id
            )?;
        }
        if let Some(p) = t.last_verified.as_ref().filter(|p| p.result != "ok") {
            writeln!(
                w,
                "{}: last probe {}: {}",
                t.id,
                ago(now, p.time_ms),
                p.message
                    .as_deref()
                    .map_or_else(|| p.result.clone(), super::events::clean)
            )?;
        }
        if t.presented_by.is_empty() {
            writeln!(
                w,
                "{}: no process presented its key in the last 7 days",
                t.id
            )?;
        } else {
            let n: u64 = t.presented_by.iter().map(|p| p.count).sum();
            writeln!(
                w,
                "{}: key presented by {} process(es) in the last 7 days ({n} request(s)):",
                t.id,
                t.presented_by.len()
            )?;
            for p in &t.presented_by {
                writeln!(
                    w,
                    "  {}",
                    super::events::clean(&super::events::process_line(p))
                )?;
            }
        }
    }
    Ok(())
}

/// `42s ago`, `5m ago`, `3h ago`, `2d ago`.
fn ago(now_ms: i64, then_ms: i64) -> String {
    let s = (now_ms.saturating_sub(then_ms) / 1000).max(0);
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86_400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SecretKeyRef;
    use crate::secrets::Resolve;
    use crate::secrets::keychain_test::{TestName, require_keyring};
    use clap::Parser;
    use std::path::Path;

    const KNOWN: &str = "sk-proj-KNOWN-LEAK-CANARY-9f8e7d6c5b4a";

    #[derive(Default)]
    struct Fake {
        interactive: bool,
        stdin: Vec<u8>,
        typed: String,
        answer: bool,
        prompts: Vec<String>,
        out: Vec<u8>,
        err: Vec<u8>,
    }

    impl Fake {
        fn piped(value: &str) -> Fake {
            Fake {
                stdin: value.as_bytes().to_vec(),
                ..Fake::default()
            }
        }
        fn terminal(typed: &str, answer: bool) -> Fake {
            Fake {
                interactive: true,
                typed: typed.to_string(),
                answer,
                ..Fake::default()
            }
        }
        fn out(&self) -> String {
            String::from_utf8(self.out.clone()).unwrap()
        }
        fn err(&self) -> String {
            String::from_utf8(self.err.clone()).unwrap()
        }
    }

    impl Console for Fake {
        fn interactive(&self) -> bool {
            self.interactive
        }
        fn read_stdin(&mut self, limit: u64) -> io::Result<Vec<u8>> {
            Ok(self.stdin.iter().copied().take(limit as usize).collect())
        }
        fn prompt_secret(&mut self, prompt: &str) -> io::Result<String> {
            self.prompts.push(prompt.to_string());
            Ok(self.typed.clone())
        }
        fn confirm(&mut self, question: &str) -> io::Result<bool> {
            self.prompts.push(question.to_string());
            Ok(self.answer)
        }
        fn streams(&mut self) -> (&mut dyn Write, &mut dyn Write) {
            (&mut self.out, &mut self.err)
        }
    }

    fn global(dir: &Path, output: OutputFormat) -> Global {
        Global {
            output,
            data_dir: dir.to_path_buf(),
        }
    }

    fn add_cmd(name: &str, keychain: bool, force: bool) -> SecretsCmd {
        SecretsCmd::Add {
            name: name.to_string(),
            store: !keychain,
            keychain,
            force,
            config: None,
        }
    }

    fn stored(dir: &Path, name: &str) -> Option<String> {
        FileStore::new(dir)
            .get(name)
            .unwrap()
            .map(|v| v.expose().to_string())
    }

    use crate::secrets::status::tests::{config, target};

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        cmd: SecretsCmd,
    }

    #[test]
    fn add_needs_exactly_one_backend_and_takes_no_value_from_argv() {
        assert!(Cli::try_parse_from(["kt", "add", "A"]).is_err());
        assert!(Cli::try_parse_from(["kt", "add", "A", "--store", "--keychain"]).is_err());
        assert!(Cli::try_parse_from(["kt", "add", "A", "--store", "sk-value"]).is_err());
        let parsed = Cli::try_parse_from(["kt", "add", "A", "--keychain", "--force"]).unwrap();
        assert_eq!(parsed.cmd, add_cmd("A", true, true));
        let parsed = Cli::try_parse_from(["kt", "status", "--config", "f.yaml"]).unwrap();
        assert_eq!(
            parsed.cmd,
            SecretsCmd::Status {
                config: "f.yaml".into()
            }
        );
    }

    #[test]
    fn add_list_rm_round_trip_through_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let g = global(dir.path(), OutputFormat::Human);

        let mut con = Fake::piped("sk-round-trip\n");
        assert_eq!(
            run_with(add_cmd("OPENAI_API_KEY_2026Q2", false, false), &g, &mut con).unwrap(),
            ExitStatus::Success
        );
        let fp = Fingerprinter::open(dir.path())
            .unwrap()
            .fingerprint("sk-round-trip");
        assert_eq!(
            con.out(),
            format!("added OPENAI_API_KEY_2026Q2 in the store ({fp})\n")
        );
        assert_eq!(
            stored(dir.path(), "OPENAI_API_KEY_2026Q2").as_deref(),
            Some("sk-round-trip")
        );

        let mut con = Fake::default();
        assert_eq!(
            run_with(SecretsCmd::List { config: None }, &g, &mut con).unwrap(),
            ExitStatus::Success
        );
        let out = con.out();
        let lines: Vec<_> = out.lines().collect();
        assert!(lines[0].starts_with("NAME"), "{out}");
        assert!(
            lines[1].starts_with("OPENAI_API_KEY_2026Q2  store  "),
            "{out}"
        );
        assert!(lines[1].contains(&fp.to_string()), "{out}");

        let mut con = Fake::default();
        let g_json = global(dir.path(), OutputFormat::Json);
        assert_eq!(
            run_with(SecretsCmd::List { config: None }, &g_json, &mut con).unwrap(),
            ExitStatus::Success
        );
        let doc: serde_json::Value = serde_json::from_str(&con.out()).unwrap();
        assert_eq!(doc["secrets"][0]["name"], "OPENAI_API_KEY_2026Q2");
        assert_eq!(doc["secrets"][0]["backend"], "store");
        assert_eq!(doc["secrets"][0]["fingerprint"], fp.to_string());

        let rm = SecretsCmd::Rm {
            name: "OPENAI_API_KEY_2026Q2".into(),
            config: None,
        };
        let mut con = Fake::default();
        assert_eq!(
            run_with(rm.clone(), &g, &mut con).unwrap(),
            ExitStatus::Success
        );
        assert_eq!(con.out(), "removed OPENAI_API_KEY_2026Q2 from the store\n");
        assert_eq!(stored(dir.path(), "OPENAI_API_KEY_2026Q2"), None);

        let mut con = Fake::default();
        assert_eq!(
            run_with(rm, &g, &mut con).unwrap(),
            ExitStatus::Failure,
            "unknown name"
        );
        assert!(
            con.err().contains("no secret named OPENAI_API_KEY_2026Q2"),
            "{}",
            con.err()
        );
    }

    #[test]
    fn rm_of_an_unknown_name_on_a_fresh_machine_is_exit_1() {
        let dir = tempfile::tempdir().unwrap();
        let g = global(&dir.path().join("fresh"), OutputFormat::Human);
        let mut con = Fake::default();
        let rm = SecretsCmd::Rm {
            name: "KT_TEST_NEVER_ADDED_ANYWHERE".into(),
            config: None,
        };
        assert_eq!(run_with(rm, &g, &mut con).unwrap(), ExitStatus::Failure);
    }

    #[test]
    fn exactly_one_trailing_newline_is_stripped() {
        let dir = tempfile::tempdir().unwrap();
        let g = global(dir.path(), OutputFormat::Human);
        run_with(
            add_cmd("CRLF", false, false),
            &g,
            &mut Fake::piped("sk-a\r\n"),
        )
        .unwrap();
        assert_eq!(stored(dir.path(), "CRLF").as_deref(), Some("sk-a"));
        run_with(add_cmd("BARE", false, false), &g, &mut Fake::piped("sk-b")).unwrap();
        assert_eq!(stored(dir.path(), "BARE").as_deref(), Some("sk-b"));
        let err = run_with(
            add_cmd("TWO", false, false),
            &g,
            &mut Fake::piped("sk-c\n\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("line break"), "{err}");
        assert_eq!(stored(dir.path(), "TWO"), None);
    }

    #[test]
    fn empty_values_and_bad_names_are_refused_and_nothing_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let g = global(&data, OutputFormat::Human);
        for empty in ["", "\n", "\r\n"] {
            let err = run_with(add_cmd("EMPTY", false, false), &g, &mut Fake::piped(empty))
                .unwrap_err()
                .to_string();
            assert!(err.contains("empty secret value"), "{empty:?}: {err}");
        }
        let err = run_with(
            add_cmd("EMPTY", false, false),
            &g,
            &mut Fake::terminal("", false),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("empty secret value"), "{err}");
        assert!(!FileStore::new(&data).store_path().exists());

        for bad in ["1ABC", "A-B", "A B", ""] {
            let err = run_with(add_cmd(bad, false, false), &g, &mut Fake::piped("sk-x"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("invalid secret name"), "{bad}: {err}");
        }
        assert!(!data.exists(), "a refused add must not create the data dir");
    }

    #[test]
    fn replacing_asks_on_a_terminal_and_needs_force_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let g = global(dir.path(), OutputFormat::Human);
        run_with(add_cmd("K", false, false), &g, &mut Fake::piped("sk-old")).unwrap();

        let mut con = Fake::piped("sk-new");
        assert_eq!(
            run_with(add_cmd("K", false, false), &g, &mut con).unwrap(),
            ExitStatus::Failure
        );
        assert!(
            con.err().contains("already exists in the store"),
            "{}",
            con.err()
        );
        assert!(con.err().contains("--replace"), "{}", con.err());
        assert_eq!(stored(dir.path(), "K").as_deref(), Some("sk-old"));

        let mut con = Fake::terminal("sk-new", false);
        assert_eq!(
            run_with(add_cmd("K", false, false), &g, &mut con).unwrap(),
            ExitStatus::Failure
        );
        assert_eq!(stored(dir.path(), "K").as_deref(), Some("sk-old"));
        assert!(con.prompts[0].contains("Replace K"), "{:?}", con.prompts);

        let mut con = Fake::terminal("sk-new", true);
        assert_eq!(
            run_with(add_cmd("K", false, false), &g, &mut con).unwrap(),
            ExitStatus::Success
        );
        assert!(con.prompts[1].contains("input hidden"), "{:?}", con.prompts);
        assert!(
            con.out().starts_with("replaced K in the store"),
            "{}",
            con.out()
        );
        assert_eq!(stored(dir.path(), "K").as_deref(), Some("sk-new"));

        let mut con = Fake::piped("sk-newer\n");
        assert_eq!(
            run_with(add_cmd("K", false, true), &g, &mut con).unwrap(),
            ExitStatus::Success
        );
        assert!(con.out().starts_with("replaced K"), "{}", con.out());
        assert_eq!(stored(dir.path(), "K").as_deref(), Some("sk-newer"));
    }

    #[test]
    fn keychain_add_list_rm_and_store_precedence_note() {
        require_keyring();
        let dir = tempfile::tempdir().unwrap();
        let g = global(dir.path(), OutputFormat::Human);
        let t = TestName::new(dir.path(), "CLI");

        let mut con = Fake::piped("sk-in-keychain\n");
        assert_eq!(
            run_with(add_cmd(&t.0, true, false), &g, &mut con).unwrap(),
            ExitStatus::Success
        );
        assert!(
            con.out()
                .starts_with(&format!("added {} in the keychain (fp:", t.0))
        );
        assert!(con.err().contains("lost at reboot"), "{}", con.err());

        let mut con = Fake::piped("sk-in-store\n");
        assert_eq!(
            run_with(add_cmd(&t.0, false, false), &g, &mut con).unwrap(),
            ExitStatus::Success
        );
        assert!(
            con.err().contains("is also in the keychain"),
            "{}",
            con.err()
        );

        let mut con = Fake::default();
        run_with(SecretsCmd::List { config: None }, &g, &mut con).unwrap();
        let rows: Vec<_> = con.out().lines().skip(1).map(str::to_string).collect();
        assert_eq!(rows.len(), 2, "{}", con.out());
        assert!(rows[0].contains(" store "), "{rows:?}");
        assert!(rows[1].contains(" keychain "), "{rows:?}");

        let mut con = Fake::default();
        let rm = SecretsCmd::Rm {
            name: t.0.clone(),
            config: None,
        };
        assert_eq!(run_with(rm, &g, &mut con).unwrap(), ExitStatus::Success);
        assert_eq!(
            con.out(),
            format!(
                "removed {0} from the store\nremoved {0} from the keychain\n",
                t.0
            )
        );
    }

    #[test]
    fn status_renders_the_report_and_exits_1_when_a_required_target_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        store.put("Q2", &SecretValue::new("sk-q2")).unwrap();
        let resolver = Resolver::with_stores(vec![std::sync::Arc::new(store)]);
        let fp = Fingerprinter::from_key([3; 32]);

        let cfg = config(vec![
            target("primary", SecretKeyRef::Store("Q2".into()), true),
            target("backup", SecretKeyRef::Store("Q1".into()), false),
        ]);
        let report = StatusReport::build(&cfg, &resolver, Some(&fp));
        let (mut out, mut err) = (Vec::new(), Vec::new());
        assert_eq!(
            write_status(
                &report,
                &mut Output::new(OutputFormat::Human, &mut out, &mut err)
            )
            .unwrap(),
            ExitStatus::Success
        );
        let out = String::from_utf8(out).unwrap();
        let err = String::from_utf8(err).unwrap();
        assert!(out.lines().next().unwrap().starts_with("TARGET"), "{out}");
        assert!(out.contains("primary  store:Q2"), "{out}");
        assert!(out.contains(&fp.fingerprint("sk-q2").to_string()), "{out}");
        assert_eq!(
            err,
            "warning: target backup: secret store:Q1 is not set; add it with \
             `kt secrets add Q1 --store` (optional target skipped)\n"
        );

        let cfg = config(vec![
            target("primary", SecretKeyRef::Store("Q2".into()), true),
            target("must", SecretKeyRef::Store("Q1".into()), true),
        ]);
        let report = StatusReport::build(&cfg, &resolver, Some(&fp));
        let (mut out, mut err) = (Vec::new(), Vec::new());
        assert_eq!(
            write_status(
                &report,
                &mut Output::new(OutputFormat::Json, &mut out, &mut err)
            )
            .unwrap(),
            ExitStatus::Failure
        );
        let doc: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(doc["ok"], false);
        assert_eq!(doc["targets"][1]["id"], "must");
        assert_eq!(doc["targets"][1]["state"], "missing");
        let err = String::from_utf8(err).unwrap();
        assert!(
            err.starts_with("error: target must: secret store:Q1 is not set"),
            "{err}"
        );
    }

    #[test]
    fn status_is_read_only_and_creates_no_fingerprint_key() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let cfg = dir.path().join("policy.yaml");
        std::fs::write(
            &cfg,
            "providers:\n  targets:\n    - id: a\n      provider: openai\n      secret_key_ref: {env: PATH}\n    - id: b\n      provider: openai\n      secret_key_ref: {store: KT_TEST_NOT_THERE}\n",
        )
        .unwrap();
        let g = global(&data, OutputFormat::Human);
        let mut con = Fake::default();
        let code = run_with(SecretsCmd::Status { config: cfg }, &g, &mut con).unwrap();
        assert_eq!(code, ExitStatus::Failure, "{}", con.err());
        assert!(con.out().contains("(no host key yet)"), "{}", con.out());
        assert!(!data.exists(), "status created {}", data.display());
    }

    #[test]
    fn status_shows_who_still_uses_each_key_and_when_it_was_last_verified() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let store = FileStore::new(&data);
        store.put("Q2", &SecretValue::new("sk-q2-new")).unwrap();
        store.put("Q1", &SecretValue::new("sk-q1-old")).unwrap();
        let cfg = dir.path().join("policy.yaml");
        std::fs::write(
            &cfg,
            "providers:\n  targets:\n    - id: q2\n      provider: openai\n      secret_key_ref: {store: Q2}\n    - id: q1\n      provider: openai\n      required: false\n      secret_key_ref: {store: Q1}\n",
        )
        .unwrap();
        let status = || SecretsCmd::Status {
            config: cfg.clone(),
        };

        // No event store yet: no evidence, no error, nothing created.
        let mut con = Fake::default();
        let code = run_with(status(), &global(&data, OutputFormat::Json), &mut con).unwrap();
        assert_eq!(code, ExitStatus::Success, "{}", con.err());
        let doc: serde_json::Value = serde_json::from_str(&con.out()).unwrap();
        assert_eq!(doc["targets"][1]["served_24h"], serde_json::Value::Null);
        assert_eq!(doc["targets"][1]["presented_by"], serde_json::json!([]));
        assert_eq!(doc["targets"][1]["last_verified"], serde_json::Value::Null);
        assert!(con.err().contains("no event store"), "{}", con.err());
        assert!(!crate::datadir::events_db(&data).exists());

        crate::events::tests::retirement_fixture(&data);
        let mut con = Fake::default();
        let code = run_with(status(), &global(&data, OutputFormat::Human), &mut con).unwrap();
        assert_eq!(code, ExitStatus::Success, "{}", con.err());
        let out = con.out();
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].ends_with("SERVED 24H  LAST VERIFIED"), "{out}");
        assert!(lines[1].starts_with("q2 "), "{out}");
        assert!(lines[1].contains(" store:Q2 "), "{out}");
        assert!(lines[1].contains(" 5 "), "{out}");
        assert!(
            lines[1].ends_with("ok 30m ago") || lines[1].ends_with("ok 29m ago"),
            "{out}"
        );
        assert!(lines[2].contains(" 2 "), "{out}");
        assert!(lines[2].ends_with("rejected 20h ago"), "{out}");
        assert!(
            out.contains("q2: rotation alarm 5h ago: q2 rejected its key (401), served by q1"),
            "{out}"
        );
        // The fallback's row says it is still rescuing traffic.
        assert!(
            out.contains("q1: rotation alarm 5h ago: q2 rejected its key (401), served by q1"),
            "{out}"
        );
        assert!(
            out.contains("q1: last probe 20h ago: probe of target q1: probe-rejected"),
            "{out}"
        );
        assert!(
            out.contains("q2: no process presented its key in the last 7 days"),
            "{out}"
        );
        assert!(
            out.contains("q1: key presented by 2 process(es) in the last 7 days (3 request(s)):"),
            "{out}"
        );
        assert!(out.contains("  /usr/bin/python3[4242] uid 1000"), "{out}");
        assert!(out.contains("  [77] container c0ffee"), "{out}");
        assert!(out.lines().count() <= 12, "one screen:\n{out}");
        assert!(!out.contains("sk-q"), "{out}");

        let mut con = Fake::default();
        run_with(status(), &global(&data, OutputFormat::Json), &mut con).unwrap();
        let doc: serde_json::Value = serde_json::from_str(&con.out()).unwrap();
        let q1 = &doc["targets"][1];
        assert_eq!(q1["served_24h"], 2);
        assert_eq!(q1["presented_by"][0]["pid"], 4242);
        assert_eq!(q1["presented_by"][0]["count"], 2);
        assert_eq!(q1["presented_by"][1]["container_id"], "c0ffee");
        assert_eq!(q1["last_rotation_alarm"]["rejected"], "q2");
        assert_eq!(q1["last_rotation_alarm"]["served_by"], "q1");
        assert_eq!(q1["last_verified"]["result"], "rejected");
        assert_eq!(q1["last_verified"]["status"], 401);
        assert_eq!(doc["targets"][0]["served_24h"], 5);
        assert_eq!(doc["targets"][0]["last_verified"]["result"], "ok");
    }

    /// Adds a known value and searches every output, error, Debug dump and
    /// file for it.
    #[test]
    fn the_value_never_leaks() {
        require_keyring();
        let dir = tempfile::tempdir().unwrap();
        let mut seen = String::new();
        let kc_name = TestName::new(dir.path(), "LEAK");
        for output in [OutputFormat::Human, OutputFormat::Json] {
            let g = global(dir.path(), output);
            let mut run = |cmd: SecretsCmd, mut con: Fake| {
                let result = run_with(cmd.clone(), &g, &mut con);
                seen.push_str(&format!(
                    "{cmd:?}\n{}\n{}\n{:?}\n{}\n",
                    con.out(),
                    con.err(),
                    result,
                    result
                        .as_ref()
                        .map_or_else(|e| format!("{e:#}"), |c| format!("{c:?}"))
                ));
                con.prompts.iter().for_each(|p| seen.push_str(p));
            };
            run(
                add_cmd("LEAKY", false, true),
                Fake::piped(&format!("{KNOWN}\n")),
            );
            run(add_cmd("LEAKY", false, false), Fake::piped(KNOWN));
            run(add_cmd("LEAKY", false, false), Fake::terminal(KNOWN, false));
            run(add_cmd(&kc_name.0, true, true), Fake::piped(KNOWN));
            run(
                add_cmd("BAD1", false, false),
                Fake::piped(&format!("{KNOWN}\nmore")),
            );
            run(
                add_cmd("BAD2", false, false),
                Fake::piped(&format!("{KNOWN}\t")),
            );
            let mut not_utf8 = KNOWN.as_bytes().to_vec();
            not_utf8.push(0xff);
            run(
                add_cmd("BAD3", false, false),
                Fake {
                    stdin: not_utf8,
                    ..Fake::default()
                },
            );
            run(add_cmd("9bad", false, false), Fake::piped(KNOWN));
            run(SecretsCmd::List { config: None }, Fake::default());

            let resolver = Resolver::from_data_dir(dir.path());
            let fp = Fingerprinter::open(dir.path()).unwrap();
            let cfg = config(vec![
                target("a", SecretKeyRef::Store("LEAKY".into()), true),
                target("b", SecretKeyRef::Store(kc_name.0.clone()), true),
            ]);
            let report = StatusReport::build(&cfg, &resolver, Some(&fp));
            assert!(report.ok());
            let (mut out, mut err) = (Vec::new(), Vec::new());
            write_status(&report, &mut Output::new(output, &mut out, &mut err)).unwrap();
            seen.push_str(&format!(
                "{report:?}{resolver:?}{fp:?}{}{}",
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&err)
            ));
            let resolved = resolver
                .resolve(&SecretKeyRef::Store("LEAKY".into()))
                .unwrap()
                .unwrap();
            seen.push_str(&format!("{resolved:?}{:?}", resolver.known_secrets(&fp)));
        }
        // Errors that happen with the value in the store.
        let store = FileStore::new(dir.path());
        let mut bytes = std::fs::read(store.store_path()).unwrap();
        for f in [
            store.dir().join(".lock"),
            Keychain::new(dir.path()).index_path(),
        ] {
            bytes.extend(std::fs::read(f).unwrap());
        }
        let needle = KNOWN.as_bytes();
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "plaintext in a file"
        );
        let mut sealed = std::fs::read(store.store_path()).unwrap();
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        std::fs::write(store.store_path(), sealed).unwrap();
        let g = global(dir.path(), OutputFormat::Json);
        let mut con = Fake::default();
        let code = run_with(SecretsCmd::List { config: None }, &g, &mut con).unwrap();
        assert_eq!(
            code,
            ExitStatus::Failure,
            "a damaged store makes list report a problem"
        );
        seen.push_str(&con.out());
        seen.push_str(&con.err());

        assert!(seen.contains("LEAKY"), "the check looked at real output");
        assert!(seen.contains("fp:"), "the check looked at real output");
        for error in [
            "line break",
            "not valid UTF-8",
            "invalid secret name",
            "--replace",
        ] {
            assert!(seen.contains(error), "the error paths ran: {error}");
        }
        assert!(!seen.contains(KNOWN), "value leaked:\n{seen}");
        assert!(
            !seen.contains(&KNOWN[8..24]),
            "part of the value leaked:\n{seen}"
        );
    }
}
