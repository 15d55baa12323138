//! The control socket server: a Unix socket (mode 0600) accepting JSON-line requests from
//! root or the uids/gids allowed on the command line (checked with SO_PEERCRED). It runs
//! on its own thread with a small tokio runtime, so neither slow clients nor blocking
//! operations can stall the ublk queues or each other.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use super::protocol::{reply, Command, CtlError, ErrorCode, ExportArgs, Request, MAX_LINE};
use super::service::VolumeService;

/// How patient the server is with clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; more are told to retry.
    pub max_clients: usize,
    /// A request line must arrive whole within this time once started.
    pub line_timeout: Duration,
    /// An idle connection is closed after this time.
    pub idle_timeout: Duration,
    /// A reply must be taken by the client within this time.
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_clients: 64,
            line_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// Who may talk to the socket besides root.
#[derive(Debug, Clone, Default)]
pub struct Access {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
}

impl Access {
    /// Whether a peer with `uid` and primary `gid` may use the socket.
    pub fn allows(&self, uid: u32, gid: u32) -> bool {
        uid == 0 || self.uids.contains(&uid) || self.gids.contains(&gid)
    }
}

/// Default socket path for volume `name`.
pub fn default_socket(name: &str) -> PathBuf {
    PathBuf::from("/run/snapblk").join(format!("{name}.sock"))
}

/// A running control server; dropping it stops it and removes the socket.
pub struct Server {
    path: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Binds `path` and serves `service` on a new thread. Refuses to take over a socket
    /// another live daemon listens on.
    pub fn start(
        path: &Path,
        access: Access,
        limits: Limits,
        service: Arc<VolumeService>,
    ) -> Result<Server, CtlError> {
        let io = |what: &str, e: std::io::Error| {
            CtlError::new(ErrorCode::Io, format!("{what} {}: {e}", path.display()))
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io("creating the folder of", e))?;
        }
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(CtlError::new(
                    ErrorCode::Busy,
                    format!("{} is in use by another daemon", path.display()),
                ));
            }
            std::fs::remove_file(path).map_err(|e| io("removing the stale socket", e))?;
        }
        let std_listener =
            std::os::unix::net::UnixListener::bind(path).map_err(|e| io("binding", e))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| io("setting the mode of", e))?;
        std_listener
            .set_nonblocking(true)
            .map_err(|e| io("configuring", e))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .max_blocking_threads(8)
            .build()
            .map_err(|e| io("starting the runtime for", e))?;
        let thread = std::thread::Builder::new()
            .name("snapblk-ctl".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match UnixListener::from_std(std_listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(error = %e, "control socket unusable");
                            return;
                        }
                    };
                    tokio::select! {
                        _ = accept_loop(listener, access, limits, service) => {}
                        _ = rx => {}
                    }
                });
            })
            .map_err(|e| io("starting the thread for", e))?;
        tracing::info!(socket = %path.display(), "control socket listening");
        Ok(Server {
            path: path.to_path_buf(),
            stop: Some(tx),
            thread: Some(thread),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn accept_loop(
    listener: UnixListener,
    access: Access,
    limits: Limits,
    service: Arc<VolumeService>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_clients));
    let ids = AtomicU64::new(1);
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let conn = ids.fetch_add(1, Ordering::Relaxed);
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            let e = CtlError::new(
                ErrorCode::Busy,
                format!(
                    "more than {} clients at once; retry later",
                    limits.max_clients
                ),
            );
            tokio::spawn(refuse(stream, e, limits));
            continue;
        };
        let (access, service) = (access.clone(), service.clone());
        tokio::spawn(async move {
            serve_connection(stream, conn, &access, limits, &service).await;
            let svc = service.clone();
            let _ = tokio::task::spawn_blocking(move || svc.connection_closed(conn)).await;
            drop(permit);
        });
    }
}

async fn refuse(mut stream: UnixStream, e: CtlError, limits: Limits) {
    let line = reply(&Value::Null, Err(e)) + "\n";
    let _ = tokio::time::timeout(limits.write_timeout, stream.write_all(line.as_bytes())).await;
}

