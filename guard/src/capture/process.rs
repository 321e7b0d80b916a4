//! Who is behind a captured connection: executable, command line, cgroup
//! and container id, read from `/proc/<pid>` right after `accept()`.
//!
//! The pid comes from the kernel (the connect hook's tgid), never from the
//! process itself. A process that exited before we looked still has its
//! pid, uid and cgroup id from the hook; the rest is then `None`.

use std::path::Path;

use serde::Serialize;

/// Longest command line kept, in bytes (it goes into every event).
pub const MAX_CMDLINE: usize = 512;

/// Facts about the client process of a captured connection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ProcessInfo {
    /// Process id (thread group id).
    pub pid: u32,
    /// Executable path (`/proc/<pid>/exe`).
    pub exe: Option<String>,
    /// Command line, arguments joined by spaces, bounded to `MAX_CMDLINE`,
    /// with credential-looking arguments masked.
    pub cmdline: Option<String>,
    /// cgroup-v2 path (`0::/...` in `/proc/<pid>/cgroup`).
    pub cgroup: Option<String>,
    /// Container id, when the cgroup path shows one.
    pub container_id: Option<String>,
}

/// Reads what `/proc` still knows about `pid`.
pub fn process_info(pid: u32) -> ProcessInfo {
    process_info_in(Path::new("/proc"), pid)
}

/// As [`process_info`], with another procfs root (tests).
pub fn process_info_in(proc_root: &Path, pid: u32) -> ProcessInfo {
    let dir = proc_root.join(pid.to_string());
    let exe = std::fs::read_link(dir.join("exe"))
        .ok()
        .map(|p| p.display().to_string());
    let cmdline = std::fs::read(dir.join("cmdline"))
        .ok()
        .filter(|b| !b.is_empty())
        .map(|b| format_cmdline(&b));
    let cgroup = std::fs::read_to_string(dir.join("cgroup"))
        .ok()
        .and_then(|t| cgroup_v2_path(&t));
    let container_id = cgroup.as_deref().and_then(container_id);
    ProcessInfo {
        pid,
        exe,
        cmdline,
        cgroup,
        container_id,
    }
}

/// The cgroup-v2 path from the text of `/proc/<pid>/cgroup`.
pub fn cgroup_v2_path(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

/// A container id (64 hex digits) in a cgroup path, as Docker, containerd,
/// CRI-O and Podman name their scopes.
pub fn container_id(cgroup_path: &str) -> Option<String> {
    cgroup_path.rsplit('/').find_map(|segment| {
        let s = segment.strip_suffix(".scope").unwrap_or(segment);
        let id = s.rsplit(['-', ':']).next().unwrap_or(s);
        (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_string())
    })
}

/// Joins NUL-separated arguments, masks credential-looking ones and bounds
/// the result.
pub fn format_cmdline(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut out = String::new();
    for arg in text.split('\0').filter(|a| !a.is_empty()) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&mask_arg(arg));
        if out.len() > MAX_CMDLINE {
            break;
        }
    }
    if out.len() > MAX_CMDLINE {
        let mut cut = MAX_CMDLINE;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    out
}

/// Command lines are recorded in events, and people do pass keys in argv
/// (`curl -H "Authorization: Bearer sk-..."`): mask every long token that
/// looks like a credential, keeping the argument's shape.
fn mask_arg(arg: &str) -> String {
    let mut out = String::with_capacity(arg.len());
    let mut token = String::new();
    let flush = |token: &mut String, out: &mut String| {
        if looks_like_secret(token) {
            out.push_str("[masked]");
        } else {
            out.push_str(token);
        }
        token.clear();
    };
    for c in arg.chars() {
        if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+' | '/' | '=') {
            token.push(c);
        } else {
            flush(&mut token, &mut out);
            out.push(c);
        }
    }
    flush(&mut token, &mut out);
    out
}

fn looks_like_secret(token: &str) -> bool {
    const PREFIXES: [&str; 12] = [
        "sk-",
        "sk_",
        "rk_",
        "AKIA",
        "ASIA",
        "ghp_",
        "gho_",
        "ghs_",
        "github_pat_",
        "xox",
        "AIza",
        "eyJ",
    ];
    if token.len() < 16 || token.starts_with('/') {
        return false;
    }
    if PREFIXES.iter().any(|p| token.starts_with(p)) {
        return true;
    }
    // Long mixed tokens (random keys) but not paths or words.
    let digits = token.bytes().filter(u8::is_ascii_digit).count();
    let upper = token.bytes().filter(u8::is_ascii_uppercase).count();
    let lower = token.bytes().filter(u8::is_ascii_lowercase).count();
    token.len() >= 32 && digits > 0 && upper > 0 && lower > 0 && !token.contains('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = process_info(std::process::id());
        assert!(me.exe.is_some());
        assert!(me.cmdline.is_some());
        assert!(me.cgroup.is_some());
        let gone = process_info_in(Path::new("/nonexistent-proc"), 1);
        assert_eq!(
            gone,
            ProcessInfo {
                pid: 1,
                ..ProcessInfo::default()
            }
        );
    }

    #[test]
    fn finds_container_ids_in_common_scope_names() {
        let id = "a".repeat(32) + &"0123456789".repeat(3) + "ff";
        assert_eq!(id.len(), 64);
        for path in [
            format!("/system.slice/docker-{id}.scope"),
            format!("/docker/{id}"),
            format!("/kubepods.slice/kubepods-pod1.slice/cri-containerd-{id}.scope"),
            format!("/machine.slice/libpod-{id}.scope"),
        ] {
            assert_eq!(container_id(&path).as_deref(), Some(id.as_str()), "{path}");
        }
        assert_eq!(
            container_id("/user.slice/user-1000.slice/session-2.scope"),
            None
        );
        assert_eq!(
            cgroup_v2_path("1:cpu:/\n0::/kt/job-1\n").as_deref(),
            Some("/kt/job-1")
        );
    }

    #[test]
    fn command_lines_are_bounded_and_mask_keys() {
        let key = ["sk-proj-", "AbCdEfGhIjKlMnOpQrStUvWx1234"].concat();
        let raw =
            format!("curl\0-H\0Authorization: Bearer {key}\0https://api.openai.com/v1/models\0");
        let line = format_cmdline(raw.as_bytes());
        assert!(!line.contains(&key), "{line}");
        assert!(line.contains("Authorization: Bearer [masked]"), "{line}");
        assert!(line.contains("https://api.openai.com/v1/models"), "{line}");
        let long = "x ".repeat(2000);
        assert!(format_cmdline(long.replace(' ', "\0").as_bytes()).len() <= MAX_CMDLINE + 3);
    }
}
