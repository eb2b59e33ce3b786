//! The SIGSYS report of trap mode: one line naming the thread and the call, then exit.

use super::*;
use std::cell::Cell;

thread_local! {
    /// The calling thread's kind + 1 (0: it applied none itself), for the report.
    pub(super) static KIND: Cell<u8> = const { Cell::new(0) };
}

pub(super) fn thread_name() -> [u8; 16] {
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes (NUL included) into the buffer.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    name
}

pub(super) fn name_len(name: &[u8]) -> usize {
    name.iter().position(|&b| b == 0).unwrap_or(name.len())
}

/// The part of `siginfo_t` a seccomp SIGSYS fills (`_sigsys` in the kernel's union).
#[repr(C)]
pub(super) struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// si_code of a SIGSYS raised by a seccomp filter.
pub(super) const SYS_SECCOMP: libc::c_int = 1;

/// A line built without allocating (in a signal handler).
pub(super) struct Line {
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

pub(super) extern "C" fn on_sigsys(
    _signo: libc::c_int,
    info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
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

pub(super) fn install_sigsys_handler() -> Result<(), String> {
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
