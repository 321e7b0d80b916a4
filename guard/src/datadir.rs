//! The data dir: where kt keeps its local CA, secret store, fingerprint key
//! and event store, and the one way to create private files and directories
//! in it (files 0600, directories 0700, never briefly wider).
//!
//! ```text
//! <data_dir>/                       0700
//!   ca/ca.pem, ca/ca.key            the local CA (key 0600)
//!   fingerprint.key                 per-host HMAC key for fingerprints (0600)
//!   secrets/                        the encrypted file store and keychain index
//!   events.db                       the event store (SQLite, 0600)
//! ```
//!
//! Default: `/var/lib/kt` as root, else `$XDG_DATA_HOME/kt` or
//! `~/.local/share/kt` ([`default_dir`]).
#![forbid(unsafe_code)]

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The local CA's directory name inside the data dir.
pub const CA_DIR: &str = "ca";
/// The secret store's directory name inside the data dir.
pub const SECRETS_DIR: &str = "secrets";
/// The fingerprint key's file name inside the data dir.
pub const FINGERPRINT_KEY_FILE: &str = "fingerprint.key";
/// The event store's file name inside the data dir.
pub const EVENTS_DB_FILE: &str = "events.db";

/// The default data dir: `/var/lib/kt` as root, else `$XDG_DATA_HOME/kt`
/// or `~/.local/share/kt` (`.kt` when neither is set).
pub fn default_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/lib/kt");
    }
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("kt");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home).join(".local/share/kt");
    }
    PathBuf::from(".kt")
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // geteuid is not in std; the owner of /proc/self is the effective uid.
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The local CA's directory.
pub fn ca_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(CA_DIR)
}

/// The secret store's directory.
pub fn secrets_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(SECRETS_DIR)
}

/// The fingerprint key file.
pub fn fingerprint_key(data_dir: &Path) -> PathBuf {
    data_dir.join(FINGERPRINT_KEY_FILE)
}

/// The event store's database file.
pub fn events_db(data_dir: &Path) -> PathBuf {
    data_dir.join(EVENTS_DB_FILE)
}

