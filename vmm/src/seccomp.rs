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

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition,
    SeccompFilter, SeccompRule,
};
use std::cell::Cell;
use std::collections::BTreeMap;
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

/// [`apply_current`] for a thread's start hook, which cannot return an error: a filter
/// that cannot be applied ends the process with status 1 and one line on stderr (the vmm
/// never runs a thread without its filter when filters are on).
pub fn apply_current_or_exit(kind: ThreadKind) {
    if let Err(e) = apply_current(kind) {
        eprintln!("vmm: {e}");
        std::process::exit(1);
    }
}

// ---- the lists -------------------------------------------------------------------------

/// The rules of one filter: syscall -> None (always allowed) or the argument rules (any of
/// which allows it).
type Rules = BTreeMap<i64, Option<Vec<SeccompRule>>>;

fn allow(r: &mut Rules, nrs: &[i64]) {
    for &nr in nrs {
        r.insert(nr, None);
    }
}

/// Allows `nr` when one of `rules` matches (unless it is already always allowed).
fn allow_if(r: &mut Rules, nr: i64, rules: Vec<SeccompRule>) {
    match r.entry(nr).or_insert_with(|| Some(Vec::new())) {
        None => {}
        Some(v) => v.extend(rules),
    }
}

fn cond(arg: u8, op: Op, value: u64) -> Result<SeccompCondition, String> {
    SeccompCondition::new(arg, Len::Qword, op, value).map_err(|e| format!("seccomp: {e}"))
}

fn cond32(arg: u8, op: Op, value: u64) -> Result<SeccompCondition, String> {
    SeccompCondition::new(arg, Len::Dword, op, value).map_err(|e| format!("seccomp: {e}"))
}

fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule, String> {
    SeccompRule::new(conds).map_err(|e| format!("seccomp: {e}"))
}

/// One rule per value: argument `arg` (32 bits) equals one of `values`.
fn any_of(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>, String> {
    values
        .iter()
        .map(|&v| rule(vec![cond32(arg, Op::Eq, v)?]))
        .collect()
}

/// The KVM ioctls a vCPU thread makes, by number (include/uapi/linux/kvm.h).
mod kvm {
    use kvm_bindings::KVMIO;
    use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE};

    pub const KVM_RUN: u64 = ioctl_expr(_IOC_NONE, KVMIO, 0x80, 0) as u64;
}

/// What every thread may call: memory for the allocator, futexes, time, its own signal
/// mask and alternate stack, writing (stderr, eventfds), closing, ending itself, random
/// bytes for hash maps, reading its own name and seccomp state; abort() (SIGABRT to this
/// process only) and the stack-overflow handler's reset of SIGSEGV and SIGBUS.
/// mmap and mprotect never with PROT_EXEC here: `exec_maps` adds that where plugins load.
fn base(r: &mut Rules, pid: u64) -> Result<(), String> {
    allow(
        r,
        &[
            libc::SYS_brk,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_madvise,
            libc::SYS_futex,
            libc::SYS_sched_yield,
            libc::SYS_clock_gettime,
            libc::SYS_clock_nanosleep,
            libc::SYS_nanosleep,
            libc::SYS_getpid,
            libc::SYS_gettid,
            libc::SYS_rt_sigprocmask,
            libc::SYS_rt_sigreturn,
            libc::SYS_sigaltstack,
            libc::SYS_restart_syscall,
            libc::SYS_exit,
            libc::SYS_exit_group,
            libc::SYS_write,
            libc::SYS_close,
            libc::SYS_getrandom,
        ],
    );
    let no_exec = || -> Result<Vec<SeccompRule>, String> {
        Ok(vec![rule(vec![cond(
            2,
            Op::MaskedEq(libc::PROT_EXEC as u64),
            0,
        )?])?])
    };
    allow_if(r, libc::SYS_mmap, no_exec()?);
    allow_if(r, libc::SYS_mprotect, no_exec()?);
    allow_if(
        r,
        libc::SYS_prctl,
        any_of(0, &[libc::PR_GET_NAME as u64, libc::PR_GET_SECCOMP as u64])?,
    );
    allow_if(
        r,
        libc::SYS_tgkill,
        vec![rule(vec![
            cond32(0, Op::Eq, pid)?,
            cond32(2, Op::Eq, libc::SIGABRT as u64)?,
        ])?],
    );
    allow_if(
        r,
        libc::SYS_rt_sigaction,
        any_of(
            0,
            &[
                libc::SIGSEGV as u64,
                libc::SIGBUS as u64,
                libc::SIGABRT as u64,
            ],
        )?,
    );
    Ok(())
}

/// mmap and mprotect with PROT_EXEC: loading a plugin (dlopen maps its code).
fn exec_maps(r: &mut Rules) {
    allow(r, &[libc::SYS_mmap, libc::SYS_mprotect]);
}

/// Files already open (the disk images, eventfds): reads, writes, positioned and vectored,
/// syncs, sizes, descriptor flags.
fn file_io(r: &mut Rules) {
    allow(
        r,
        &[
            libc::SYS_read,
            libc::SYS_readv,
            libc::SYS_write,
            libc::SYS_writev,
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_preadv,
            libc::SYS_pwritev,
            libc::SYS_preadv2,
            libc::SYS_pwritev2,
            libc::SYS_lseek,
            libc::SYS_fsync,
            libc::SYS_fdatasync,
            libc::SYS_fstat,
            libc::SYS_fcntl,
        ],
    );
}

/// An event loop (event-manager, tokio): epoll over eventfds and sockets.
fn event_loop(r: &mut Rules) {
    allow(
        r,
        &[
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
            libc::SYS_read,
            libc::SYS_write,
        ],
    );
}

