//! The control socket server: a Unix socket accepting JSON-line requests from root or the
//! uids/gids allowed on the command line. Two gates, so neither alone is trusted: the
//! socket file's permissions let exactly the allowed users connect (mode 0600; group and
//! 0660 for a single `--allow-gid`; a POSIX ACL naming each allowed uid and gid
//! otherwise), and the server checks each peer's credentials (SO_PEERCRED and
//! SO_PEERGROUPS) and answers `permission_denied` to anyone else. It runs on its own thread
//! with a small tokio runtime, so neither slow clients nor blocking operations can stall
//! the ublk queues or each other.

use std::os::unix::ffi::OsStrExt;
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

/// Who may talk to the socket besides root (and the daemon's own user).
#[derive(Debug, Clone, Default)]
pub struct Access {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
}

impl Access {
    /// Whether a peer with `uid` and primary `gid` may use the socket.
    pub fn allows(&self, uid: u32, gid: u32) -> bool {
        self.allows_groups(uid, gid, &[])
    }

    /// Whether a peer with `uid`, primary `gid` and supplementary `groups` may use the
    /// socket: a member of an allowed group passes the file's permissions, so it must pass
    /// here too.
    pub fn allows_groups(&self, uid: u32, gid: u32, groups: &[u32]) -> bool {
        uid == 0
            || self.uids.contains(&uid)
            || self.gids.contains(&gid)
            || groups.iter().any(|g| self.gids.contains(g))
    }

    /// True when only root may use the socket.
    pub fn is_root_only(&self) -> bool {
        self.uids.is_empty() && self.gids.is_empty()
    }
}

/// Folder of the daemons' default control sockets.
pub const SOCKET_DIR: &str = "/run/snapblk";

/// Default control socket of the volume in folder `dir`: `/run/snapblk/<hash>.sock`, named
/// by a hash of the canonical folder, so that two volumes with the same folder name never
/// share a socket, `..` cannot lead outside the folder, and the name always fits a socket
/// address (108 bytes). Fails when the folder cannot be resolved.
pub fn default_socket(dir: &Path) -> Result<PathBuf, CtlError> {
    let canon = std::fs::canonicalize(dir).map_err(|e| {
        CtlError::new(
            ErrorCode::NotFound,
            format!("cannot resolve the volume folder {}: {e}", dir.display()),
        )
    })?;
    Ok(socket_in(Path::new(SOCKET_DIR), &canon))
}

