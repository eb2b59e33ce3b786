//! `vmm`: boots a Linux guest on KVM from a TOML config.

use clap::Parser;
use std::io::Write;
use std::process::ExitCode;
use vmm::config::{self, HostLimits, VmConfig};
use vmm::seccomp::{self, ThreadKind};
use vmm::{control, network, storage, vm};

/// A KVM virtual machine monitor whose virtio block and net I/O passes through interceptors.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Path of the guest's TOML config (see configs/).
    #[arg(long)]
    config: std::path::PathBuf,
    /// Serve the REST control API on this Unix socket (overrides `[api] socket`).
    #[arg(long)]
    api_sock: Option<std::path::PathBuf>,
    /// Seccomp filters per thread kind (docs/security.md): `trap` stops the vmm with a line
    /// naming the thread and the call, `log` lets the kernel log it, `off` installs none.
    #[arg(long, value_enum, default_value_t = seccomp::SeccompMode::Trap)]
    seccomp: seccomp::SeccompMode,
    /// Landlock rules per thread kind (docs/security.md): `on` lets each thread open only
    /// what its kind needs (what the config names), `off` lets any open what the user can.
    #[arg(long, value_enum, default_value_t = vmm::landlock::LandlockMode::On)]
    landlock: vmm::landlock::LandlockMode,
}

/// Exit status for a config the VMM refuses.
const EXIT_CONFIG: u8 = 2;

