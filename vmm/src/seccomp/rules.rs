//! The lists: what each kind of thread may call, as seccompiler rules.

use super::*;
use seccompiler::{SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition, SeccompRule};
use std::collections::BTreeMap;

/// The rules of one filter: syscall -> None (always allowed) or the argument rules (any of
/// which allows it).
pub(super) type Rules = BTreeMap<i64, Option<Vec<SeccompRule>>>;

pub(super) fn allow(r: &mut Rules, nrs: &[i64]) {
    for &nr in nrs {
        r.insert(nr, None);
    }
}

/// Allows `nr` when one of `rules` matches (unless it is already always allowed).
pub(super) fn allow_if(r: &mut Rules, nr: i64, rules: Vec<SeccompRule>) {
    match r.entry(nr).or_insert_with(|| Some(Vec::new())) {
        None => {}
        Some(v) => v.extend(rules),
    }
}

pub(super) fn cond(arg: u8, op: Op, value: u64) -> Result<SeccompCondition, String> {
    SeccompCondition::new(arg, Len::Qword, op, value).map_err(|e| format!("seccomp: {e}"))
}

pub(super) fn cond32(arg: u8, op: Op, value: u64) -> Result<SeccompCondition, String> {
    SeccompCondition::new(arg, Len::Dword, op, value).map_err(|e| format!("seccomp: {e}"))
}

pub(super) fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule, String> {
    SeccompRule::new(conds).map_err(|e| format!("seccomp: {e}"))
}

/// One rule per value: argument `arg` (32 bits) equals one of `values`.
pub(super) fn any_of(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>, String> {
    values
        .iter()
        .map(|&v| rule(vec![cond32(arg, Op::Eq, v)?]))
        .collect()
}

/// The KVM ioctls the vCPU and API threads make, by number (include/uapi/linux/kvm.h).
pub(super) mod kvm {
    use kvm_bindings::*;
    use std::mem::size_of;
    use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ, _IOC_WRITE};

    const fn ior<T>(nr: u32) -> u64 {
        ioctl_expr(_IOC_READ, KVMIO, nr, size_of::<T>() as u32) as u64
    }

    const fn iowr<T>(nr: u32) -> u64 {
        ioctl_expr(_IOC_READ | _IOC_WRITE, KVMIO, nr, size_of::<T>() as u32) as u64
    }

    pub const KVM_RUN: u64 = ioctl_expr(_IOC_NONE, KVMIO, 0x80, 0) as u64;
    /// What `GET /vm/vcpus` reads on a vCPU's thread (vmm/src/probe.rs).
    pub const VCPU_PROBE: [u64; 5] = [
        ior::<kvm_regs>(0x81),
        iowr::<kvm_msrs>(0x88),
        ior::<kvm_lapic_state>(0x8e),
        ior::<kvm_mp_state>(0x98),
        ior::<kvm_vcpu_events>(0x9f),
    ];
    /// What `GET /vm/kvm` reads on the API's threads: KVM_GET_IRQCHIP, KVM_GET_CLOCK.
    pub const VM_PROBE: [u64; 2] = [iowr::<kvm_irqchip>(0x62), ior::<kvm_clock_data>(0x7c)];
}