/// Creates `dir` and its missing parents with mode 0700. Directories that
/// already exist keep their mode.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Creates a new file with mode 0600 for writing; fails with
/// `AlreadyExists` when there is one (so a concurrent creator loses cleanly
/// and a key is never briefly readable by others).
pub fn create_private_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// Makes sure `path` exists, creating it empty with mode 0600 when not; an
/// existing file is left as it is.
pub fn ensure_private_file(path: &Path) -> io::Result<()> {
    match create_private_file(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Opens `path` for reading and writing, creating it with mode 0600 when
/// missing, never truncating (lock files).
pub fn open_private_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
}

/// Why a private file, or a directory above it, cannot be trusted: someone
/// other than kt's uid and root could replace or rewrite it. Messages name
/// the file kt was about to use, the unsafe path, and the exact command
/// that fixes it.
#[derive(Debug, thiserror::Error)]
pub enum UnsafePath {
    /// The file or a directory above it belongs to another uid.
    #[error(
        "refusing {file}: {path} belongs to uid {owner}, not to kt's uid {uid} or root; \
         fix it with `chown {uid} {path}`{hint}"
    )]
    Owner {
        /// The file kt was about to use.
        file: PathBuf,
        /// The file itself or a directory above it.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// kt's effective uid.
        uid: u32,
        /// Extra advice when the path is a parent directory.
        hint: &'static str,
    },
    /// A directory on the way that other users can write to, without the
    /// sticky bit: they could rename the file away and put their own there.
    #[error(
        "refusing {file}: directory {path} is writable by other users (mode {mode:04o}), \
         who could replace what is inside; fix it with `chmod go-w {path}`{hint}"
    )]
    WritableDir {
        /// The file kt was about to use.
        file: PathBuf,
        /// The directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
        /// Extra advice when the path is a parent directory.
        hint: &'static str,
    },
    /// A file other users can write to.
    #[error(
        "refusing {file}: it is writable by other users (mode {mode:04o}); \
         fix it with `chmod go-w {file}`"
    )]
    WritableFile {
        /// The file.
        file: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A directory above the file could not be inspected.
    #[error("refusing {file}: cannot inspect {path}: {source}")]
    Io {
        /// The file kt was about to use.
        file: PathBuf,
        /// The path that could not be inspected.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// Advice for a parent directory the user may not want to change.
const PARENT_HINT: &str = ", or choose a data dir (--data-dir / KT_DATA_DIR) whose parents \
                           only kt's uid or root can change";

/// The uid whose files kt trusts besides root's.
fn own_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Refuses `meta` (of `path`, on the way to `file`) when it belongs to
/// neither kt's uid nor root.
pub(crate) fn check_owner(
    file: &Path,
    path: &Path,
    meta: &fs::Metadata,
    hint: &'static str,
) -> Result<(), UnsafePath> {
    let uid = own_uid();
    if meta.uid() == uid || meta.uid() == 0 {
        return Ok(());
    }
    Err(UnsafePath::Owner {
        file: file.to_path_buf(),
        path: path.to_path_buf(),
        owner: meta.uid(),
        uid,
        hint,
    })
}

/// Refuses a file (`meta` from its open handle) that another uid owns or
/// that others could write to.
pub(crate) fn check_file(file: &Path, meta: &fs::Metadata) -> Result<(), UnsafePath> {
    check_owner(file, file, meta, "")?;
    if meta.mode() & OTHERS_WRITE != 0 {
        return Err(UnsafePath::WritableFile {
            file: file.to_path_buf(),
            mode: meta.mode() & 0o7777,
        });
    }
    Ok(())
}

/// Checks `dir` and every directory above it (symlinks resolved) before
/// `file` inside it is used: each must belong to kt's uid or root and must
/// not be writable by group or others unless sticky (like /tmp). Otherwise
/// another user could swap a key, the store or the CA for their own,
/// whatever the files' own modes say.
pub(crate) fn check_dirs(dir: &Path, file: &Path) -> Result<(), UnsafePath> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| UnsafePath::Io {
            file: file.to_path_buf(),
            path,
            source,
        }
    };
    let real = fs::canonicalize(dir).map_err(io(dir))?;
    for (depth, d) in real.ancestors().enumerate() {
        let meta = fs::metadata(d).map_err(io(d))?;
        let hint = if depth == 0 { "" } else { PARENT_HINT };
        check_owner(file, d, &meta, hint)?;
        let mode = meta.mode();
        if mode & OTHERS_WRITE != 0 && mode & STICKY == 0 {
            return Err(UnsafePath::WritableDir {
                file: file.to_path_buf(),
                path: d.to_path_buf(),
                mode: mode & 0o7777,
                hint,
            });
        }
    }
    Ok(())
}

/// Permission bits other users must not have on a private directory.
pub(crate) const OTHERS_WRITE: u32 = 0o022;
/// The sticky bit: in such a directory only an entry's owner may rename it.
const STICKY: u32 = 0o1000;

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn dirs_are_0700_files_0600_and_existing_files_are_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("a/b");
        create_private_dir(&data).unwrap();
        assert_eq!(mode(&data), 0o700);
        assert_eq!(mode(&tmp.path().join("a")), 0o700);

        let db = events_db(&data);
        ensure_private_file(&db).unwrap();
        assert_eq!(mode(&db), 0o600);
        fs::write(&db, b"kept").unwrap();
        ensure_private_file(&db).unwrap();
        assert_eq!(fs::read(&db).unwrap(), b"kept");

        let key = fingerprint_key(&data);
        create_private_file(&key).unwrap();
        assert_eq!(mode(&key), 0o600);
        let again = create_private_file(&key).unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::AlreadyExists);

        let lock = secrets_dir(&data).join(".lock");
        create_private_dir(&secrets_dir(&data)).unwrap();
        open_private_file(&lock).unwrap();
        assert_eq!(mode(&lock), 0o600);
    }

    #[test]
    fn paths_are_under_the_data_dir() {
        let d = Path::new("/d");
        assert_eq!(ca_dir(d), Path::new("/d/ca"));
        assert_eq!(secrets_dir(d), Path::new("/d/secrets"));
        assert_eq!(fingerprint_key(d), Path::new("/d/fingerprint.key"));
        assert_eq!(events_db(d), Path::new("/d/events.db"));
    }
}
