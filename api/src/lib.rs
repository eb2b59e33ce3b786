//! The VMM's REST control socket: HTTP/1.1 with JSON bodies on a Unix socket, in the style
//! of Firecracker's API. A user sees the VM, its devices and their interceptor chains, turns
//! interceptors on and off, loads new instances into a running chain and removes them.
//! The resources and their answers are specified in `docs/api.yaml`.
//!
//! The server runs on its own thread (a single-threaded tokio runtime); chain edits, which
//! may wait for a plugin's `create` or for requests in flight, run on its blocking pool.
//! What it does to clients that hold connections, send slowly or too much is in `server.rs`
//! ([`Limits`]).

mod body;
pub mod client;
mod error;
mod metrics;
mod policy;
mod routes;
mod server;
mod socket;
mod views;

pub use error::ApiError;
pub use policy::LoadPolicy;
pub use socket::SocketError;

use compat::{IoThread, LiveStack, NetChain, PluginRegistry};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Largest request body accepted (413 beyond it).
pub const MAX_BODY: usize = 64 * 1024;

/// What the server allows each client (see `server.rs` for what a client sees past them).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once; one more is answered 503 and closed.
    pub max_connections: usize,
    /// A request head (request line and headers) must be complete this long after the
    /// connection opened or after its first byte arrived; else the connection is closed.
    pub header_timeout: Duration,
    /// A keep-alive connection with no request for this long is closed.
    pub idle_timeout: Duration,
    /// A request body must be complete this long after its head (408 otherwise).
    pub body_timeout: Duration,
    /// The pause after `accept()` fails for want of descriptors or memory.
    pub accept_backoff: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 64,
            header_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(5),
            accept_backoff: Duration::from_millis(100),
        }
    }
}

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
    /// KVM's VM-wide state (IOAPIC, PICs, clock), read without disturbing the guest
    /// (`GET /vm/kvm`). An error says why there is none (the VM has not started).
    fn kvm_state(&self) -> Result<serde_json::Value, String> {
        Err("no KVM state here".into())
    }
    /// Each vCPU's registers, local APIC, timer MSRs and pending events, each read on the
    /// vCPU's own thread, which leaves KVM_RUN for it (`GET /vm/vcpus`).
    fn vcpu_state(&self) -> Result<serde_json::Value, String> {
        Err("no vCPU state here".into())
    }
    /// Starts an orderly shutdown (disks flushed, plugins written back) and returns at once.
    fn shutdown(&self) -> Result<(), String>;
}

/// A block device and its live chain.
pub struct Disk {
    pub id: String,
    pub read_only: bool,
    pub stack: Arc<LiveStack>,
    /// Each queue's figures by name (`next_avail`, `in_flight`, `kicks`, ...), queue 0
    /// first; none before the guest's driver sets the disk up.
    pub queues: QueueFigures,
}

/// A disk's queues' figures, read when asked.
pub type QueueFigures = Arc<dyn Fn() -> Vec<Vec<(&'static str, u64)>> + Send + Sync>;

/// A network card's counters by name (`rx_frames`, `tx_bytes`, ...).
pub type NetCounters = Arc<dyn Fn() -> Vec<(&'static str, u64)> + Send + Sync>;

/// A network card and its live chain.
pub struct NetCard {
    pub id: String,
    pub tap: String,
    pub mac: String,
    pub chain: Arc<NetChain>,
    /// The thread that calls the chain's hooks: edits run there.
    pub io: Arc<IoThread>,
    pub counters: NetCounters,
    /// Its receive and transmit queues' figures, as a disk's.
    pub queues: QueueFigures,
}

/// Everything the handlers reach.
pub struct ApiState {
    vm: Arc<dyn VmControl>,
    disks: Vec<Disk>,
    nets: Vec<NetCard>,
    registry: Arc<PluginRegistry>,
    /// What run-time loads may load and name; `None` checks nothing (the vmm always sets
    /// one, from its config's `[landlock]`).
    policy: Option<LoadPolicy>,
    /// Serializes loads and removals across devices (an id is unique VM-wide).
    edits: Mutex<()>,
    /// How long a request body may take to arrive ([`Limits::body_timeout`]).
    body_timeout: Duration,
}

impl ApiState {
    pub fn new(vm: Arc<dyn VmControl>, disks: Vec<Disk>, registry: Arc<PluginRegistry>) -> Self {
        ApiState {
            vm,
            disks,
            nets: Vec::new(),
            registry,
            policy: None,
            edits: Mutex::new(()),
            body_timeout: Limits::default().body_timeout,
        }
    }

    /// The VM's network cards too.
    pub fn with_nets(mut self, nets: Vec<NetCard>) -> Self {
        self.nets = nets;
        self
    }

    /// Run-time loads checked against `policy` (403 outside it).
    pub fn with_load_policy(mut self, policy: LoadPolicy) -> Self {
        self.policy = Some(policy);
        self
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
/// the API on a thread of its own, with the default [`Limits`].
pub fn serve(path: &Path, state: ApiState) -> Result<Server, SocketError> {
    serve_with(path, state, Limits::default())
}

/// [`serve`] with other limits (the tests use short timeouts and small caps).
pub fn serve_with(path: &Path, state: ApiState, limits: Limits) -> Result<Server, SocketError> {
    serve_on(path, state, limits, None)
}

/// [`serve_with`], running `on_start` first on the API's thread (the VMM installs its
/// seccomp filter there; threads the API starts inherit it).
pub fn serve_on(
    path: &Path,
    state: ApiState,
    limits: Limits,
    on_start: Option<compat::ThreadStart>,
) -> Result<Server, SocketError> {
    let listener = socket::bind(path)?;
    let shown = path.display().to_string();
    let runtime = server::build_runtime().map_err(|e| SocketError::Io(shown.clone(), e))?;
    let mut state = state;
    state.body_timeout = limits.body_timeout;
    let app = routes::router(Arc::new(state));
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            if let Some(start) = on_start {
                start();
            }
            server::run(runtime, listener, app, limits, shown)
        })
        .map_err(|e| SocketError::Io(path.display().to_string(), e))?;
    Ok(Server {
        path: path.to_path_buf(),
    })
}
