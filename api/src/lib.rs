//! The VMM's REST control socket: HTTP/1.1 with JSON bodies on a Unix socket, in the style
//! of Firecracker's API. A user sees the VM, its devices and their interceptor chains, turns
//! interceptors on and off, loads new instances into a running chain and removes them.
//! The resources and their answers are specified in `docs/api.yaml`.
//!
//! The server runs on its own thread (a single-threaded tokio runtime); chain edits, which
//! may wait for a plugin's `create` or for requests in flight, run on its blocking pool.

mod body;
pub mod client;
mod error;
mod metrics;
mod routes;
mod socket;
mod views;

pub use error::ApiError;
pub use socket::SocketError;

use compat::{LiveStack, PluginRegistry};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Largest request body accepted (413 beyond it).
pub const MAX_BODY: usize = 64 * 1024;

/// What `GET /vm` reports.
#[derive(Clone, Debug)]
pub struct VmInfo {
    /// `Running` or `ShuttingDown`.
    pub state: &'static str,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub uptime: Duration,
}

/// The VM as the API sees it.
pub trait VmControl: Send + Sync {
    fn info(&self) -> VmInfo;
    /// Starts an orderly shutdown (disks flushed, plugins written back) and returns at once.
    fn shutdown(&self) -> Result<(), String>;
}

/// A block device and its live chain.
pub struct Disk {
    pub id: String,
    pub read_only: bool,
    pub stack: Arc<LiveStack>,
}

/// Everything the handlers reach.
pub struct ApiState {
    vm: Arc<dyn VmControl>,
    disks: Vec<Disk>,
    registry: Arc<PluginRegistry>,
    /// Serializes loads and removals across devices (an id is unique VM-wide).
    edits: Mutex<()>,
}

impl ApiState {
    pub fn new(vm: Arc<dyn VmControl>, disks: Vec<Disk>, registry: Arc<PluginRegistry>) -> Self {
        ApiState {
            vm,
            disks,
            registry,
            edits: Mutex::new(()),
        }
    }
}

/// A running API server. Dropping it leaves the thread serving until the process exits;
/// [`Server::remove_socket`] removes the socket file at shutdown.
pub struct Server {
    path: PathBuf,
}

impl Server {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn remove_socket(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds `path` (mode 0600; a stale socket file is replaced, a live one refused) and serves
/// the API on a thread of its own.
pub fn serve(path: &Path, state: ApiState) -> Result<Server, SocketError> {
    let listener = socket::bind(path)?;
    let app = routes::router(Arc::new(state));
    let shown = path.display().to_string();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .max_blocking_threads(2)
        .thread_name("api-edit")
        .build()
        .map_err(|e| SocketError::Io(shown.clone(), e))?;
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::UnixListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!("api socket {shown}: {e}; the API is not served");
                        return;
                    }
                };
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!("api socket {shown}: {e}; the API stopped");
                }
            })
        })
        .map_err(|e| SocketError::Io(path.display().to_string(), e))?;
    Ok(Server {
        path: path.to_path_buf(),
    })
}
