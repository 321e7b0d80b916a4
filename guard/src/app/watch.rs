//! Notices secrets changing on disk: the secret store file (`kt secrets
//! add/rm` on a running host) and every `secret_key_ref.file`. It polls
//! their metadata once a second rather than using inotify: a Kubernetes
//! secret volume or Vault Agent replaces a file by swapping a symlink or
//! renaming over it, which a watch on the old inode misses, while a
//! `stat` through the path always sees the current file. A change
//! re-resolves every secret (the config being served stays).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::reload::{Reloader, Trigger};

/// How often the files are looked at.
pub const POLL_EVERY: Duration = Duration::from_secs(1);

/// What identifies one version of a file: absent, or inode, size, times.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stamp(Option<(u64, u64, u64, i64, i64, i64, i64)>);

async fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt as _;
    Stamp(tokio::fs::metadata(path).await.ok().map(|m| {
        (
            m.dev(),
            m.ino(),
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
        )
    }))
}

/// The files whose change means a secret may have changed.
fn watched(data_dir: &Path, reloader: &Reloader) -> Vec<PathBuf> {
    let mut files = vec![crate::secrets::FileStore::new(data_dir).store_path()];
    files.extend(reloader.secret_files());
    files
}

/// Reloads the secrets whenever a watched file changes, until `stop`.
pub(crate) async fn watch_secrets(
    reloader: Arc<Reloader>,
    data_dir: PathBuf,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut seen: HashMap<PathBuf, Stamp> = HashMap::new();
    for f in watched(&data_dir, &reloader) {
        let st = stamp(&f).await;
        seen.insert(f, st);
    }
    loop {
        tokio::select! {
            () = &mut stop => return,
            () = tokio::time::sleep(POLL_EVERY) => {}
        }
        // Looked up every round: a reload may reference other files.
        let files = watched(&data_dir, &reloader);
        seen.retain(|f, _| files.contains(f));
        let mut changed = Vec::new();
        for f in files {
            let now = stamp(&f).await;
            // Stamped before the reload reads it: a change during the
            // reload is caught on the next round.
            match seen.insert(f.clone(), now.clone()) {
                Some(old) if old != now => changed.push(f.display().to_string()),
                // Newly referenced: the reload that referenced it read it.
                _ => {}
            }
        }
        if changed.is_empty() {
            continue;
        }
        tracing::info!(files = %changed.join(", "), "secret files changed: re-resolving secrets");
        let _ = reloader.reload(Trigger::SecretsChanged).await;
    }
}

/// Reads the central secret store again every `secrets.store.refresh`
/// (off the async workers: the client blocks) and reloads the secrets when
/// a value changed, appeared, went away, or passed `max_stale`. Says when
/// the store goes down and comes back (log, metrics); values stay in
/// memory.
pub(crate) async fn watch_store(
    reloader: Arc<Reloader>,
    resolver: Arc<crate::secrets::Resolver>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    every: Duration,
    stop: impl Future<Output = ()>,
) {
    let Some(vault) = resolver.vault().cloned() else {
        return;
    };
    tokio::pin!(stop);
    // Said once per distinct problem, not once per refresh.
    let mut last_problem: Option<String> = None;
    loop {
        tokio::select! {
            () = &mut stop => return,
            () = tokio::time::sleep(every) => {}
        }
        let config = reloader.config();
        let r = Arc::clone(&resolver);
        let Ok(Some(refreshed)) = tokio::task::spawn_blocking(move || r.refresh(&config)).await
        else {
            continue;
        };
        let health = vault.health();
        if let Some(m) = &metrics {
            m.set_secret_store(&health);
        }
        match (&refreshed.problem, &last_problem) {
            (Some(problem), before) if before.as_ref() != Some(problem) => {
                tracing::warn!(
                    store = %health.address,
                    stale = %health.stale.join(", "),
                    "secret store refresh failed, serving the last good values until max_stale: {problem}"
                );
                if before.is_none() {
                    reloader.record_secret_store(
                        crate::record::rules::SECRET_STORE_DOWN,
                        &format!(
                            "{}: serving the last good values until max_stale: {problem}",
                            health.address
                        ),
                    );
                }
            }
            (None, Some(_)) => {
                tracing::info!(store = %health.address, "secret store reachable again");
                reloader.record_secret_store(
                    crate::record::rules::SECRET_STORE_UP,
                    &format!("{}: reachable again", health.address),
                );
            }
            _ => {}
        }
        last_problem.clone_from(&refreshed.problem);
        if !health.expired.is_empty()
            && refreshed
                .expiry_changed
                .iter()
                .any(|n| health.expired.contains(n))
        {
            reloader.record_secret_store(
                crate::record::rules::SECRET_STORE_EXPIRED,
                &format!(
                    "{}: past max_stale, no longer served (targets fail closed): {}",
                    health.address,
                    health.expired.join(", ")
                ),
            );
        }
        if !refreshed.expiry_changed.is_empty() {
            tracing::error!(
                store = %health.address,
                names = %refreshed.expiry_changed.join(", "),
                expired = %health.expired.join(", "),
                "secret store values passed max_stale or came back"
            );
        }
        if refreshed.needs_reload() {
            tracing::info!(names = %refreshed.changed.join(", "), "secret store values changed: re-resolving secrets");
            let _ = reloader.reload(Trigger::StoreChanged).await;
        }
    }
}
