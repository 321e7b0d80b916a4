//! The control socket: `<data dir>/kt.sock` (mode 0600), over which
//! `kt gateway reload` asks the running kt to reload. One JSON line in
//! (`{"op":"reload"}`), one JSON line out. Only root and kt's own uid
//! may ask (the kernel says who is calling: `SO_PEERCRED`); every request
//! is recorded with the caller's uid and pid.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
use tokio::net::{UnixListener, UnixStream};

use super::reload::{ReloadRefused, Reloaded, Reloader, Trigger};

/// The socket's file name inside the data dir.
pub const SOCKET_FILE: &str = "kt.sock";

/// Longest request line accepted.
const MAX_REQUEST: usize = 4096;

/// How long `kt gateway reload` waits for the answer (a reload resolves
/// the provider hosts again when capture changes).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// The control socket of a data dir.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_FILE)
}

/// Control socket errors.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Another kt answers on this data dir's socket.
    #[error(
        "another kt is running with this data dir (it answers on {}); stop it or use another --data-dir",
        path.display()
    )]
    InUse {
        /// The socket.
        path: PathBuf,
    },
    /// No kt answers on the socket.
    #[error(
        "no running kt answers on {}: start `kt run` (or `kt gateway run`) with the same --data-dir",
        path.display()
    )]
    NotRunning {
        /// The socket.
        path: PathBuf,
        /// Why the connection failed.
        #[source]
        source: std::io::Error,
    },
    /// Binding, reading or writing the socket failed.
    #[error("control socket {}", path.display())]
    Io {
        /// The socket.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The running kt answered something this kt does not understand.
    #[error("the running kt sent an answer this kt cannot read (a different version?)")]
    BadReply(#[source] serde_json::Error),
    /// The running kt refused the request itself.
    #[error("the running kt refused the request: {0}")]
    Refused(String),
}

/// What a client asks.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Request {
    /// Re-read the config file and every secret.
    Reload,
}

/// What the running kt answers.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Reply {
    /// Applied.
    Reloaded {
        /// The new generation's number.
        generation: u64,
        /// One line saying what changed.
        summary: String,
        /// What changed, field by field.
        changes: serde_json::Value,
        /// Things that work but deserve attention.
        warnings: Vec<String>,
    },
    /// Nothing changed.
    Refused {
        /// Every problem found.
        problems: Vec<String>,
    },
    /// The request was not understood or not allowed.
    Error {
        /// Why.
        message: String,
    },
}

impl Reply {
    fn of(result: Result<Reloaded, ReloadRefused>) -> Reply {
        match result {
            Ok(r) => {
                let mut summary = r.diff.summary();
                if let Some(c) = &r.capture {
                    summary.push_str("; capture: ");
                    summary.push_str(c);
                }
                Reply::Reloaded {
                    generation: r.diff.generation,
                    summary,
                    changes: serde_json::to_value(&r).unwrap_or_default(),
                    warnings: r.warnings,
                }
            }
            Err(e) => Reply::Refused {
                problems: e.problems,
            },
        }
    }
}

/// The bound control socket; the file is removed when this is dropped.
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl ControlSocket {
    /// Binds `<data_dir>/kt.sock` (mode 0600). A stale file left by a kt
    /// that died is replaced; a live one is an error. Call inside the
    /// runtime.
    pub fn bind(data_dir: &Path) -> Result<ControlSocket, ControlError> {
        let path = socket_path(data_dir);
        let io = |source| ControlError::Io {
            path: path.clone(),
            source,
        };
        crate::datadir::create_private_dir(data_dir).map_err(io)?;
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(ControlError::InUse { path });
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let listener = UnixListener::bind(&path).map_err(io)?;
        // The data dir is 0700 already; the mode says the same on the file.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        Ok(ControlSocket { listener, path })
    }

    /// Answers requests until `stop` resolves.
    pub async fn serve(self, reloader: Arc<Reloader>, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        let owner = std::fs::metadata(&self.path).map_or(u32::MAX, |m| m.uid());
        loop {
            let stream = tokio::select! {
                () = &mut stop => return,
                r = self.listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "control socket accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let reloader = Arc::clone(&reloader);
            tokio::spawn(async move {
                if let Err(e) = answer(stream, &reloader, owner).await {
                    tracing::debug!(error = %e, "control connection ended early");
                }
            });
        }
    }
}

async fn answer(stream: UnixStream, reloader: &Reloader, owner: u32) -> std::io::Result<()> {
    let cred = stream.peer_cred()?;
    let (uid, pid) = (cred.uid(), cred.pid().and_then(|p| u32::try_from(p).ok()));
    let (read, mut write) = stream.into_split();
    let reply = if uid != 0 && uid != owner {
        tracing::warn!(
            uid,
            pid,
            "control request from a uid that is neither root nor kt's: refused"
        );
        Reply::Error {
            message: format!("uid {uid} may not control this kt (only root and uid {owner})"),
        }
    } else {
        let mut line = String::new();
        let mut limited =
            tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST as u64));
        tokio::time::timeout(Duration::from_secs(5), limited.read_line(&mut line))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        match serde_json::from_str::<Request>(line.trim()) {
            Ok(Request::Reload) => Reply::of(reloader.reload(Trigger::Command { uid, pid }).await),
            Err(e) => Reply::Error {
                message: format!("not a request this kt understands: {e}"),
            },
        }
    };
    let mut out = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

/// Asks the kt running on `data_dir` to reload; waits for its answer.
pub fn request_reload(data_dir: &Path) -> Result<Reply, ControlError> {
    let path = socket_path(data_dir);
    let io = |source| ControlError::Io {
        path: path.clone(),
        source,
    };
    let mut stream = std::os::unix::net::UnixStream::connect(&path).map_err(|source| {
        ControlError::NotRunning {
            path: path.clone(),
            source,
        }
    })?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT)).map_err(io)?;
    let mut line = serde_json::to_vec(&Request::Reload).map_err(ControlError::BadReply)?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut reply = String::new();
    BufReader::new(std::io::Read::take(stream, 1 << 20))
        .read_line(&mut reply)
        .map_err(io)?;
    let reply: Reply = serde_json::from_str(reply.trim()).map_err(ControlError::BadReply)?;
    match reply {
        Reply::Error { message } => Err(ControlError::Refused(message)),
        r => Ok(r),
    }
}
