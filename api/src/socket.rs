//! The API's Unix socket: created mode 0600 (only the VMM's user may steer it); a socket
//! file left by a VMM that died is replaced, one a live process answers on is refused.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("api socket {0}: another process is serving on it (is another vmm running?)")]
    InUse(String),
    #[error("api socket {0}: exists and is not a socket; not replacing it")]
    NotASocket(String),
    #[error("api socket {0}: {1}")]
    Io(String, std::io::Error),
}

pub(crate) fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    let shown = || path.display().to_string();
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(SocketError::InUse(shown()));
            }
            std::fs::remove_file(path).map_err(|e| SocketError::Io(shown(), e))?;
        }
        Ok(_) => return Err(SocketError::NotASocket(shown())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(SocketError::Io(shown(), e)),
    }
    // The socket is born 0600: no window in which another user could connect.
    // SAFETY: umask only swaps the process's file-creation mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|e| SocketError::Io(shown(), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| SocketError::Io(shown(), e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| SocketError::Io(shown(), e))?;
    Ok(listener)
}
