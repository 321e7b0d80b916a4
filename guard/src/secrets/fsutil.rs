//! Private-file helpers shared by the store, the keychain index and the key
//! files: permission checks, atomic writes, exclusive creation, locking.

use std::fs::{self, File};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::SecretsError;
use crate::datadir::{OTHERS_WRITE, check_dirs, check_owner};

/// Permission bits other users must not have on a private file.
const OTHERS_ANY: u32 = 0o077;

/// Creates `dir` (and missing parents) with mode 0700.
pub(crate) fn ensure_dir(dir: &Path) -> Result<(), SecretsError> {
    crate::datadir::create_private_dir(dir)
        .map_err(|e| SecretsError::io("cannot create directory", dir, e))
}

/// `Ok(true)` when `dir` exists and only its owner can change it.
pub(crate) fn check_dir(dir: &Path) -> Result<bool, SecretsError> {
    match fs::metadata(dir) {
        Ok(m) if !m.is_dir() => Err(SecretsError::io(
            "not a directory:",
            dir,
            std::io::Error::from(ErrorKind::NotADirectory),
        )),
        Ok(m) if m.mode() & OTHERS_WRITE != 0 => Err(SecretsError::InsecurePermissions {
            what: "secrets directory",
            path: dir.to_path_buf(),
            mode: m.mode() & 0o7777,
            fix: "700",
        }),
        Ok(_) => {
            check_dirs(dir, dir)?;
            Ok(true)
        }
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(SecretsError::io("cannot inspect", dir, e)),
    }
}

/// Reads a private file; `Ok(None)` when it does not exist. Refuses a file
/// that other users can read or write: a key or store that leaked once is
/// not safe to keep using silently.
pub(crate) fn read_private(
    path: &Path,
    what: &'static str,
    max: u64,
) -> Result<Option<Vec<u8>>, SecretsError> {
    // The directories first: also before a key is created in them.
    match fs::metadata(parent(path)) {
        Ok(_) => check_dirs(parent(path), path)?,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(SecretsError::io("cannot inspect", parent(path), e)),
    }
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(SecretsError::io("cannot open", path, e)),
    };
    let meta = file
        .metadata()
        .map_err(|e| SecretsError::io("cannot inspect", path, e))?;
    if !meta.is_file() {
        return Err(SecretsError::io(
            "not a regular file:",
            path,
            std::io::Error::from(ErrorKind::InvalidInput),
        ));
    }
    if meta.mode() & OTHERS_ANY != 0 {
        return Err(SecretsError::InsecurePermissions {
            what,
            path: path.to_path_buf(),
            mode: meta.mode() & 0o7777,
            fix: "600",
        });
    }
    check_owner(path, path, &meta, "")?;
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| SecretsError::io("cannot read", path, e))?;
    if bytes.len() as u64 > max {
        return Err(SecretsError::io(
            "file too large:",
            path,
            std::io::Error::from(ErrorKind::FileTooLarge),
        ));
    }
    Ok(Some(bytes))
}

/// Writes a fresh 0600 temporary file next to `path` and returns its name.
fn write_temp(path: &Path, bytes: &[u8]) -> Result<PathBuf, SecretsError> {
    let dir = parent(path);
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let suffix = u64::from_le_bytes(random::<8>("a temporary file name")?);
    let tmp = dir.join(format!(
        ".{file_name}.tmp-{}-{suffix:016x}",
        std::process::id()
    ));
    let mut file = crate::datadir::create_private_file(&tmp)
        .map_err(|e| SecretsError::io("cannot create", &tmp, e))?;
    let written = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| SecretsError::io("cannot write", &tmp, e));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(tmp)
}

fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Flushes a directory entry change (rename, link) to disk.
fn sync_dir(dir: &Path) -> Result<(), SecretsError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| SecretsError::io("cannot sync directory", dir, e))
}

/// Replaces `path` atomically: write a temporary file, fsync it, rename it
/// over `path`, fsync the directory. A crash leaves the old or the new file,
/// never a torn one.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), SecretsError> {
    let tmp = write_temp(path, bytes)?;
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(SecretsError::io("cannot replace", path, e));
    }
    sync_dir(parent(path))
}

/// Creates `path` with `bytes` unless it exists; `Ok(false)` when another
/// process got there first. A hard link never replaces an existing file, so
/// two first uses racing end up sharing one key.
pub(crate) fn create_exclusive(path: &Path, bytes: &[u8]) -> Result<bool, SecretsError> {
    let tmp = write_temp(path, bytes)?;
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            sync_dir(parent(path))?;
            Ok(true)
        }
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(SecretsError::io("cannot create", path, e)),
    }
}

