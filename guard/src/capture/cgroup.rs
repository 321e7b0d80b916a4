//! Finding the cgroup-v2 mount.

use std::path::{Path, PathBuf};

/// Errors locating cgroup v2.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// /proc/mounts could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The mounts file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Mounting a bpffs failed.
    #[error("cannot mount a bpffs on {path}: {source}")]
    BpffsMount {
        /// The mount point.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No cgroup2 file system is mounted.
    #[error("no cgroup2 file system is mounted (see {path}); capture needs cgroup v2")]
    NotMounted {
        /// The mounts file that was searched.
        path: PathBuf,
    },
}

/// The mount point of the cgroup-v2 hierarchy, from `/proc/mounts`.
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let path = Path::new("/proc/mounts");
    let text = std::fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    cgroup2_mount_in(&text).ok_or_else(|| CgroupError::NotMounted {
        path: path.to_path_buf(),
    })
}

/// Finds the first `cgroup2` mount point in the text of a mounts file.
pub fn cgroup2_mount_in(mounts: &str) -> Option<PathBuf> {
    mount_of_type(mounts, "cgroup2")
}

/// The first bpffs mount (where links can be pinned), if any.
pub fn bpffs_mount() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/mounts").ok()?;
    mount_of_type(&text, "bpf")
}

/// Where systemd mounts the BPF file system, and where kt mounts one when
/// none is mounted.
pub const BPFFS_DEFAULT: &str = "/sys/fs/bpf";

/// The first bpffs mount, mounting one at [`BPFFS_DEFAULT`] first when none
/// is mounted (as systemd does at boot), so capture links can be pinned and
/// outlive kt. The bool says whether this call mounted it. The mount stays
/// after kt exits: pins must outlive the process.
pub fn ensure_bpffs() -> Result<(PathBuf, bool), CgroupError> {
    if let Some(p) = bpffs_mount() {
        return Ok((p, false));
    }
    let path = PathBuf::from(BPFFS_DEFAULT);
    let err = |source| CgroupError::BpffsMount {
        path: path.clone(),
        source,
    };
    if !path.is_dir() {
        std::fs::create_dir_all(&path).map_err(err)?;
    }
    mount_bpffs(&path).map_err(err)?;
    Ok((path, true))
}

/// `mount -t bpf bpf PATH -o mode=0700`: pins readable by root only.
fn mount_bpffs(path: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let target = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let (source, fstype, data) = (c"bpf", c"bpf", c"mode=0700");
    // SAFETY: NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn mount_of_type(mounts: &str, wanted: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_dev, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == wanted).then(|| PathBuf::from(unescape_mount_path(dir)))
    })
}

/// /proc/mounts escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_and_unified_mounts() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_mount_in(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(
            cgroup2_mount_in(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(cgroup2_mount_in("proc /proc proc rw 0 0\n"), None);
        assert_eq!(
            cgroup2_mount_in("none /a\\040b cgroup2 rw 0 0"),
            Some(PathBuf::from("/a b"))
        );
    }
}