async fn serve_connection(
    stream: UnixStream,
    conn: u64,
    access: &Access,
    limits: Limits,
    service: &Arc<VolumeService>,
) {
    let cred = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(conn, error = %e, "cannot read the peer's credentials; closing");
            return;
        }
    };
    let (uid, gid) = (cred.uid(), cred.gid());
    if !access.allows(uid, gid) {
        tracing::warn!(conn, uid, gid, pid = ?cred.pid(), "control socket: peer refused");
        refuse(
            stream,
            CtlError::new(
                ErrorCode::PermissionDenied,
                format!("uid {uid} gid {gid} may not use this socket"),
            ),
            limits,
        )
        .await;
        return;
    }
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    loop {
        let mut line = Vec::new();
        // Wait (long) for a request to start, then (short) for the rest of its line.
        match tokio::time::timeout(limits.idle_timeout, rd.fill_buf()).await {
            Err(_) => return,
            Ok(Err(_)) => return,
            Ok(Ok([])) => return,
            Ok(Ok(_)) => {}
        }
        let mut limited = (&mut rd).take(MAX_LINE as u64 + 1);
        let read = limited.read_until(b'\n', &mut line);
        match tokio::time::timeout(limits.line_timeout, read).await {
            Err(_) => {
                let e = CtlError::new(
                    ErrorCode::Timeout,
                    format!(
                        "request line not finished within {} ms",
                        limits.line_timeout.as_millis()
                    ),
                );
                let _ = send(&mut wr, &reply(&Value::Null, Err(e)), limits).await;
                return;
            }
            Ok(Err(_)) => return,
            Ok(Ok(_)) => {}
        }
        if line.len() > MAX_LINE || (line.last() != Some(&b'\n') && line.len() == MAX_LINE + 1) {
            let e = CtlError::new(
                ErrorCode::LineTooLong,
                format!("request longer than {MAX_LINE} bytes"),
            );
            let _ = send(&mut wr, &reply(&Value::Null, Err(e)), limits).await;
            return;
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\n', '\r']);
        if text.trim().is_empty() {
            continue;
        }
        let out = match Request::parse(text) {
            Err((id, e)) => reply(&id, Err(e)),
            Ok(Request {
                id,
                command: Command::Export(args),
            }) => {
                // The stream is the last thing on this connection.
                stream_export(rd.into_inner(), wr, conn, id, args, limits, service).await;
                return;
            }
            Ok(req) => {
                let svc = service.clone();
                let name = req.command.name();
                tracing::debug!(conn, cmd = name, "control request");
                let result = tokio::task::spawn_blocking(move || svc.handle(conn, req.command))
                    .await
                    .unwrap_or_else(|e| {
                        Err(CtlError::new(
                            ErrorCode::Internal,
                            format!("{name} failed: {e}"),
                        ))
                    });
                if let Err(e) = &result {
                    tracing::info!(conn, cmd = name, code = ?e.code, error = %e.message, "control request refused");
                }
                reply(&req.id, result)
            }
        };
        if send(&mut wr, &out, limits).await.is_err() {
            return;
        }
    }
}

/// Longest a client may leave the export stream unread before the daemon gives up on it.
pub const EXPORT_STALL_LIMIT: Duration = Duration::from_secs(120);

/// Answers an `export` request: one reply line (an error, or what the stream will
/// carry), then the stream's bytes, written by a blocking thread straight to the
/// socket; the connection then closes. A client that stops reading for
/// [`EXPORT_STALL_LIMIT`] is dropped (its stream then lacks a trailer, so nothing accepts it).
async fn stream_export(
    rd: tokio::net::unix::OwnedReadHalf,
    mut wr: tokio::net::unix::OwnedWriteHalf,
    conn: u64,
    id: Value,
    args: ExportArgs,
    limits: Limits,
    service: &Arc<VolumeService>,
) {
    let svc = service.clone();
    let a = args.clone();
    let job = tokio::task::spawn_blocking(move || svc.prepare_export(&a))
        .await
        .unwrap_or_else(|e| {
            Err(CtlError::new(
                ErrorCode::Internal,
                format!("export failed: {e}"),
            ))
        });
    let job = match job {
        Ok(j) => j,
        Err(e) => {
            tracing::info!(conn, cmd = "export", code = ?e.code, error = %e.message, "control request refused");
            let _ = send(&mut wr, &reply(&id, Err(e)), limits).await;
            return;
        }
    };
    let totals = job.export.totals();
    let head = serde_json::json!({
        "stream": {
            "snapshot": args.snapshot,
            "since": args.since,
            "data_bytes": totals.data_bytes,
            "records": totals.records,
            "zero_bytes": totals.zero_bytes,
        }
    });
    if send(&mut wr, &reply(&id, Ok(head)), limits).await.is_err() {
        return;
    }
    let std_stream = match rd.reunite(wr).map(|s| s.into_std()) {
        Ok(Ok(s)) => s,
        _ => {
            tracing::warn!(conn, "cannot hand the connection to the export thread");
            return;
        }
    };
    let written = tokio::task::spawn_blocking(move || {
        std_stream.set_nonblocking(false)?;
        std_stream.set_write_timeout(Some(EXPORT_STALL_LIMIT))?;
        let out = std::io::BufWriter::with_capacity(1 << 20, std_stream);
        let name = format!("export of {:?} to client {conn}", args.snapshot);
        let (mut out, summary) = job
            .export
            .write(out, &name, &crate::stream::NoProgress)
            .map_err(std::io::Error::other)?;
        std::io::Write::flush(&mut out)?;
        drop(job);
        Ok::<_, std::io::Error>(summary)
    })
    .await;
    match written {
        Ok(Ok(s)) => tracing::info!(
            conn,
            snapshot = %s.source.snapshot.name,
            base = s.source.base.as_ref().map(|b| b.name.as_str()),
            bytes = s.stream_bytes,
            secs = s.elapsed.as_secs_f64(),
            "export streamed"
        ),
        Ok(Err(e)) => {
            tracing::warn!(conn, error = %e, "export stopped; the client gets a stream without a trailer")
        }
        Err(e) => tracing::error!(conn, error = %e, "export thread failed"),
    }
}

async fn send(
    wr: &mut tokio::net::unix::OwnedWriteHalf,
    line: &str,
    limits: Limits,
) -> Result<(), ()> {
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line.as_bytes());
    buf.push(b'\n');
    match tokio::time::timeout(limits.write_timeout, wr.write_all(&buf)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}
