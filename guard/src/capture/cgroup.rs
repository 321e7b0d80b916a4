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
