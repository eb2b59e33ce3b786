//! QEMU's image locks, taken beside vmm's own `flock`, so that QEMU, qemu-img, qemu-io,
//! qemu-nbd and vmm refuse each other's open images. QEMU (block/file-posix.c) holds one
//! shared OFD byte-range lock per block-layer permission it uses, at byte 100 + the
//! permission's bit, and one per permission it does not let others have, at byte 200 +
//! the bit; before it goes on it tests whether anyone else holds the byte that would
//! conflict. `flock` and OFD locks do not see each other on Linux, so vmm takes both.
//!
//! vmm as a writer holds "consistent read" and "write" and shares neither "write" nor
//! "resize", as a QEMU guest's disk does by default; as a reader (a read-only disk,
//! `vmm-img`) it holds "consistent read" and still lets nobody write or resize.

use std::fs::File;
use std::os::fd::AsRawFd;

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
/// QEMU's permission bits, by index: BLK_PERM_CONSISTENT_READ, _WRITE, _WRITE_UNCHANGED,
/// _RESIZE.
const NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
const CONSISTENT_READ: usize = 0;
const WRITE: usize = 1;
const RESIZE: usize = 3;

/// Takes QEMU's lock bytes on `file` for a reader or a writer, or says which permission
/// another program holds or denies. The locks go with the open file (they are OFD locks).
pub fn take(file: &File, read_only: bool) -> Result<(), String> {
    let held: &[usize] = if read_only {
        &[CONSISTENT_READ]
    } else {
        &[CONSISTENT_READ, WRITE]
    };
    let not_shared = [WRITE, RESIZE];
    // Locks first, tests after, as QEMU does: of two openers racing, at least one sees the
    // other.
    for &p in held {
        lock_byte(file, PERM_BASE + p as i64)?;
    }
    for p in not_shared {
        lock_byte(file, SHARED_BASE + p as i64)?;
    }
    for &p in held {
        if held_by_another(file, SHARED_BASE + p as i64)? {
            return Err(format!(
                "another program (QEMU, qemu-img, qemu-io or qemu-nbd) has it open and lets no \
                 one else have the \"{}\" permission",
                NAMES[p]
            ));
        }
    }
    for p in not_shared {
        if held_by_another(file, PERM_BASE + p as i64)? {
            return Err(format!(
                "another program (QEMU, qemu-img, qemu-io or qemu-nbd) has it open with the \
                 \"{}\" permission",
                NAMES[p]
            ));
        }
    }
    Ok(())
}

fn flock_at(byte: i64, kind: libc::c_int) -> libc::flock {
    // SAFETY: plain old data; all-zero is a valid value, the fields set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    fl
}

fn lock_byte(file: &File, byte: i64) -> Result<(), String> {
    let fl = flock_at(byte, libc::F_RDLCK);
    // SAFETY: a valid descriptor and a valid struct flock for F_OFD_SETLK.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!("cannot take QEMU's lock byte {byte}: {e}"));
    }
    Ok(())
}

fn held_by_another(file: &File, byte: i64) -> Result<bool, String> {
    let mut fl = flock_at(byte, libc::F_WRLCK);
    // SAFETY: as above, F_OFD_GETLK writes into `fl`.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!("cannot test QEMU's lock byte {byte}: {e}"));
    }
    // Only a lock on a range counts: on 9p (a VM's view of its host's files, as in this
    // project's lab) every `flock`, this process's own included, shows as a lock from byte
    // 0 to the end of the file, which QEMU never takes.
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short && fl.l_len != 0)
}
