//! Seccomp filters, one per kind of thread, in the style of Firecracker and Cloud
//! Hypervisor: every thread of the vmm installs the filter of its kind when it starts, and
//! from then on the kernel refuses any system call that is not on its list.
//!
//! - [`Filters::build`] compiles the five filters once, at start-up (and, in trap mode,
//!   installs the `SIGSYS` handler that reports a refused call and ends the process).
//! - [`Filters::apply`] installs one kind's filter on the calling thread (only on it: a
//!   filter is inherited by the threads the thread starts afterwards, and stacked filters
//!   all apply, so every thread must be started *before* the thread that starts it
//!   applies its own filter; `apply` refuses a thread that is already filtered).
//! - [`install`] and [`apply_current`] keep one process-wide set, for spawn sites that
//!   cannot be handed a reference (the I/O thread's start hook).
//!
//! What each list allows, and why, is in docs/security.md ("Seccomp"); the Device list is
//! what a plugin's hooks may call. A test in `tests` below keeps the two in step.
//!
//! In trap mode a refused call ends the process with [`EXIT_SECCOMP`] after one line on
//! stderr: `vmm: seccomp: thread io-data0 made forbidden syscall 41 (socket) ...`.

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter};
use std::sync::OnceLock;

/// The vmm's exit status when a filter stopped a system call (trap mode): 128 + SIGSYS, what
/// a shell shows for a process that SIGSYS killed.
pub const EXIT_SECCOMP: i32 = 128 + libc::SIGSYS;

/// What a filter does with a system call that is not on its thread's list.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// Stop the vmm: one line on stderr naming the thread and the call, exit status 159.
    #[default]
    Trap,
    /// Let the call run and have the kernel log it (SECCOMP_RET_LOG: an audit line with the
    /// thread's name and the call's number, where the kernel's audit is on).
    Log,
    /// No filters.
    Off,
}

/// The kinds of thread the vmm runs, each with its own list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The main thread, once it has started every other thread: it waits for the guest's
    /// end, then settles the disks (flush, the plugins' stats, their removal) and exits.
    Main,
    /// A vCPU: KVM_RUN and the port and MMIO exits it serves.
    Vcpu,
    /// A disk's I/O thread: the device queue, the interceptor chain and its plugins' hooks
    /// (create, pre, post, destroy), the backend's I/O.
    Device,
    /// The REST API's thread (and the blocking threads it starts, which inherit its
    /// filter): the socket, run-time loading and removal of plugins.
    Api,
    /// The thread that feeds the host's stdin to the serial console.
    Stdin,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 5] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Device,
        ThreadKind::Api,
        ThreadKind::Stdin,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Device => "device",
            ThreadKind::Api => "api",
            ThreadKind::Stdin => "stdin",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The compiled filters of every thread kind, built once at start-up.
pub struct Filters {
    mode: SeccompMode,
    /// Per kind (`ThreadKind::index`): the programs to install, in order. Empty when off.
    programs: [Vec<BpfProgram>; 5],
}

impl std::fmt::Debug for Filters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filters").field("mode", &self.mode).finish()
    }
}

impl Filters {
    /// Compiles the filters for `mode`. In trap mode this also installs the process's
    /// `SIGSYS` handler (the report of a refused call), so call it before any thread that
    /// applies a filter starts.
    pub fn build(mode: SeccompMode) -> Result<Filters, String> {
        let mut programs: [Vec<BpfProgram>; 5] = Default::default();
        let refused = match mode {
            SeccompMode::Off => {
                return Ok(Filters { mode, programs });
            }
            SeccompMode::Trap => SeccompAction::Trap,
            SeccompMode::Log => SeccompAction::Log,
        };
        let arch = std::env::consts::ARCH
            .try_into()
            .map_err(|e| format!("seccomp: {e}"))?;
        let pid = u64::from(std::process::id());
        for kind in ThreadKind::ALL {
            let rules = rules(kind, pid)?;
            let filter = SeccompFilter::new(
                rules
                    .into_iter()
                    .map(|(nr, r)| (nr, r.unwrap_or_default()))
                    .collect(),
                refused.clone(),
                SeccompAction::Allow,
                arch,
            )
            .map_err(|e| format!("seccomp: the {} filter: {e}", kind.name()))?;
            let program: BpfProgram = filter
                .try_into()
                .map_err(|e| format!("seccomp: the {} filter: {e}", kind.name()))?;
            // The clone3 filter goes first: applying a filter needs prctl(NO_NEW_PRIVS),
            // which the thread's own list does not allow.
            if kind == ThreadKind::Api {
                programs[kind.index()].push(clone3_enosys(arch)?);
            }
            programs[kind.index()].push(program);
        }
        if mode == SeccompMode::Trap {
            install_sigsys_handler()?;
        }
        Ok(Filters { mode, programs })
    }

    pub fn mode(&self) -> SeccompMode {
        self.mode
    }

    /// Installs `kind`'s filter on the calling thread (nothing when off). Refuses a thread
    /// that already runs under a filter: it inherited its parent's, and both would apply.
    pub fn apply(&self, kind: ThreadKind) -> Result<(), String> {
        if self.mode == SeccompMode::Off {
            return Ok(());
        }
        let name = thread_name();
        let shown = String::from_utf8_lossy(&name[..name_len(&name)]).into_owned();
        // SAFETY: PR_GET_SECCOMP takes no pointer; it returns 2 under a filter.
        if unsafe { libc::prctl(libc::PR_GET_SECCOMP) } == 2 {
            return Err(format!(
                "seccomp: thread {shown} already runs under the filter of the thread that \
                 started it; start every thread before its parent applies its own filter"
            ));
        }
        let _ = KIND.try_with(|k| k.set(kind.index() as u8 + 1));
        for program in &self.programs[kind.index()] {
            seccompiler::apply_filter(program).map_err(|e| {
                format!(
                    "seccomp: cannot apply the {} filter to thread {shown}: {e}",
                    kind.name()
                )
            })?;
        }
        Ok(())
    }
}

static GLOBAL: OnceLock<Filters> = OnceLock::new();

/// Makes `filters` the process's set, for [`apply_current`]. Only the first call counts.
pub fn install(filters: Filters) -> Result<(), String> {
    GLOBAL
        .set(filters)
        .map_err(|_| "seccomp: the filters are already installed".to_string())
}

/// Applies `kind`'s filter from the process's set ([`install`]) to the calling thread.
/// With no set installed it applies nothing (tests and tools that start no vmm).
pub fn apply_current(kind: ThreadKind) -> Result<(), String> {
    match GLOBAL.get() {
        Some(f) => f.apply(kind),
        None => Ok(()),
    }
}

mod names;
mod rules;
mod sigsys;
#[cfg(test)]
mod tests;

pub use names::syscall_name;
pub use rules::allowed;
use rules::*;
use sigsys::*;