fn host_max_vcpus() -> u32 {
    // The MP table's APIC IDs are 8-bit; KVM may allow fewer.
    let kvm_max = kvm_ioctls::Kvm::new()
        .map(|k| k.get_max_vcpus())
        .unwrap_or(1);
    (kvm_max as u32).min(254)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    vmm::logging::init("warn");
    // Before any thread starts, so every thread inherits the blocked mask.
    let signals = match vm::StopSignals::block() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vmm: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let file = cli.config.display().to_string();
    let limits = HostLimits {
        max_vcpus: host_max_vcpus(),
        available_mib: config::host_available_mib(),
    };
    let cfg = match VmConfig::load(&cli.config).and_then(|c| c.validate(&file, limits).map(|_| c)) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("vmm: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // Built before any thread starts; each thread applies its own kind's filter first.
    if let Err(e) = seccomp::Filters::build(cli.seccomp).and_then(seccomp::install) {
        eprintln!("vmm: {e}");
        return ExitCode::FAILURE;
    }
    // Built before any thread starts, as the filters; each thread restricts itself first.
    let api_socket = api_socket(&cli, &cfg).map(|(p, _)| p);
    let landlock = match vmm::landlock::Rulesets::build(cli.landlock, &cfg, api_socket.as_deref()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmm: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let landlock_note = landlock.note().map(str::to_string);
    if let Err(e) = vmm::landlock::install(landlock) {
        eprintln!("vmm: {e}");
        return ExitCode::FAILURE;
    }
    let registry = std::sync::Arc::new(compat::PluginRegistry::new());
    let disks =
        match storage::open_disks(&cfg, &file, &registry, Some(confined(ThreadKind::Device))) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("vmm: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
    let nics = match network::open_nets(&cfg, &file, &registry, Some(confined(ThreadKind::Device)))
    {
        Ok(n) => n,
        Err(e) => {
            eprintln!("vmm: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let exit = match vm::eventfd() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("vmm: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    // KVM's state for the API's `/vm/kvm` and `/vm/vcpus`, once the VM exists.
    let probe = vmm::probe::KvmSlot::default();
    let api = match start_api(&cli, &cfg, &disks, &nics, &registry, &exit, &probe) {
        Ok(api) => api,
        Err(e) => {
            eprintln!("vmm: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(note) = landlock_note {
        eprintln!("vmm: landlock: {note}");
    }
    let outcome = vm::run(&cfg, &disks, &nics, &exit, &signals, Some(&probe));
    // Orderly shutdown (the vCPUs have stopped): each disk serves what the guest queued,
    // then its chain is flushed (a write-back cache writes back, encrypt commits) and its
    // instances are destroyed, all on the disk's I/O thread.
    for d in &disks {
        let drained = d.stack.io_thread().drain().is_ok();
        if !drained || d.stack.flush() != compat::RequestStatus::Ok {
            eprintln!("vmm: disk {}: the flush at shutdown failed", d.id);
        }
    }
    for line in storage::report(&disks) {
        eprintln!("vmm: {line}");
    }
    for line in network::report(&nics) {
        eprintln!("vmm: {line}");
    }
    // Each card's instances are destroyed on its thread, which called their hooks.
    for n in &nics {
        let chain = n.chain.clone();
        if n.io.run(move || chain.close()).is_err() {
            eprintln!("vmm: net {}: closing its interceptors failed", n.id);
        }
    }
    for d in &disks {
        if d.stack.close() != compat::RequestStatus::Ok {
            eprintln!("vmm: disk {}: closing its interceptors failed", d.id);
        }
    }
    if let Some(api) = api {
        api.remove_socket();
    }
    let _ = std::io::stdout().flush();
    match outcome {
        Ok(vm::Outcome::Reset) => ExitCode::SUCCESS,
        Ok(vm::Outcome::Signal(sig)) => {
            let name = if sig == libc::SIGINT {
                "SIGINT"
            } else {
                "SIGTERM"
            };
            eprintln!("vmm: {name}: the guest was stopped and every disk settled");
            ExitCode::SUCCESS
        }
        Ok(vm::Outcome::Error) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("vmm: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The API's socket, if `--api-sock` or `[api] socket` names one, with where the path came
/// from (for an error: the command line, or the config's field).
fn api_socket(cli: &Cli, cfg: &VmConfig) -> Option<(std::path::PathBuf, String)> {
    cli.api_sock
        .clone()
        .map(|p| (p, "--api-sock".to_string()))
        .or_else(|| {
            cfg.api.as_ref().map(|a| {
                (
                    a.socket.clone(),
                    format!("{}: api.socket", cli.config.display()),
                )
            })
        })
}

/// Serves the API if `--api-sock` or `[api] socket` names a socket.
fn start_api(
    cli: &Cli,
    cfg: &VmConfig,
    disks: &[storage::Disk],
    nics: &[network::Nic],
    registry: &std::sync::Arc<compat::PluginRegistry>,
    exit: &vmm_sys_util::eventfd::EventFd,
    probe: &vmm::probe::KvmSlot,
) -> Result<Option<vmm_api::Server>, String> {
    let Some((path, origin)) = api_socket(cli, cfg) else {
        return Ok(None);
    };
    let exit = exit
        .try_clone()
        .map_err(|e| format!("api: cannot share the exit eventfd: {e}"))?;
    let vm = control::VmHandle::new(
        cfg.machine.vcpus,
        cfg.machine.memory_mib,
        exit,
        probe.clone(),
    );
    let api_disks = disks
        .iter()
        .map(|d| {
            let stats = d.queue_stats.clone();
            vmm_api::Disk {
                id: d.id.clone(),
                read_only: d.read_only,
                stack: d.stack.clone(),
                queues: std::sync::Arc::new(move || stats.fields()),
            }
        })
        .collect();
    let api_nets = nics
        .iter()
        .map(|n| {
            let counters = n.counters.clone();
            let stats = n.queue_stats.clone();
            vmm_api::NetCard {
                id: n.id.clone(),
                tap: n.tap_name.clone(),
                mac: n.mac_text.clone(),
                chain: n.chain.clone(),
                io: n.io.clone(),
                counters: std::sync::Arc::new(move || counters.fields().to_vec()),
                queues: std::sync::Arc::new(move || stats.fields()),
            }
        })
        .collect();
    let state = vmm_api::ApiState::new(std::sync::Arc::new(vm), api_disks, registry.clone())
        .with_nets(api_nets)
        .with_load_policy(load_policy(cfg));
    let server = vmm_api::serve_on(
        &path,
        state,
        vmm_api::Limits::default(),
        Some(confined(ThreadKind::Api)),
    )
    .map_err(|e| format!("{origin}: {e}"))?;
    tracing::info!("api: serving on {}", server.path().display());
    Ok(Some(server))
}

/// What a thread of `kind` runs first: its Landlock rules and seccomp filter.
fn confined(kind: ThreadKind) -> compat::ThreadStart {
    std::sync::Arc::new(move || vmm::confine::current_thread(kind))
}

/// What run-time loads may load and name: the same as the API's and devices' Landlock rules
/// (`vmm::landlock::grants`), checked first for a clear answer.
fn load_policy(cfg: &VmConfig) -> vmm_api::LoadPolicy {
    let readable: Vec<std::path::PathBuf> = cfg
        .interceptor
        .iter()
        .flat_map(|i| i.files())
        .map(std::path::Path::to_path_buf)
        .chain(cfg.landlock.read_paths.iter().cloned())
        .collect();
    vmm_api::LoadPolicy::new(&cfg.landlock.plugin_dirs, &readable)
}