/// The socket in folder `sockets` of the volume whose canonical folder is `canon`.
pub fn socket_in(sockets: &Path, canon: &Path) -> PathBuf {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(canon.as_os_str().as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    sockets.join(format!("{hex}.sock"))
}

/// A running control server; dropping it stops it and removes the socket.
pub struct Server {
    path: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A control socket bound (clients may already connect and wait) but not answering yet:
/// the daemon binds it before it adds its device, so a socket it cannot have stops it
/// before anything is served, and starts answering once the device is live. Dropping it
/// removes the socket.
pub struct Bound {
    path: PathBuf,
    access: Access,
    listener: Option<std::os::unix::net::UnixListener>,
}

impl Bound {
    /// Binds `path` with the permissions `access` needs (see the module's comment).
    /// Refuses to take over a socket another live daemon listens on, and a path that is
    /// not a socket.
    pub fn bind(path: &Path, access: Access) -> Result<Bound, CtlError> {
        let io = |what: &str, e: std::io::Error| {
            CtlError::new(ErrorCode::Io, format!("{what} {}: {e}", path.display()))
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .map_err(|e| io("creating the folder of", e))?;
        }
        if let Ok(md) = path.symlink_metadata() {
            use std::os::unix::fs::FileTypeExt;
            if !md.file_type().is_socket() {
                return Err(CtlError::new(
                    ErrorCode::AlreadyExists,
                    format!(
                        "{} exists and is not a socket; not replacing it",
                        path.display()
                    ),
                ));
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(CtlError::new(
                    ErrorCode::Busy,
                    format!("{} is in use by another daemon", path.display()),
                ));
            }
            std::fs::remove_file(path).map_err(|e| io("removing the stale socket", e))?;
        }
        // Nobody but the owner may connect until the permissions below are set.
        // SAFETY: umask only changes this process's file creation mask.
        let old_mask = unsafe { libc::umask(0o177) };
        let bound = std::os::unix::net::UnixListener::bind(path);
        // SAFETY: as above, restoring the previous mask.
        unsafe { libc::umask(old_mask) };
        let listener = bound.map_err(|e| io("binding", e))?;
        let bound = Bound {
            path: path.to_path_buf(),
            access,
            listener: Some(listener),
        };
        set_access(path, &bound.access)?;
        if !bound.access.is_root_only() {
            warn_unsearchable(path);
        }
        Ok(bound)
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts answering on a new thread with `service`.
    pub fn serve(
        mut self,
        limits: Limits,
        service: Arc<VolumeService>,
    ) -> Result<Server, CtlError> {
        let path = self.path.clone();
        let io = |what: &str, e: std::io::Error| {
            CtlError::new(ErrorCode::Io, format!("{what} {}: {e}", path.display()))
        };
        let std_listener = self
            .listener
            .take()
            .ok_or_else(|| CtlError::new(ErrorCode::Internal, "the socket is served already"))?;
        let mut server = Server {
            path: path.clone(),
            stop: None,
            thread: None,
        };
        std_listener
            .set_nonblocking(true)
            .map_err(|e| io("configuring", e))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .max_blocking_threads(8)
            .build()
            .map_err(|e| io("starting the runtime for", e))?;
        let access = self.access.clone();
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
        server.stop = Some(tx);
        server.thread = Some(thread);
        tracing::info!(socket = %path.display(), "control socket listening");
        Ok(server)
    }
}

impl Drop for Bound {
    fn drop(&mut self) {
        if self.listener.take().is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Warns when a folder above the socket is not searchable by others: users allowed on
/// the socket could not reach it (the folders are the administrator's to open).
fn warn_unsearchable(path: &Path) {
    for dir in path.ancestors().skip(1) {
        let Ok(md) = std::fs::metadata(dir) else {
            continue;
        };
        if md.permissions().mode() & 0o001 == 0 {
            tracing::warn!(
                socket = %path.display(),
                folder = %dir.display(),
                "the users allowed on the control socket may not reach it: its folder is not \
                 searchable by others (chmod o+x, or an ACL)"
            );
            return;
        }
    }
}

/// Sets the socket's owner group, mode and ACL so that exactly root, the daemon's user and
/// `access` may connect.
fn set_access(path: &Path, access: &Access) -> Result<(), CtlError> {
    let io = |what: &str, e: std::io::Error| {
        CtlError::new(ErrorCode::Io, format!("{what} {}: {e}", path.display()))
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| io("setting the mode of", e))?;
    if access.is_root_only() {
        return Ok(());
    }
    if access.uids.is_empty() && access.gids.len() == 1 {
        let gid = access.gids[0];
        std::os::unix::fs::lchown(path, None, Some(gid))
            .map_err(|e| io(&format!("giving group {gid}"), e))?;
        return std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
            .map_err(|e| io("setting the mode of", e));
    }
    let acl = access_acl(&access.uids, &access.gids);
    let name = c"system.posix_acl_access";
    let cpath = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        CtlError::new(
            ErrorCode::BadRequest,
            format!("{} contains a NUL byte", path.display()),
        )
    })?;
    // SAFETY: both strings are NUL-terminated and live; `acl` is a live buffer of its length.
    let rc = unsafe {
        libc::lsetxattr(
            cpath.as_ptr(),
            name.as_ptr(),
            acl.as_ptr().cast(),
            acl.len(),
            0,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        let hint = if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
            ": its file system does not support POSIX ACLs, which --allow-uid (or several \
             --allow-gid) needs; put the socket on one that does (tmpfs, ext4, xfs), or allow \
             a single group with --allow-gid"
        } else {
            ""
        };
        return Err(CtlError::new(
            ErrorCode::Io,
            format!(
                "setting the access list of {} for uids {:?} and gids {:?}: {e}{hint}",
                path.display(),
                access.uids,
                access.gids
            ),
        ));
    }
    Ok(())
}

/// The `system.posix_acl_access` value giving read and write to the owner, each of `uids`
/// and `gids`, and nobody else (entries in the order the kernel requires).
pub fn access_acl(uids: &[u32], gids: &[u32]) -> Vec<u8> {
    const USER_OBJ: u16 = 0x01;
    const USER: u16 = 0x02;
    const GROUP_OBJ: u16 = 0x04;
    const GROUP: u16 = 0x08;
    const MASK: u16 = 0x10;
    const OTHER: u16 = 0x20;
    const UNDEFINED: u32 = u32::MAX;
    const RW: u16 = 0o6;
    let sorted = |ids: &[u32]| {
        let mut v = ids.to_vec();
        v.sort_unstable();
        v.dedup();
        v
    };
    let mut entries = vec![(USER_OBJ, RW, UNDEFINED)];
    entries.extend(sorted(uids).into_iter().map(|u| (USER, RW, u)));
    entries.push((GROUP_OBJ, 0, UNDEFINED));
    entries.extend(sorted(gids).into_iter().map(|g| (GROUP, RW, g)));
    entries.push((MASK, RW, UNDEFINED));
    entries.push((OTHER, 0, UNDEFINED));
    let mut out = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    out
}

impl Server {
    /// Binds `path` and serves `service` on a new thread ([`Bound::bind`], then
    /// [`Bound::serve`]).
    pub fn start(
        path: &Path,
        access: Access,
        limits: Limits,
        service: Arc<VolumeService>,
    ) -> Result<Server, CtlError> {
        Bound::bind(path, access)?.serve(limits, service)
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

/// SO_PEERGROUPS (Linux 4.13+; the same number on every architecture this builds for).
const SO_PEERGROUPS: libc::c_int = 59;

/// The peer's supplementary groups when it connected; empty if the kernel cannot say.
fn peer_groups(stream: &UnixStream) -> Vec<u32> {
    use std::os::fd::AsRawFd;
    let mut room = 256usize;
    // Twice at most: when the first buffer is too small, the kernel says how much it needs.
    for _ in 0..2 {
        let mut groups = vec![0u32; room];
        let mut len = (groups.len() * 4) as libc::socklen_t;
        // SAFETY: the buffer is live and `len` is its size in bytes; the kernel writes at
        // most that.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if rc == 0 {
            groups.truncate(len as usize / 4);
            return groups;
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::ERANGE) {
            break;
        }
        room = len as usize / 4 + 1;
    }
    Vec::new()
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
    let groups = peer_groups(&stream);
    // SAFETY: geteuid has no preconditions.
    let own = uid == unsafe { libc::geteuid() };
    if !own && !access.allows_groups(uid, gid, &groups) {
        tracing::warn!(conn, uid, gid, ?groups, pid = ?cred.pid(), "control socket: peer refused");
        refuse(
            stream,
            CtlError::new(
                ErrorCode::PermissionDenied,
                format!(
                    "uid {uid} (gid {gid}) may not use this control socket: only root and the \
                     users and groups allowed with `snapblk serve --allow-uid/--allow-gid` may"
                ),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_are_named_by_the_canonical_folder() {
        let dir = Path::new("/run/snapblk");
        let a = socket_in(dir, Path::new("/a/vol1"));
        let b = socket_in(dir, Path::new("/b/vol1"));
        assert_ne!(a, b, "two folders named vol1 share a socket");
        assert_eq!(a, socket_in(dir, Path::new("/a/vol1")));
        for p in [&a, &b] {
            assert_eq!(p.parent(), Some(dir));
            assert!(
                p.as_os_str().len() < 108,
                "{} is too long for sun_path",
                p.display()
            );
        }
        // `..` is resolved before naming: the socket stays in the socket folder and is the
        // one of the folder it resolves to.
        let tmp = tempfile::tempdir().expect("tempdir");
        let sub = tmp.path().join("x");
        std::fs::create_dir(&sub).expect("mkdir");
        let up = default_socket(&sub.join("..")).expect("resolve");
        assert_eq!(up.parent(), Some(Path::new(SOCKET_DIR)));
        assert_eq!(up, default_socket(tmp.path()).expect("resolve"));
        let long = PathBuf::from(format!("/{}", "d/".repeat(2000)));
        assert!(socket_in(dir, &long).as_os_str().len() < 108);
        let e = default_socket(&tmp.path().join("missing")).expect_err("resolved a missing folder");
        assert!(e.message.contains("missing"), "{}", e.message);
    }

    #[test]
    fn the_acl_lists_owner_users_groups_mask_and_other_in_order() {
        let acl = access_acl(&[1001, 1000, 1000], &[50]);
        let entries: Vec<(u16, u16, u32)> = acl[4..]
            .chunks(8)
            .map(|c| {
                (
                    u16::from_le_bytes([c[0], c[1]]),
                    u16::from_le_bytes([c[2], c[3]]),
                    u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
                )
            })
            .collect();
        assert_eq!(&acl[..4], &2u32.to_le_bytes());
        assert_eq!(
            entries,
            vec![
                (0x01, 6, u32::MAX),
                (0x02, 6, 1000),
                (0x02, 6, 1001),
                (0x04, 0, u32::MAX),
                (0x08, 6, 50),
                (0x10, 6, u32::MAX),
                (0x20, 0, u32::MAX),
            ]
        );
    }
}
