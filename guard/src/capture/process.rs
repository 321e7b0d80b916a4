//! Who is behind a captured connection: executable, command line, cgroup
//! and container id, read from `/proc/<pid>` right after `accept()`; the
//! parent process, the network namespace when it is not kt's, CI context
//! (a fixed list of variable names from `/proc/<pid>/environ`, never the
//! rest of the environment), and the container's name and image when the
//! runtime's files say so (Docker's `config.v2.json`, Podman's
//! `containers.json`; readable by root only).
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
    /// Container name, from the runtime's files.
    pub container_name: Option<String>,
    /// Container image, from the runtime's files.
    pub container_image: Option<String>,
    /// Parent process id.
    pub ppid: Option<u32>,
    /// Parent's executable path.
    pub parent_exe: Option<String>,
    /// Network namespace (inode of `/proc/<pid>/ns/net`), only when it is
    /// not kt's own.
    pub netns: Option<u64>,
    /// CI context: [`CI_VARS`] found in the process environment, in that
    /// order, values bounded to [`MAX_CI_VALUE`] bytes.
    pub ci: Vec<(String, String)>,
}

/// The only environment variables ever read from a client process: CI job
/// identifiers, never credentials.
pub const CI_VARS: [&str; 7] = [
    "GITHUB_REPOSITORY",
    "GITHUB_WORKFLOW",
    "GITHUB_JOB",
    "GITHUB_RUN_ID",
    "CI_PROJECT_PATH",
    "CI_PIPELINE_ID",
    "CI_JOB_ID",
];

/// Longest CI value kept, in bytes.
pub const MAX_CI_VALUE: usize = 200;

/// Largest runtime file read for a container's name and image.
const MAX_RUNTIME_FILE: u64 = 4 << 20;

/// Where the container runtimes keep their per-container files.
#[derive(Clone, Debug)]
pub struct RuntimeRoots {
    /// Docker's data root (`/var/lib/docker`).
    pub docker: std::path::PathBuf,
    /// Podman's (containers/storage) root (`/var/lib/containers/storage`).
    pub podman: std::path::PathBuf,
}

impl Default for RuntimeRoots {
    fn default() -> Self {
        RuntimeRoots {
            docker: "/var/lib/docker".into(),
            podman: "/var/lib/containers/storage".into(),
        }
    }
}

/// Reads what `/proc` still knows about `pid`.
pub fn process_info(pid: u32) -> ProcessInfo {
    process_info_in(Path::new("/proc"), pid)
}

/// As [`process_info`], with another procfs root (tests).
pub fn process_info_in(proc_root: &Path, pid: u32) -> ProcessInfo {
    process_info_with(proc_root, &RuntimeRoots::default(), pid)
}

/// As [`process_info`], with other procfs and runtime roots (tests).
pub fn process_info_with(proc_root: &Path, runtimes: &RuntimeRoots, pid: u32) -> ProcessInfo {
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
    let (container_name, container_image) = container_id
        .as_deref()
        .map(|id| container_details(runtimes, id))
        .unwrap_or_default();
    let ppid = std::fs::read_to_string(dir.join("status"))
        .ok()
        .and_then(|t| parent_pid(&t));
    let parent_exe = ppid.and_then(|p| {
        std::fs::read_link(proc_root.join(p.to_string()).join("exe"))
            .ok()
            .map(|p| p.display().to_string())
    });
    let netns = ns_inode(&dir.join("ns/net"))
        .filter(|n| Some(*n) != ns_inode(&proc_root.join("self/ns/net")));
    let ci = std::fs::read(dir.join("environ"))
        .map(|b| ci_context(&b))
        .unwrap_or_default();
    ProcessInfo {
        pid,
        exe,
        cmdline,
        cgroup,
        container_id,
        container_name,
        container_image,
        ppid,
        parent_exe,
        netns,
        ci,
    }
}

impl ProcessInfo {
    /// What goes into an event's client beyond exe, command line and cgroup.
    pub fn context(&self) -> crate::record::ClientContext {
        crate::record::ClientContext {
            container_name: self.container_name.clone(),
            container_image: self.container_image.clone(),
            ppid: self.ppid,
            parent_exe: self.parent_exe.clone(),
            netns: self.netns,
            ci: self.ci.iter().cloned().collect(),
        }
    }
}

/// `PPid:` from the text of `/proc/<pid>/status`.
fn parent_pid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse().ok())
        .filter(|p| *p != 0)
}

/// The inode in a namespace link (`net:[4026531840]`).
fn ns_inode(link: &Path) -> Option<u64> {
    let target = std::fs::read_link(link).ok()?;
    let text = target.to_str()?;
    text.split_once('[')?.1.strip_suffix(']')?.parse().ok()
}