/// What every thread may call: memory for the allocator, futexes, time, its own signal
/// mask and alternate stack, writing (stderr, eventfds), closing, ending itself, random
/// bytes for hash maps, reading its own name and seccomp state; abort() (SIGABRT to this
/// process only) and the stack-overflow handler's reset of SIGSEGV and SIGBUS.
/// mmap and mprotect never with PROT_EXEC here: `exec_maps` adds that where plugins load.
pub(super) fn base(r: &mut Rules, pid: u64) -> Result<(), String> {
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
    // The standard library's check before it closes a descriptor (debug builds): any
    // thread can end up dropping the last owner of one.
    allow_if(r, libc::SYS_fcntl, any_of(1, &[libc::F_GETFD as u64])?);
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
pub(super) fn exec_maps(r: &mut Rules) {
    allow(r, &[libc::SYS_mmap, libc::SYS_mprotect]);
}

/// Descriptors already open, read and written in order (sockets, eventfds, a plugin's file
/// and its memfd copy): reads, writes, vectored, seeks, sizes, descriptor flags.
pub(super) fn stream_io(r: &mut Rules) {
    allow(
        r,
        &[
            libc::SYS_read,
            libc::SYS_readv,
            libc::SYS_write,
            libc::SYS_writev,
            libc::SYS_lseek,
            libc::SYS_fstat,
            libc::SYS_fcntl,
        ],
    );
}

/// Files already open (the disk images, eventfds): [`stream_io`], positioned and vectored
/// reads and writes, syncs.
pub(super) fn file_io(r: &mut Rules) {
    stream_io(r);
    allow(
        r,
        &[
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_preadv,
            libc::SYS_pwritev,
            libc::SYS_preadv2,
            libc::SYS_pwritev2,
            libc::SYS_fsync,
            libc::SYS_fdatasync,
        ],
    );
}

/// An event loop (event-manager, tokio): epoll over eventfds and sockets.
pub(super) fn event_loop(r: &mut Rules) {
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
pub(super) fn open_read_only(r: &mut Rules) -> Result<(), String> {
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
pub(super) fn threads(r: &mut Rules) -> Result<(), String> {
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
pub(super) fn plugin_loader(r: &mut Rules) {
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
pub(super) fn device(r: &mut Rules, pid: u64) -> Result<(), String> {
    base(r, pid)?;
    file_io(r);
    event_loop(r);
    open_read_only(r)?;
    // A plugin's relative paths and locks on the files it opens (the API takes absolute
    // paths only, and locks nothing).
    allow(r, &[libc::SYS_getcwd, libc::SYS_flock]);
    // The io_uring engine: submitting to and waiting on its ring, and dropping its file
    // when it goes. Rings are set up and restricted at start on the main thread, before any
    // filter: one runs only reads, writes and fsync on its disk, and its only registration
    // call left is that drop; no thread may set up another.
    allow(r, &[libc::SYS_io_uring_enter, libc::SYS_io_uring_register]);
    // Discard and write-zeroes punch holes in the disk file (on a descriptor already open).
    allow(r, &[libc::SYS_fallocate]);
    // Interrupt coalescing arms and stops each queue's timer (created at start).
    allow(r, &[libc::SYS_timerfd_settime]);
    Ok(())
}

pub(super) fn rules(kind: ThreadKind, pid: u64) -> Result<Rules, String> {
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
            // Its state for the API (`GET /vm/vcpus`): reads only.
            allow_if(&mut r, libc::SYS_ioctl, any_of(1, &kvm::VCPU_PROBE)?);
            // A device's activation clones its eventfds.
            allow_if(
                &mut r,
                libc::SYS_fcntl,
                any_of(1, &[libc::F_DUPFD_CLOEXEC as u64])?,
            );
        }
        ThreadKind::Device => {
            device(&mut r, pid)?;
            // A net card's thread tells its tap (opened at start) which offloads the guest
            // agreed to finish: that one ioctl, on no other thread.
            allow_if(
                &mut r,
                libc::SYS_ioctl,
                any_of(1, &[devices::virtio::net::tap::TUNSETOFFLOAD()])?,
            );
        }
        ThreadKind::Api => {
            // Not the device list: the API does no disk I/O (edits run on the devices'
            // threads), only its socket, plugin files and their copies.
            base(&mut r, pid)?;
            stream_io(&mut r);
            event_loop(&mut r);
            open_read_only(&mut r)?;
            exec_maps(&mut r);
            plugin_loader(&mut r);
            threads(&mut r)?;
            // The control socket's connections (the listening socket is bound before).
            allow(
                &mut r,
                &[libc::SYS_accept4, libc::SYS_recvfrom, libc::SYS_shutdown],
            );
            // `GET /vm/kvm` reads the VM's interrupt controllers and clock; `GET
            // /vm/vcpus` kicks each vCPU out of KVM_RUN (their signal, to this process
            // only) so that it reads its own state.
            allow_if(&mut r, libc::SYS_ioctl, any_of(1, &kvm::VM_PROBE)?);
            kick_vcpus(&mut r, pid)?;
        }
        ThreadKind::Main => {
            device(&mut r, pid)?;
            // Waiting for the guest's end (poll on the exit eventfd and the stop signals'
            // signalfd), kicking the vCPUs out of KVM_RUN (their signal, to this process
            // only), removing the API socket.
            allow(&mut r, &[libc::SYS_poll, libc::SYS_ppoll, libc::SYS_unlink]);
            kick_vcpus(&mut r, pid)?;
        }
    }
    Ok(r)
}

/// The vCPUs' kick signal, to a thread of this process only.
fn kick_vcpus(r: &mut Rules, pid: u64) -> Result<(), String> {
    allow_if(
        r,
        libc::SYS_tgkill,
        vec![rule(vec![
            cond32(0, Op::Eq, pid)?,
            cond32(2, Op::Eq, crate::vcpu::kick_signal() as u64)?,
        ])?],
    );
    Ok(())
}

/// A second filter for the API thread: clone3 answers ENOSYS, everything else passes on to
/// the first (the most severe answer of all filters wins, so Trap there still traps).
pub(super) fn clone3_enosys(arch: seccompiler::TargetArch) -> Result<BpfProgram, String> {
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