/// Takes the writers' lock of a secrets directory (released on drop).
pub(crate) fn lock(dir: &Path) -> Result<File, SecretsError> {
    let path = dir.join(".lock");
    let file = crate::datadir::open_private_file(&path)
        .map_err(|e| SecretsError::io("cannot open lock file", &path, e))?;
    file.lock()
        .map_err(|e| SecretsError::io("cannot lock", &path, e))?;
    Ok(file)
}

/// `N` random bytes from the kernel.
pub(crate) fn random<const N: usize>(what: &'static str) -> Result<[u8; N], SecretsError> {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf).map_err(|e| SecretsError::Random {
        what,
        detail: e.to_string(),
    })?;
    Ok(buf)
}

/// Loads a 32-byte key file, creating it on first use when `create` is set.
/// `Ok(None)` when it does not exist and `create` is false.
pub(crate) fn load_key(
    path: &Path,
    what: &'static str,
    create: bool,
) -> Result<Option<[u8; 32]>, SecretsError> {
    loop {
        if let Some(bytes) = read_private(path, what, 32)? {
            let len = bytes.len() as u64;
            return <[u8; 32]>::try_from(bytes.as_slice())
                .map(Some)
                .map_err(|_| SecretsError::BadKeyFile {
                    path: path.to_path_buf(),
                    len,
                });
        }
        if !create {
            return Ok(None);
        }
        let key = random::<32>(what)?;
        if create_exclusive(path, &key)? {
            return Ok(Some(key));
        }
        // Lost a creation race: read the winner's key.
    }
}

/// Seconds since the epoch (0 for times before it).
pub(crate) fn to_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The time `secs` after the epoch.
pub(crate) fn from_secs(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datadir::UnsafePath;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "temporary files left behind");
    }

    #[test]
    fn key_is_created_once_and_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        assert_eq!(load_key(&path, "key file", false).unwrap(), None);
        let a = load_key(&path, "key file", true).unwrap().unwrap();
        let b = load_key(&path, "key file", true).unwrap().unwrap();
        assert_eq!(a, b);
        fs::write(&path, b"short").unwrap();
        let err = load_key(&path, "key file", true).unwrap_err().to_string();
        assert!(err.contains("damaged"), "{err}");
    }

    /// Chowning to another uid needs root; the tests that do run as root
    /// here (like the capture tests) and say so when they cannot.
    fn as_root() -> bool {
        let root = rustix::process::geteuid().is_root();
        if !root {
            eprintln!("not root: skipping the part that chowns a file to another uid");
        }
        root
    }

    #[test]
    fn files_and_directories_of_another_uid_are_refused_with_the_chown_fix() {
        if !as_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let key = load_key(&path, "key file", true).unwrap().unwrap();
        std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
        let err = load_key(&path, "key file", true).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("belongs to uid 65534"), "{text}");
        assert!(
            text.contains(&format!("`chown 0 {}`", path.display())),
            "{text}"
        );
        assert!(
            matches!(err, SecretsError::Untrusted(UnsafePath::Owner { .. })),
            "{err:?}"
        );

        // A directory above owned by someone else: they could swap the file.
        std::os::unix::fs::chown(&path, Some(0), None).unwrap();
        assert_eq!(load_key(&path, "key file", false).unwrap(), Some(key));
        std::os::unix::fs::chown(dir.path(), Some(65534), None).unwrap();
        let text = load_key(&path, "key file", false).unwrap_err().to_string();
        assert!(
            text.contains(&format!("`chown 0 {}`", dir.path().display())),
            "{text}"
        );
        std::os::unix::fs::chown(dir.path(), Some(0), None).unwrap();
    }

    #[test]
    fn files_under_a_directory_others_can_write_are_refused_unless_sticky() {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        let secrets = shared.join("secrets");
        ensure_dir(&secrets).unwrap();
        let key = secrets.join("k");
        load_key(&key, "key file", true).unwrap().unwrap();
        assert!(check_dir(&secrets).unwrap());

        fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).unwrap();
        let err = load_key(&key, "key file", false).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&key.display().to_string()), "{text}");
        assert!(
            text.contains(&format!("`chmod go-w {}`", shared.display())),
            "{text}"
        );
        assert!(
            matches!(err, SecretsError::Untrusted(UnsafePath::WritableDir { .. })),
            "{err:?}"
        );
        assert!(check_dir(&secrets).is_err());
        // Nor is a new key created there.
        let fresh = secrets.join("fresh");
        assert!(load_key(&fresh, "key file", true).is_err());
        assert!(!fresh.exists());

        // Sticky (like /tmp): others cannot rename what is not theirs.
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(load_key(&key, "key file", false).unwrap().is_some());
        assert!(check_dir(&secrets).unwrap());
    }

    #[test]
    fn group_readable_files_are_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        write_atomic(&path, b"x").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let err = read_private(&path, "key file", 10).unwrap_err().to_string();
        assert!(
            err.contains(&format!("chmod 600 {}", path.display())),
            "{err}"
        );
        assert!(err.contains("0640"), "{err}");
    }
}
