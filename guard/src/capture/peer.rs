//! Who is behind a connection to kt's own explicit listener: the kernel's
//! socket table (`/proc/net/tcp`, `/proc/net/tcp6`) names the uid and the
//! socket inode of the client end, and the process holding that inode is
//! found under `/proc/<pid>/fd`. Blocking and bounded in time; the gateway
//! calls it off its async workers. No `unsafe`, no eBPF: it works for
//! `kt gateway run` too.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use super::process::process_info_in;

/// Longest time spent looking for the process that holds a socket.
const FD_SCAN_BUDGET: Duration = Duration::from_millis(300);

/// The client process of a loopback connection to kt.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerProcess {
    /// Its user id (from the socket table: always known when found).
    pub uid: u32,
    /// Its process id, when found in time.
    pub pid: Option<u32>,
    /// Executable, command line, cgroup and container of that process.
    pub info: Option<super::process::ProcessInfo>,
}

/// Looks up the process whose socket is `peer` → `local` (kt's end).
pub fn peer_process(peer: SocketAddr, local: SocketAddr) -> Option<PeerProcess> {
    peer_process_in(Path::new("/proc"), peer, local)
}

/// As [`peer_process`], with another procfs root (tests).
pub fn peer_process_in(
    proc_root: &Path,
    peer: SocketAddr,
    local: SocketAddr,
) -> Option<PeerProcess> {
    let table = if peer.is_ipv4() {
        "net/tcp"
    } else {
        "net/tcp6"
    };
    let text = std::fs::read_to_string(proc_root.join(table)).ok()?;
    let (uid, inode) = find_socket(&text, peer, local)?;
    let pid = find_inode_owner(proc_root, inode, uid);
    let info = pid.map(|p| process_info_in(proc_root, p));
    Some(PeerProcess { uid, pid, info })
}

/// The uid and inode of the socket whose local end is `peer` and whose
/// remote end is `local`, from a `/proc/net/tcp{,6}` table.
pub fn find_socket(table: &str, peer: SocketAddr, local: SocketAddr) -> Option<(u32, u64)> {
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 {
            continue;
        }
        if parse_addr(f[1]) == Some(peer) && parse_addr(f[2]) == Some(local) {
            let uid = f[7].parse().ok()?;
            let inode = f[9].parse().ok()?;
            return Some((uid, inode));
        }
    }
    None
}

/// `0100007F:1F90` → 127.0.0.1:8080; IPv6 as four 32-bit words, each in
/// the host's byte order (as the kernel prints them).
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(ip, 16).ok()?.to_ne_bytes(),
        )),
        32 => {
            let mut b = [0u8; 16];
            for (i, chunk) in b.chunks_mut(4).enumerate() {
                let w = u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok()?;
                chunk.copy_from_slice(&w.to_ne_bytes());
            }
            let v6 = Ipv6Addr::from(b);
            // A v4 client of a dual-stack listener shows as ::ffff:a.b.c.d.
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The first process with an fd on `socket:[inode]`, within the budget.
fn find_inode_owner(proc_root: &Path, inode: u64, uid: u32) -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
    let want = format!("socket:[{inode}]");
    let deadline = Instant::now() + FD_SCAN_BUDGET;
    let me = std::process::id();
    let mut pids: Vec<u32> = std::fs::read_dir(proc_root)
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| *pid != me)
        .collect();
    // A client that just connected is usually a recent process: look at
    // the newest first, and only at processes of the socket's uid (root's
    // sockets can be any process's).
    pids.sort_unstable_by(|a, b| b.cmp(a));
    for pid in pids {
        let dir = proc_root.join(pid.to_string());
        if uid != 0 && std::fs::metadata(&dir).is_ok_and(|m| m.uid() != uid && m.uid() != 0) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(dir.join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == want.as_str()) {
                return Some(pid);
            }
        }
        if Instant::now() > deadline {
            return None;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_table_names_uid_and_inode() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1111 1 0 100 0 0 10 0\n   1: 0100007F:D431 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1000        0 2222 1 0 20 4 30 10 -1\n";
        let peer: SocketAddr = "127.0.0.1:54321".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(find_socket(table, peer, local), Some((1000, 2222)));
        assert_eq!(find_socket(table, local, peer), None);
    }

    #[test]
    fn a_real_loopback_client_is_traced_to_its_process() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let mut child = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!("exec 3<>/dev/tcp/127.0.0.1/{port}; read -t 10 <&3"))
            .spawn()
            .unwrap();
        let (s, peer) = l.accept().unwrap();
        let found = peer_process(peer, l.local_addr().unwrap()).expect("socket in the table");
        let me = std::fs::metadata("/proc/self").map(|m| {
            use std::os::unix::fs::MetadataExt as _;
            m.uid()
        });
        assert_eq!(found.uid, me.unwrap());
        assert_eq!(found.pid, Some(child.id()));
        let exe = found.info.and_then(|i| i.exe).unwrap_or_default();
        assert!(exe.ends_with("bash"), "{exe}");
        drop(s);
        let _ = child.wait();
    }
}