/// Opening files read-only (a plugin's .so and what it needs at create, such as a key
/// file): openat without write access, O_CREAT or O_TRUNC; file status; path resolution
/// and permission checks.
fn open_read_only(r: &mut Rules) -> Result<(), String> {
    let mask = (libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC) as u64;
    allow_if(
        r,
        libc::SYS_openat,
        vec![rule(vec![cond32(2, Op::MaskedEq(mask), 0)?])?],
    );
    allow(
        r,
        &[
            libc::SYS_fstat,
            libc::SYS_newfstatat,
            libc::SYS_statx,
            libc::SYS_readlink,
            libc::SYS_getcwd,
            libc::SYS_flock,
            // Permission checks on a path (the dynamic loader checks a library's before
            // mapping it): they open nothing.
            libc::SYS_access,
            libc::SYS_faccessat,
            libc::SYS_faccessat2,
        ],
    );
    Ok(())
}

/// Starting threads (the API's blocking pool): clone only with CLONE_THREAD (never a new
/// process); clone3, whose flags a filter cannot read, answers ENOSYS (a second filter), so
/// the C library falls back to clone.
fn threads(r: &mut Rules) -> Result<(), String> {
    allow_if(
        r,
        libc::SYS_clone,
        vec![rule(vec![cond(
            0,
            Op::MaskedEq(libc::CLONE_THREAD as u64),
            libc::CLONE_THREAD as u64,
        )?])?],
    );
    allow(
        r,
        &[
            libc::SYS_clone3,
            libc::SYS_set_robust_list,
            libc::SYS_rseq,
            libc::SYS_sched_getaffinity,
        ],
    );
    allow_if(r, libc::SYS_prctl, any_of(0, &[libc::PR_SET_NAME as u64])?);
    Ok(())
}

/// Loading a plugin (compat's loader): its bytes copied into a sealed memfd (memfd_create,
/// copy_file_range or sendfile, fcntl F_ADD_SEALS), the memfd moved to a free descriptor
/// number (fcntl F_DUPFD_CLOEXEC), then dlopen of /proc/self/fd/N (open_read_only,
/// exec_maps).
fn plugin_loader(r: &mut Rules) {
    allow(
        r,
        &[
            libc::SYS_memfd_create,
            libc::SYS_copy_file_range,
            libc::SYS_sendfile,
            libc::SYS_fcntl,
        ],
    );
}

/// The Device list: what a disk's I/O thread and every plugin hook on it may call. No
/// executable mappings and no loader: plugins are loaded (dlopen) on the main thread at
/// start and on the API's threads at run time; only their hooks run here.
fn device(r: &mut Rules, pid: u64) -> Result<(), String> {
    base(r, pid)?;
    file_io(r);
    event_loop(r);
    open_read_only(r)?;
    Ok(())
}

fn rules(kind: ThreadKind, pid: u64) -> Result<Rules, String> {
    let mut r = Rules::new();
    match kind {
        ThreadKind::Stdin => {
            base(&mut r, pid)?;
            // Reads only standard input.
            allow_if(
                &mut r,
                libc::SYS_read,
                vec![rule(vec![cond32(0, Op::Eq, 0)?])?],
            );
        }
        ThreadKind::Vcpu => {
            base(&mut r, pid)?;
            allow_if(&mut r, libc::SYS_ioctl, any_of(1, &[kvm::KVM_RUN])?);
            // A device's activation clones its eventfds (F_DUPFD_CLOEXEC); F_GETFD is the
            // standard library's check before a close.
            allow_if(
                &mut r,
                libc::SYS_fcntl,
                any_of(1, &[libc::F_DUPFD_CLOEXEC as u64, libc::F_GETFD as u64])?,
            );
        }
        ThreadKind::Device => device(&mut r, pid)?,
        ThreadKind::Api => {
            device(&mut r, pid)?;
            exec_maps(&mut r);
            plugin_loader(&mut r);
            threads(&mut r)?;
            // The control socket's connections (the listening socket is bound before).
            allow(
                &mut r,
                &[libc::SYS_accept4, libc::SYS_recvfrom, libc::SYS_shutdown],
            );
        }
        ThreadKind::Main => {
            device(&mut r, pid)?;
            // Waiting for the guest's end (poll on the exit eventfd and the stop signals'
            // signalfd), kicking the vCPUs out of KVM_RUN (their signal, to this process
            // only), removing the API socket.
            allow(&mut r, &[libc::SYS_poll, libc::SYS_ppoll, libc::SYS_unlink]);
            allow_if(
                &mut r,
                libc::SYS_tgkill,
                vec![rule(vec![
                    cond32(0, Op::Eq, pid)?,
                    cond32(2, Op::Eq, crate::vcpu::kick_signal() as u64)?,
                ])?],
            );
        }
    }
    Ok(r)
}