/// The [`CI_VARS`] in a NUL-separated environment block, in that order;
/// every other variable is skipped without being kept anywhere.
pub fn ci_context(environ: &[u8]) -> Vec<(String, String)> {
    let mut found: Vec<(String, String)> = Vec::new();
    for entry in environ.split(|b| *b == 0) {
        let Some(eq) = entry.iter().position(|b| *b == b'=') else {
            continue;
        };
        let (name, value) = (&entry[..eq], &entry[eq + 1..]);
        let Some(var) = CI_VARS.iter().find(|v| v.as_bytes() == name) else {
            continue;
        };
        if value.is_empty() || found.iter().any(|(n, _)| n == var) {
            continue;
        }
        let mut v = String::from_utf8_lossy(value).into_owned();
        if v.len() > MAX_CI_VALUE {
            let mut cut = MAX_CI_VALUE;
            while !v.is_char_boundary(cut) {
                cut -= 1;
            }
            v.truncate(cut);
        }
        found.push(((*var).to_string(), v));
    }
    found.sort_by_key(|(n, _)| CI_VARS.iter().position(|v| v == n));
    found
}

/// A container's name and image from its runtime's files: Docker's
/// `containers/<id>/config.v2.json` (`Name`, `Config.Image`), else Podman's
/// `overlay-containers/containers.json` (`names`; its image is an id only).
pub fn container_details(roots: &RuntimeRoots, id: &str) -> (Option<String>, Option<String>) {
    let read = |path: std::path::PathBuf| -> Option<serde_json::Value> {
        use std::io::Read as _;
        let mut text = Vec::new();
        std::fs::File::open(path)
            .ok()?
            .take(MAX_RUNTIME_FILE)
            .read_to_end(&mut text)
            .ok()?;
        serde_json::from_slice(&text).ok()
    };
    let text = |v: Option<&serde_json::Value>| {
        v.and_then(serde_json::Value::as_str)
            .filter(|s| !s.is_empty())
            .map(|s| s.chars().take(MAX_CI_VALUE).collect::<String>())
    };
    if let Some(v) = read(
        roots
            .docker
            .join("containers")
            .join(id)
            .join("config.v2.json"),
    ) {
        let name = text(v.get("Name")).map(|n| n.trim_start_matches('/').to_string());
        let image = text(v.get("Config").and_then(|c| c.get("Image")));
        return (name, image);
    }
    if let Some(serde_json::Value::Array(list)) =
        read(roots.podman.join("overlay-containers/containers.json"))
        && let Some(c) = list
            .iter()
            .find(|c| c.get("id").and_then(serde_json::Value::as_str) == Some(id))
    {
        let name = text(c.get("names").and_then(|n| n.get(0)));
        return (name, None);
    }
    (None, None)
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
    fn only_the_ci_variables_are_taken_from_the_environment() {
        let secret = "sk-proj-SECRETSECRETSECRETSECRET1234";
        let env = format!(
            "PATH=/usr/bin\0OPENAI_API_KEY={secret}\0GITHUB_JOB=test\0CI_JOB_ID=77\0\
             GITHUB_RUN_ID=12345\0GITHUB_JOBX=no\0XGITHUB_JOB=no\0GITHUB_RUN_ID=dup\0\
             CI_PIPELINE_ID=\0GITHUB_WORKFLOW={}\0",
            "w".repeat(500)
        );
        let ci = ci_context(env.as_bytes());
        let names: Vec<&str> = ci.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "GITHUB_WORKFLOW",
                "GITHUB_JOB",
                "GITHUB_RUN_ID",
                "CI_JOB_ID"
            ]
        );
        assert_eq!(ci[2].1, "12345");
        assert_eq!(ci[0].1.len(), MAX_CI_VALUE);
        assert!(!format!("{ci:?}").contains(secret));
    }

    #[test]
    fn container_name_and_image_come_from_the_runtime_files() {
        let dir = tempfile::tempdir().unwrap();
        let roots = RuntimeRoots {
            docker: dir.path().join("docker"),
            podman: dir.path().join("podman"),
        };
        let id = "ab".repeat(32);
        assert_eq!(container_details(&roots, &id), (None, None));
        let c = roots.docker.join("containers").join(&id);
        std::fs::create_dir_all(&c).unwrap();
        std::fs::write(
            c.join("config.v2.json"),
            r#"{"Name":"/ci-job-1","Config":{"Image":"python:3.12","Env":["OPENAI_API_KEY=sk-x"]}}"#,
        )
        .unwrap();
        assert_eq!(
            container_details(&roots, &id),
            (Some("ci-job-1".into()), Some("python:3.12".into()))
        );
        let other = "cd".repeat(32);
        let p = roots.podman.join("overlay-containers");
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(
            p.join("containers.json"),
            format!(r#"[{{"id":"{other}","names":["web"],"image":"1234"}}]"#),
        )
        .unwrap();
        assert_eq!(
            container_details(&roots, &other),
            (Some("web".into()), None)
        );
        assert_eq!(parent_pid("Name:\tx\nPPid:\t42\n"), Some(42));
        assert_eq!(parent_pid("PPid:\t0\n"), None);
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