/// A second filter for the API thread: clone3 answers ENOSYS, everything else passes on to
/// the first (the most severe answer of all filters wins, so Trap there still traps).
fn clone3_enosys(arch: seccompiler::TargetArch) -> Result<BpfProgram, String> {
    let filter = SeccompFilter::new(
        [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(|e| format!("seccomp: the clone3 filter: {e}"))?;
    filter
        .try_into()
        .map_err(|e| format!("seccomp: the clone3 filter: {e}"))
}

/// The names of the syscalls `kind` may call, sorted, each marked `*` where the filter
/// checks its arguments (for docs/security.md and its test).
pub fn allowed(kind: ThreadKind) -> Result<Vec<String>, String> {
    let pid = u64::from(std::process::id());
    let mut names: Vec<String> = rules(kind, pid)?
        .into_iter()
        .map(|(nr, r)| {
            let name = syscall_name(nr).unwrap_or("?");
            match r {
                None => name.to_string(),
                Some(_) => format!("{name}*"),
            }
        })
        .collect();
    names.sort();
    Ok(names)
}

// ---- the SIGSYS report -----------------------------------------------------------------

thread_local! {
    /// The calling thread's kind + 1 (0: it applied none itself), for the report.
    static KIND: Cell<u8> = const { Cell::new(0) };
}

fn thread_name() -> [u8; 16] {
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes (NUL included) into the buffer.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    name
}

fn name_len(name: &[u8]) -> usize {
    name.iter().position(|&b| b == 0).unwrap_or(name.len())
}

/// The part of `siginfo_t` a seccomp SIGSYS fills (`_sigsys` in the kernel's union).
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// si_code of a SIGSYS raised by a seccomp filter.
const SYS_SECCOMP: libc::c_int = 1;

/// A line built without allocating (in a signal handler).
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn push_number(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

extern "C" fn on_sigsys(_signo: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // Only async-signal-safe steps from here on: prctl(PR_GET_NAME), write, exit_group, all
    // allowed by every filter.
    let mut line = Line {
        buf: [0; 256],
        len: 0,
    };
    // SAFETY: the kernel hands a valid siginfo_t; for a seccomp SIGSYS its union holds
    // `_sigsys`, which `SigsysInfo` mirrors.
    let sys = (!info.is_null()).then(|| unsafe { &*(info as *const SigsysInfo) });
    let name = thread_name();
    line.push(b"vmm: seccomp: thread ");
    line.push(&name[..name_len(&name)]);
    match sys {
        Some(s) if s.code == SYS_SECCOMP => {
            let nr = s.syscall as u32;
            line.push(b" made forbidden syscall ");
            line.push_number(u64::from(nr));
            line.push(b" (");
            line.push(syscall_name(i64::from(nr)).unwrap_or("unknown").as_bytes());
            line.push(b")");
            let kind = KIND.try_with(Cell::get).unwrap_or(0);
            match ThreadKind::ALL.get(usize::from(kind).wrapping_sub(1)) {
                Some(k) => {
                    line.push(b" under the ");
                    line.push(k.name().as_bytes());
                    line.push(b" filter");
                }
                None => line.push(b" under a filter it inherited"),
            }
        }
        _ => line.push(b" received SIGSYS (not from a filter)"),
    }
    line.push(b"; the vmm stops (exit ");
    line.push_number(EXIT_SECCOMP as u64);
    line.push(b", docs/security.md)\n");
    // SAFETY: write and exit_group on a buffer we own; exit_group does not return.
    unsafe {
        libc::write(libc::STDERR_FILENO, line.buf.as_ptr().cast(), line.len);
        libc::syscall(libc::SYS_exit_group, EXIT_SECCOMP);
    }
}

fn install_sigsys_handler() -> Result<(), String> {
    // SAFETY: a zeroed sigaction is valid; the handler only makes async-signal-safe calls.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigsys as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigfillset(&mut act.sa_mask);
        if libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) != 0 {
            return Err(format!(
                "seccomp: cannot install the SIGSYS handler: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// x86_64 system call names by number (the ones the libc crate names).
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    SYSCALL_NAMES
        .iter()
        .find(|(n, _)| *n == nr)
        .map(|(_, name)| *name)
}

/// Every x86_64 system call the libc crate names, for the report of a refused one.
#[rustfmt::skip]
static SYSCALL_NAMES: &[(i64, &str)] = &[
    (libc::SYS__sysctl, "_sysctl"),
    (libc::SYS_accept, "accept"),
    (libc::SYS_accept4, "accept4"),
    (libc::SYS_access, "access"),
    (libc::SYS_acct, "acct"),
    (libc::SYS_add_key, "add_key"),
    (libc::SYS_adjtimex, "adjtimex"),
    (libc::SYS_afs_syscall, "afs_syscall"),
    (libc::SYS_alarm, "alarm"),
    (libc::SYS_arch_prctl, "arch_prctl"),
    (libc::SYS_bind, "bind"),
    (libc::SYS_bpf, "bpf"),
    (libc::SYS_brk, "brk"),
    (libc::SYS_capget, "capget"),
    (libc::SYS_capset, "capset"),
    (libc::SYS_chdir, "chdir"),
    (libc::SYS_chmod, "chmod"),
    (libc::SYS_chown, "chown"),
    (libc::SYS_chroot, "chroot"),
    (libc::SYS_clock_adjtime, "clock_adjtime"),
    (libc::SYS_clock_getres, "clock_getres"),
    (libc::SYS_clock_gettime, "clock_gettime"),
    (libc::SYS_clock_nanosleep, "clock_nanosleep"),
    (libc::SYS_clock_settime, "clock_settime"),
    (libc::SYS_clone, "clone"),
    (libc::SYS_clone3, "clone3"),
    (libc::SYS_close, "close"),
    (libc::SYS_close_range, "close_range"),
    (libc::SYS_connect, "connect"),
    (libc::SYS_copy_file_range, "copy_file_range"),
    (libc::SYS_creat, "creat"),
    (libc::SYS_delete_module, "delete_module"),
    (libc::SYS_dup, "dup"),
    (libc::SYS_dup2, "dup2"),
    (libc::SYS_dup3, "dup3"),
    (libc::SYS_epoll_create, "epoll_create"),
    (libc::SYS_epoll_create1, "epoll_create1"),
    (libc::SYS_epoll_ctl, "epoll_ctl"),
    (libc::SYS_epoll_ctl_old, "epoll_ctl_old"),
    (libc::SYS_epoll_pwait, "epoll_pwait"),
    (libc::SYS_epoll_pwait2, "epoll_pwait2"),
    (libc::SYS_epoll_wait, "epoll_wait"),
    (libc::SYS_epoll_wait_old, "epoll_wait_old"),
    (libc::SYS_eventfd, "eventfd"),
    (libc::SYS_eventfd2, "eventfd2"),
    (libc::SYS_execve, "execve"),
    (libc::SYS_execveat, "execveat"),
    (libc::SYS_exit, "exit"),
    (libc::SYS_exit_group, "exit_group"),
    (libc::SYS_faccessat, "faccessat"),
    (libc::SYS_faccessat2, "faccessat2"),
    (libc::SYS_fadvise64, "fadvise64"),
    (libc::SYS_fallocate, "fallocate"),
    (libc::SYS_fanotify_init, "fanotify_init"),
    (libc::SYS_fanotify_mark, "fanotify_mark"),
    (libc::SYS_fchdir, "fchdir"),
    (libc::SYS_fchmod, "fchmod"),
    (libc::SYS_fchmodat, "fchmodat"),
    (libc::SYS_fchmodat2, "fchmodat2"),
    (libc::SYS_fchown, "fchown"),
    (libc::SYS_fchownat, "fchownat"),
    (libc::SYS_fcntl, "fcntl"),
    (libc::SYS_fdatasync, "fdatasync"),
    (libc::SYS_fgetxattr, "fgetxattr"),
    (libc::SYS_finit_module, "finit_module"),
    (libc::SYS_flistxattr, "flistxattr"),
    (libc::SYS_flock, "flock"),
    (libc::SYS_fork, "fork"),
    (libc::SYS_fremovexattr, "fremovexattr"),
    (libc::SYS_fsconfig, "fsconfig"),
    (libc::SYS_fsetxattr, "fsetxattr"),
    (libc::SYS_fsmount, "fsmount"),
    (libc::SYS_fsopen, "fsopen"),
    (libc::SYS_fspick, "fspick"),
    (libc::SYS_fstat, "fstat"),
    (libc::SYS_fstatfs, "fstatfs"),
    (libc::SYS_fsync, "fsync"),
    (libc::SYS_ftruncate, "ftruncate"),
    (libc::SYS_futex, "futex"),
    (libc::SYS_futex_waitv, "futex_waitv"),
    (libc::SYS_futimesat, "futimesat"),
    (libc::SYS_get_mempolicy, "get_mempolicy"),
    (libc::SYS_get_robust_list, "get_robust_list"),
    (libc::SYS_get_thread_area, "get_thread_area"),
    (libc::SYS_getcpu, "getcpu"),
    (libc::SYS_getcwd, "getcwd"),
    (libc::SYS_getdents, "getdents"),
    (libc::SYS_getdents64, "getdents64"),
    (libc::SYS_getegid, "getegid"),
    (libc::SYS_geteuid, "geteuid"),
    (libc::SYS_getgid, "getgid"),
    (libc::SYS_getgroups, "getgroups"),
    (libc::SYS_getitimer, "getitimer"),
    (libc::SYS_getpeername, "getpeername"),
    (libc::SYS_getpgid, "getpgid"),
    (libc::SYS_getpgrp, "getpgrp"),
    (libc::SYS_getpid, "getpid"),
    (libc::SYS_getpmsg, "getpmsg"),
    (libc::SYS_getppid, "getppid"),
    (libc::SYS_getpriority, "getpriority"),
    (libc::SYS_getrandom, "getrandom"),
    (libc::SYS_getresgid, "getresgid"),
    (libc::SYS_getresuid, "getresuid"),
    (libc::SYS_getrlimit, "getrlimit"),
    (libc::SYS_getrusage, "getrusage"),
    (libc::SYS_getsid, "getsid"),
    (libc::SYS_getsockname, "getsockname"),
    (libc::SYS_getsockopt, "getsockopt"),
    (libc::SYS_gettid, "gettid"),
    (libc::SYS_gettimeofday, "gettimeofday"),
    (libc::SYS_getuid, "getuid"),
    (libc::SYS_getxattr, "getxattr"),
    (libc::SYS_init_module, "init_module"),
    (libc::SYS_inotify_add_watch, "inotify_add_watch"),
    (libc::SYS_inotify_init, "inotify_init"),
    (libc::SYS_inotify_init1, "inotify_init1"),
    (libc::SYS_inotify_rm_watch, "inotify_rm_watch"),
    (libc::SYS_io_cancel, "io_cancel"),
    (libc::SYS_io_destroy, "io_destroy"),
    (libc::SYS_io_getevents, "io_getevents"),
    (libc::SYS_io_setup, "io_setup"),
    (libc::SYS_io_submit, "io_submit"),
    (libc::SYS_io_uring_enter, "io_uring_enter"),
    (libc::SYS_io_uring_register, "io_uring_register"),
    (libc::SYS_io_uring_setup, "io_uring_setup"),
    (libc::SYS_ioctl, "ioctl"),
    (libc::SYS_ioperm, "ioperm"),
    (libc::SYS_iopl, "iopl"),
    (libc::SYS_ioprio_get, "ioprio_get"),
    (libc::SYS_ioprio_set, "ioprio_set"),
    (libc::SYS_kcmp, "kcmp"),
    (libc::SYS_kexec_file_load, "kexec_file_load"),
    (libc::SYS_kexec_load, "kexec_load"),
    (libc::SYS_keyctl, "keyctl"),
    (libc::SYS_kill, "kill"),
    (libc::SYS_landlock_add_rule, "landlock_add_rule"),
    (libc::SYS_landlock_create_ruleset, "landlock_create_ruleset"),
    (libc::SYS_landlock_restrict_self, "landlock_restrict_self"),
    (libc::SYS_lchown, "lchown"),
    (libc::SYS_lgetxattr, "lgetxattr"),
    (libc::SYS_link, "link"),
    (libc::SYS_linkat, "linkat"),
    (libc::SYS_listen, "listen"),
    (libc::SYS_listxattr, "listxattr"),
    (libc::SYS_llistxattr, "llistxattr"),
    (libc::SYS_lookup_dcookie, "lookup_dcookie"),
    (libc::SYS_lremovexattr, "lremovexattr"),
    (libc::SYS_lseek, "lseek"),
    (libc::SYS_lsetxattr, "lsetxattr"),
    (libc::SYS_lstat, "lstat"),
    (libc::SYS_madvise, "madvise"),
    (libc::SYS_mbind, "mbind"),
    (libc::SYS_membarrier, "membarrier"),
    (libc::SYS_memfd_create, "memfd_create"),
    (libc::SYS_memfd_secret, "memfd_secret"),
    (libc::SYS_migrate_pages, "migrate_pages"),
    (libc::SYS_mincore, "mincore"),
    (libc::SYS_mkdir, "mkdir"),
    (libc::SYS_mkdirat, "mkdirat"),
    (libc::SYS_mknod, "mknod"),
    (libc::SYS_mknodat, "mknodat"),
    (libc::SYS_mlock, "mlock"),
    (libc::SYS_mlock2, "mlock2"),
    (libc::SYS_mlockall, "mlockall"),
    (libc::SYS_mmap, "mmap"),
    (libc::SYS_modify_ldt, "modify_ldt"),
    (libc::SYS_mount, "mount"),
    (libc::SYS_mount_setattr, "mount_setattr"),
    (libc::SYS_move_mount, "move_mount"),
    (libc::SYS_move_pages, "move_pages"),
    (libc::SYS_mprotect, "mprotect"),
    (libc::SYS_mq_getsetattr, "mq_getsetattr"),
    (libc::SYS_mq_notify, "mq_notify"),
    (libc::SYS_mq_open, "mq_open"),
    (libc::SYS_mq_timedreceive, "mq_timedreceive"),
    (libc::SYS_mq_timedsend, "mq_timedsend"),
    (libc::SYS_mq_unlink, "mq_unlink"),
    (libc::SYS_mremap, "mremap"),
    (libc::SYS_mseal, "mseal"),
    (libc::SYS_msgctl, "msgctl"),
    (libc::SYS_msgget, "msgget"),
    (libc::SYS_msgrcv, "msgrcv"),
    (libc::SYS_msgsnd, "msgsnd"),
    (libc::SYS_msync, "msync"),
    (libc::SYS_munlock, "munlock"),
    (libc::SYS_munlockall, "munlockall"),
    (libc::SYS_munmap, "munmap"),
    (libc::SYS_name_to_handle_at, "name_to_handle_at"),
    (libc::SYS_nanosleep, "nanosleep"),
    (libc::SYS_newfstatat, "newfstatat"),
    (libc::SYS_nfsservctl, "nfsservctl"),
    (libc::SYS_open, "open"),
    (libc::SYS_open_by_handle_at, "open_by_handle_at"),
    (libc::SYS_open_tree, "open_tree"),
    (libc::SYS_openat, "openat"),
    (libc::SYS_openat2, "openat2"),
    (libc::SYS_pause, "pause"),
    (libc::SYS_perf_event_open, "perf_event_open"),
    (libc::SYS_personality, "personality"),
    (libc::SYS_pidfd_getfd, "pidfd_getfd"),
    (libc::SYS_pidfd_open, "pidfd_open"),
    (libc::SYS_pidfd_send_signal, "pidfd_send_signal"),
    (libc::SYS_pipe, "pipe"),
    (libc::SYS_pipe2, "pipe2"),
    (libc::SYS_pivot_root, "pivot_root"),
    (libc::SYS_pkey_alloc, "pkey_alloc"),
    (libc::SYS_pkey_free, "pkey_free"),
    (libc::SYS_pkey_mprotect, "pkey_mprotect"),
    (libc::SYS_poll, "poll"),
    (libc::SYS_ppoll, "ppoll"),
    (libc::SYS_prctl, "prctl"),
    (libc::SYS_pread64, "pread64"),
    (libc::SYS_preadv, "preadv"),
    (libc::SYS_preadv2, "preadv2"),
    (libc::SYS_prlimit64, "prlimit64"),
    (libc::SYS_process_madvise, "process_madvise"),
    (libc::SYS_process_mrelease, "process_mrelease"),
    (libc::SYS_process_vm_readv, "process_vm_readv"),
    (libc::SYS_process_vm_writev, "process_vm_writev"),
    (libc::SYS_pselect6, "pselect6"),
    (libc::SYS_ptrace, "ptrace"),
    (libc::SYS_putpmsg, "putpmsg"),
    (libc::SYS_pwrite64, "pwrite64"),
    (libc::SYS_pwritev, "pwritev"),
    (libc::SYS_pwritev2, "pwritev2"),
    (libc::SYS_quotactl, "quotactl"),
    (libc::SYS_quotactl_fd, "quotactl_fd"),
    (libc::SYS_read, "read"),
    (libc::SYS_readahead, "readahead"),
    (libc::SYS_readlink, "readlink"),
    (libc::SYS_readlinkat, "readlinkat"),
    (libc::SYS_readv, "readv"),
    (libc::SYS_reboot, "reboot"),
    (libc::SYS_recvfrom, "recvfrom"),
    (libc::SYS_recvmmsg, "recvmmsg"),
    (libc::SYS_recvmsg, "recvmsg"),
    (libc::SYS_remap_file_pages, "remap_file_pages"),
    (libc::SYS_removexattr, "removexattr"),
    (libc::SYS_rename, "rename"),
    (libc::SYS_renameat, "renameat"),
    (libc::SYS_renameat2, "renameat2"),
    (libc::SYS_request_key, "request_key"),
    (libc::SYS_restart_syscall, "restart_syscall"),
    (libc::SYS_rmdir, "rmdir"),
    (libc::SYS_rseq, "rseq"),
    (libc::SYS_rt_sigaction, "rt_sigaction"),
    (libc::SYS_rt_sigpending, "rt_sigpending"),
    (libc::SYS_rt_sigprocmask, "rt_sigprocmask"),
    (libc::SYS_rt_sigqueueinfo, "rt_sigqueueinfo"),
    (libc::SYS_rt_sigreturn, "rt_sigreturn"),
    (libc::SYS_rt_sigsuspend, "rt_sigsuspend"),
    (libc::SYS_rt_sigtimedwait, "rt_sigtimedwait"),
    (libc::SYS_rt_tgsigqueueinfo, "rt_tgsigqueueinfo"),
    (libc::SYS_sched_get_priority_max, "sched_get_priority_max"),
    (libc::SYS_sched_get_priority_min, "sched_get_priority_min"),
    (libc::SYS_sched_getaffinity, "sched_getaffinity"),
    (libc::SYS_sched_getattr, "sched_getattr"),
    (libc::SYS_sched_getparam, "sched_getparam"),
    (libc::SYS_sched_getscheduler, "sched_getscheduler"),
    (libc::SYS_sched_rr_get_interval, "sched_rr_get_interval"),
    (libc::SYS_sched_setaffinity, "sched_setaffinity"),
    (libc::SYS_sched_setattr, "sched_setattr"),
    (libc::SYS_sched_setparam, "sched_setparam"),
    (libc::SYS_sched_setscheduler, "sched_setscheduler"),
    (libc::SYS_sched_yield, "sched_yield"),
    (libc::SYS_seccomp, "seccomp"),
    (libc::SYS_security, "security"),
    (libc::SYS_select, "select"),
    (libc::SYS_semctl, "semctl"),
    (libc::SYS_semget, "semget"),
    (libc::SYS_semop, "semop"),
    (libc::SYS_semtimedop, "semtimedop"),
    (libc::SYS_sendfile, "sendfile"),
    (libc::SYS_sendmmsg, "sendmmsg"),
    (libc::SYS_sendmsg, "sendmsg"),
    (libc::SYS_sendto, "sendto"),
    (libc::SYS_set_mempolicy, "set_mempolicy"),
    (libc::SYS_set_mempolicy_home_node, "set_mempolicy_home_node"),
    (libc::SYS_set_robust_list, "set_robust_list"),
    (libc::SYS_set_thread_area, "set_thread_area"),
    (libc::SYS_set_tid_address, "set_tid_address"),
    (libc::SYS_setdomainname, "setdomainname"),
    (libc::SYS_setfsgid, "setfsgid"),
    (libc::SYS_setfsuid, "setfsuid"),
    (libc::SYS_setgid, "setgid"),
    (libc::SYS_setgroups, "setgroups"),
    (libc::SYS_sethostname, "sethostname"),
    (libc::SYS_setitimer, "setitimer"),
    (libc::SYS_setns, "setns"),
    (libc::SYS_setpgid, "setpgid"),
    (libc::SYS_setpriority, "setpriority"),
    (libc::SYS_setregid, "setregid"),
    (libc::SYS_setresgid, "setresgid"),
    (libc::SYS_setresuid, "setresuid"),
    (libc::SYS_setreuid, "setreuid"),
    (libc::SYS_setrlimit, "setrlimit"),
    (libc::SYS_setsid, "setsid"),
    (libc::SYS_setsockopt, "setsockopt"),
    (libc::SYS_settimeofday, "settimeofday"),
    (libc::SYS_setuid, "setuid"),
    (libc::SYS_setxattr, "setxattr"),
    (libc::SYS_shmat, "shmat"),
    (libc::SYS_shmctl, "shmctl"),
    (libc::SYS_shmdt, "shmdt"),
    (libc::SYS_shmget, "shmget"),
    (libc::SYS_shutdown, "shutdown"),
    (libc::SYS_sigaltstack, "sigaltstack"),
    (libc::SYS_signalfd, "signalfd"),
    (libc::SYS_signalfd4, "signalfd4"),
    (libc::SYS_socket, "socket"),
    (libc::SYS_socketpair, "socketpair"),
    (libc::SYS_splice, "splice"),
    (libc::SYS_stat, "stat"),
    (libc::SYS_statfs, "statfs"),
    (libc::SYS_statx, "statx"),
    (libc::SYS_swapoff, "swapoff"),
    (libc::SYS_swapon, "swapon"),
    (libc::SYS_symlink, "symlink"),
    (libc::SYS_symlinkat, "symlinkat"),
    (libc::SYS_sync, "sync"),
    (libc::SYS_sync_file_range, "sync_file_range"),
    (libc::SYS_syncfs, "syncfs"),
    (libc::SYS_sysfs, "sysfs"),
    (libc::SYS_sysinfo, "sysinfo"),
    (libc::SYS_syslog, "syslog"),
    (libc::SYS_tee, "tee"),
    (libc::SYS_tgkill, "tgkill"),
    (libc::SYS_time, "time"),
    (libc::SYS_timer_create, "timer_create"),
    (libc::SYS_timer_delete, "timer_delete"),
    (libc::SYS_timer_getoverrun, "timer_getoverrun"),
    (libc::SYS_timer_gettime, "timer_gettime"),
    (libc::SYS_timer_settime, "timer_settime"),
    (libc::SYS_timerfd_create, "timerfd_create"),
    (libc::SYS_timerfd_gettime, "timerfd_gettime"),
    (libc::SYS_timerfd_settime, "timerfd_settime"),
    (libc::SYS_times, "times"),
    (libc::SYS_tkill, "tkill"),
    (libc::SYS_truncate, "truncate"),
    (libc::SYS_tuxcall, "tuxcall"),
    (libc::SYS_umask, "umask"),
    (libc::SYS_umount2, "umount2"),
    (libc::SYS_uname, "uname"),
    (libc::SYS_unlink, "unlink"),
    (libc::SYS_unlinkat, "unlinkat"),
    (libc::SYS_unshare, "unshare"),
    (libc::SYS_uselib, "uselib"),
    (libc::SYS_userfaultfd, "userfaultfd"),
    (libc::SYS_ustat, "ustat"),
    (libc::SYS_utime, "utime"),
    (libc::SYS_utimensat, "utimensat"),
    (libc::SYS_utimes, "utimes"),
    (libc::SYS_vfork, "vfork"),
    (libc::SYS_vhangup, "vhangup"),
    (libc::SYS_vmsplice, "vmsplice"),
    (libc::SYS_vserver, "vserver"),
    (libc::SYS_wait4, "wait4"),
    (libc::SYS_waitid, "waitid"),
    (libc::SYS_write, "write"),
    (libc::SYS_writev, "writev"),
];

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// The child's scenario (see `child`); unset in the ordinary test run.
    const CHILD_ENV: &str = "VMM_SECCOMP_TEST_CHILD";

    /// Runs `child` in a new process of this test binary with `scenario`; returns its exit
    /// status and stderr.
    fn run_child(scenario: &str) -> (Option<i32>, String) {
        let exe = std::env::current_exe().expect("the test binary");
        let out = Command::new(exe)
            .args(["--exact", "seccomp::tests::child", "--nocapture"])
            .args(["--test-threads", "1"])
            .env(CHILD_ENV, scenario)
            .output()
            .expect("running the child");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), err)
    }

    fn report(thread: &str, nr: i64, name: &str, kind: &str) -> String {
        format!(
            "vmm: seccomp: thread {thread} made forbidden syscall {nr} ({name}) under the \
             {kind} filter; the vmm stops (exit 159, docs/security.md)\n"
        )
    }

    /// Starts `io-test0`, which applies `kind`'s filter in `mode` and runs `f`, and waits
    /// for it; the process then exits 0 (a trapped call exits 159 before that).
    fn on_filtered_thread(mode: SeccompMode, kind: ThreadKind, f: impl FnOnce() + Send + 'static) {
        let filters = Filters::build(mode).expect("filters");
        let t = std::thread::Builder::new()
            .name("io-test0".into())
            .spawn(move || {
                filters.apply(kind).expect("apply");
                f();
            })
            .expect("spawn");
        let ok = t.join().is_ok();
        std::process::exit(if ok { 0 } else { 3 });
    }

    fn socket_inet() -> i32 {
        // SAFETY: plain syscall, no pointers.
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) }
    }

    /// The body of the child processes: one scenario per run, chosen by the parent.
    #[test]
    fn child() {
        let Ok(scenario) = std::env::var(CHILD_ENV) else {
            return; // the ordinary run: nothing to do
        };
        match scenario.as_str() {
            "device-allowed-then-socket" => {
                on_filtered_thread(SeccompMode::Trap, ThreadKind::Device, || {
                    // What a plugin hook may do: file I/O on open files, reading a file,
                    // random bytes, time, memory (never executable).
                    let mut f = std::fs::File::open("/proc/self/stat").expect("open read-only");
                    let mut s = String::new();
                    std::io::Read::read_to_string(&mut f, &mut s).expect("read");
                    let mut b = [0u8; 16];
                    // SAFETY: a buffer we own.
                    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
                    assert_eq!(n, 16);
                    let v: Vec<u8> = vec![1; 1 << 20];
                    drop(v);
                    let _ = std::time::Instant::now();
                    // SAFETY: an anonymous mapping, unmapped again.
                    unsafe {
                        let p = libc::mmap(
                            std::ptr::null_mut(),
                            4096,
                            libc::PROT_READ | libc::PROT_WRITE,
                            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                            -1,
                            0,
                        );
                        assert_ne!(p, libc::MAP_FAILED);
                        libc::munmap(p, 4096);
                    }
                    eprintln!("allowed calls passed");
                    let fd = socket_inet();
                    eprintln!("socket returned {fd}");
                })
            }
            "device-open-for-writing" => {
                on_filtered_thread(SeccompMode::Trap, ThreadKind::Device, || {
                    let path = std::env::temp_dir().join("vmm-seccomp-test-write");
                    let r = std::fs::File::create(path);
                    eprintln!("create returned {}", r.is_ok());
                })
            }
            "vcpu-tty-ioctl" => on_filtered_thread(SeccompMode::Trap, ThreadKind::Vcpu, || {
                let mut n: libc::c_int = 0;
                // SAFETY: FIONREAD writes one int.
                let r = unsafe { libc::ioctl(0, libc::FIONREAD, &mut n) };
                eprintln!("ioctl returned {r}");
            }),
            "vcpu-exec-mapping" | "device-exec-mapping" => {
                let kind = if scenario.starts_with("vcpu") {
                    ThreadKind::Vcpu
                } else {
                    ThreadKind::Device
                };
                on_filtered_thread(SeccompMode::Trap, kind, || {
                    // SAFETY: an anonymous mapping.
                    let p = unsafe {
                        libc::mmap(
                            std::ptr::null_mut(),
                            4096,
                            libc::PROT_READ | libc::PROT_EXEC,
                            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                            -1,
                            0,
                        )
                    };
                    eprintln!("mmap returned {p:?}");
                })
            }
            "api-fork" => on_filtered_thread(SeccompMode::Trap, ThreadKind::Api, || {
                // SAFETY: the child, if there were one, exits at once.
                let pid = unsafe { libc::fork() };
                if pid == 0 {
                    // SAFETY: leaving the forked child.
                    unsafe { libc::_exit(0) };
                }
                eprintln!("fork returned {pid}");
            }),
            "api-threads-inherit" => {
                let filters = Filters::build(SeccompMode::Trap).expect("filters");
                on_filtered_thread(SeccompMode::Trap, ThreadKind::Api, move || {
                    // The API thread may start threads (clone3 answers ENOSYS, clone with
                    // CLONE_THREAD passes); they inherit its filter, so applying another fails.
                    let inner = std::thread::Builder::new()
                        .name("api-edit".into())
                        .spawn(move || filters.apply(ThreadKind::Device))
                        .expect("spawn under the API filter")
                        .join()
                        .expect("join");
                    eprintln!("inner apply: {inner:?}");
                })
            }
            "log-socket" => on_filtered_thread(SeccompMode::Log, ThreadKind::Device, || {
                let fd = socket_inet();
                eprintln!(
                    "socket returned {}",
                    if fd >= 0 { "a descriptor" } else { "an error" }
                );
            }),
            "off-socket" => on_filtered_thread(SeccompMode::Off, ThreadKind::Device, || {
                let fd = socket_inet();
                eprintln!(
                    "socket returned {}",
                    if fd >= 0 { "a descriptor" } else { "an error" }
                );
            }),
            other => panic!("unknown scenario {other}"),
        }
    }

    #[test]
    fn a_forbidden_call_on_a_device_thread_stops_the_process_with_one_line() {
        let (code, err) = run_child("device-allowed-then-socket");
        assert_eq!(code, Some(EXIT_SECCOMP), "{err}");
        assert!(err.contains("allowed calls passed\n"), "{err}");
        assert!(!err.contains("socket returned"), "{err}");
        assert!(
            err.ends_with(&report("io-test0", libc::SYS_socket, "socket", "device")),
            "{err}"
        );
    }

    #[test]
    fn plugins_open_files_read_only() {
        let (code, err) = run_child("device-open-for-writing");
        assert_eq!(code, Some(EXIT_SECCOMP), "{err}");
        assert!(
            err.ends_with(&report("io-test0", libc::SYS_openat, "openat", "device")),
            "{err}"
        );
    }

    #[test]
    fn a_vcpu_makes_kvm_ioctls_only() {
        let (code, err) = run_child("vcpu-tty-ioctl");
        assert_eq!(code, Some(EXIT_SECCOMP), "{err}");
        assert!(
            err.ends_with(&report("io-test0", libc::SYS_ioctl, "ioctl", "vcpu")),
            "{err}"
        );
    }

    #[test]
    fn vcpus_and_plugin_hooks_map_no_code() {
        for kind in ["vcpu", "device"] {
            let (code, err) = run_child(&format!("{kind}-exec-mapping"));
            assert_eq!(code, Some(EXIT_SECCOMP), "{kind}: {err}");
            assert!(
                err.ends_with(&report("io-test0", libc::SYS_mmap, "mmap", kind)),
                "{kind}: {err}"
            );
        }
    }

    #[test]
    fn the_api_thread_starts_threads_but_no_process() {
        let (code, err) = run_child("api-fork");
        assert_eq!(code, Some(EXIT_SECCOMP), "{err}");
        assert!(
            err.ends_with(&report("io-test0", libc::SYS_clone, "clone", "api")),
            "{err}"
        );
    }

    #[test]
    fn a_thread_started_under_a_filter_cannot_apply_another() {
        let (code, err) = run_child("api-threads-inherit");
        assert_eq!(code, Some(0), "{err}");
        assert!(
            err.contains("inner apply: Err(\"seccomp: thread api-edit already runs under the filter of the thread that started it"),
            "{err}"
        );
    }

    #[test]
    fn log_and_off_let_the_call_run() {
        for scenario in ["log-socket", "off-socket"] {
            let (code, err) = run_child(scenario);
            assert_eq!(code, Some(0), "{scenario}: {err}");
            assert!(
                err.contains("socket returned a descriptor"),
                "{scenario}: {err}"
            );
        }
    }

    #[test]
    fn every_filter_builds_in_every_mode() {
        for mode in [SeccompMode::Trap, SeccompMode::Log, SeccompMode::Off] {
            let f = Filters::build(mode).unwrap();
            assert_eq!(f.mode(), mode);
        }
        assert_eq!(SeccompMode::default(), SeccompMode::Trap);
    }

    #[test]
    fn no_thread_may_start_programs_open_sockets_or_trace() {
        for kind in ThreadKind::ALL {
            let list = allowed(kind).unwrap();
            for bad in [
                "socket",
                "socketpair",
                "connect",
                "bind",
                "listen",
                "execve",
                "execveat",
                "fork",
                "vfork",
                "ptrace",
                "process_vm_readv",
                "process_vm_writev",
                "kill",
                "mount",
                "chroot",
                "pivot_root",
                "init_module",
                "finit_module",
                "bpf",
                "setuid",
                "unshare",
                "setns",
                "seccomp",
            ] {
                assert!(
                    !list.iter().any(|s| s.trim_end_matches('*') == bad),
                    "{} allows {bad}",
                    kind.name()
                );
            }
            let ioctl = list.iter().any(|s| s.starts_with("ioctl"));
            assert_eq!(ioctl, kind == ThreadKind::Vcpu, "{}: ioctl", kind.name());
            // Plugins load (a sealed memfd, then dlopen maps code) on the API's threads only.
            for loader in ["memfd_create", "mmap", "mprotect"] {
                assert_eq!(
                    list.iter().any(|s| s == loader),
                    kind == ThreadKind::Api,
                    "{}: {loader} without conditions",
                    kind.name()
                );
            }
        }
    }

    /// docs/security.md lists every filter's syscalls (section "Seccomp", a `text` block of
    /// `kind: name name*...` lines, continued on indented lines): they must be this code's.
    #[test]
    fn the_documented_lists_are_the_filters() {
        let doc =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/security.md"))
                .expect("docs/security.md");
        let section = doc
            .split("\n## Seccomp\n")
            .nth(1)
            .and_then(|s| s.split("\n## ").next())
            .expect("a Seccomp section");
        let block = section
            .split("```text\n")
            .nth(1)
            .and_then(|s| s.split("```").next())
            .expect("a text block in the Seccomp section");
        let mut lists: Vec<(String, Vec<String>)> = Vec::new();
        for line in block.lines() {
            match (line.starts_with(' '), line.split_once(':')) {
                (false, Some((kind, rest))) => lists.push((
                    kind.trim().to_string(),
                    rest.split_whitespace().map(String::from).collect(),
                )),
                _ => {
                    if let Some(last) = lists.last_mut() {
                        last.1.extend(line.split_whitespace().map(String::from));
                    }
                }
            }
        }
        let mut expected = String::new();
        for kind in ThreadKind::ALL {
            expected.push_str(&format!(
                "{}: {}\n",
                kind.name(),
                allowed(kind).unwrap().join(" ")
            ));
        }
        for kind in ThreadKind::ALL {
            let documented = lists
                .iter()
                .find(|(k, _)| k == kind.name())
                .map(|(_, l)| l.clone());
            assert_eq!(
                documented,
                Some(allowed(kind).unwrap()),
                "docs/security.md, the {} list; the filters are:\n{expected}",
                kind.name()
            );
        }
    }

    #[test]
    fn every_syscall_of_every_list_has_a_name() {
        for kind in ThreadKind::ALL {
            for s in allowed(kind).unwrap() {
                assert!(!s.starts_with('?'), "{}: {s}", kind.name());
            }
        }
        assert_eq!(syscall_name(libc::SYS_socket), Some("socket"));
        assert_eq!(syscall_name(100_000), None);
    }
}
