//! The host side: CPU time, the file's filesystem, the kernel, the test file itself.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Whose CPU time [`cpu_time`] reads.
#[derive(Clone, Copy, Debug)]
pub enum Who {
    /// This process: every thread, the kernel's io_uring workers (`iou-wrk-*`, threads of
    /// this process) included.
    Process,
    /// The calling thread alone (what fio reports as its job's `usr_cpu`/`sys_cpu`: fio
    /// reads `getrusage(RUSAGE_THREAD)`).
    Thread,
    /// The children this process has waited for, and theirs: a whole fio run.
    Children,
}

/// User plus system CPU time so far.
pub fn cpu_time(who: Who) -> Duration {
    let who = match who {
        Who::Process => libc::RUSAGE_SELF,
        Who::Thread => libc::RUSAGE_THREAD,
        Who::Children => libc::RUSAGE_CHILDREN,
    };
    // SAFETY: an all-zero rusage is a valid value for getrusage to fill.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid rusage to write.
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// The filesystem `path` (or, if it does not exist yet, its directory) lives on, by name.
pub fn filesystem(path: &Path) -> std::io::Result<&'static str> {
    let at = if path.exists() {
        path.to_path_buf()
    } else {
        match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    };
    let c = std::ffi::CString::new(at.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::other("a NUL in the path"))?;
    // SAFETY: an all-zero statfs is a valid value to fill.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid statfs to write.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fs_name(st.f_type as i64))
}

fn fs_name(magic: i64) -> &'static str {
    match magic {
        0xef53 => "ext4",
        0x5846_5342 => "xfs",
        0x9123_683e => "btrfs",
        0xf2f5_2010 => "f2fs",
        0x2fc1_2fc1 => "zfs",
        0x0102_1994 => "tmpfs",
        0x8584_58f6 => "ramfs",
        0x794c_7630 => "overlayfs",
        0x6969 => "nfs",
        0x6573_5546 => "fuse",
        0x6264_6576 => "devtmpfs",
        _ => "unknown",
    }
}

/// Memory-backed: no disk under it, so not what this benchmark is about.
fn in_memory(dir: &Path) -> bool {
    matches!(filesystem(dir), Ok("tmpfs" | "ramfs"))
}

/// The default test file: in /var/tmp, else next to this binary (the target directory),
/// else the current directory; the first of those that is on a disk (not tmpfs) and
/// writable.
pub fn default_file(size_mib: u64) -> Result<PathBuf, String> {
    let name = format!("engine-bench-{size_mib}m.img");
    let mut dirs = vec![PathBuf::from("/var/tmp")];
    if let Some(d) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        dirs.push(d);
    }
    dirs.push(PathBuf::from("."));
    for dir in dirs {
        if !dir.is_dir() || in_memory(&dir) {
            continue;
        }
        let probe = dir.join(format!(".{name}.probe"));
        if File::create(&probe).is_ok() {
            let _ = std::fs::remove_file(&probe);
            return Ok(dir.join(name));
        }
    }
    Err("no writable directory on a disk (not tmpfs) for the test file: give --file".into())
}

/// Makes `path` a regular file of exactly `bytes`, every block written (so reads hit
/// allocated blocks, not holes). An existing file of that size is reused as it is.
/// Returns whether it was (re)written.
pub fn prepare_file(path: &Path, bytes: u64) -> std::io::Result<bool> {
    if let Ok(meta) = std::fs::metadata(path) {
        let ft = meta.file_type();
        if ft.is_block_device() || ft.is_char_device() || !ft.is_file() {
            return Err(std::io::Error::other(
                "not a regular file (this benchmark writes all over it)",
            ));
        }
        if meta.len() == bytes && allocated(path, bytes) {
            return Ok(false);
        }
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    let mut rng = crate::rng::XorShift::new(0x5eed);
    let mut chunk = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        for w in chunk.chunks_exact_mut(8) {
            w.copy_from_slice(&rng.next_u64().to_le_bytes());
        }
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    Ok(true)
}

/// Makes `path` a blank (sparse, all zeros) regular file of exactly `bytes`, whatever it
/// held: a format-owning interceptor formats only a blank disk.
pub fn blank_file(path: &Path, bytes: u64) -> std::io::Result<()> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_file() {
            return Err(std::io::Error::other(
                "not a regular file (this benchmark makes it blank)",
            ));
        }
    }
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    f.set_len(bytes)
}

/// Are (nearly) all of the file's blocks allocated? A sparse file of the right size is
/// rewritten.
fn allocated(path: &Path, bytes: u64) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).is_ok_and(|m| m.blocks() * 512 >= bytes)
}

/// Reads the whole file once, so both sides start from the same warm page cache.
pub fn warm(path: &Path) -> std::io::Result<()> {
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    while f.read(&mut buf)? > 0 {}
    Ok(())
}

/// Writes the file's dirty pages back (between jobs, outside any measurement), so each
/// job starts with a clean page cache rather than the previous job's writeback.
pub fn settle(path: &Path) -> std::io::Result<()> {
    OpenOptions::new().write(true).open(path)?.sync_data()
}

/// `uname -r`.
pub fn kernel_release() -> String {
    // SAFETY: an all-zero utsname is a valid value to fill.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid utsname to write.
    if unsafe { libc::uname(&mut u) } != 0 {
        return "unknown".into();
    }
    // SAFETY: uname NUL-terminates the field.
    unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Online CPUs.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_written_whole_and_reused_at_the_same_size() {
        let dir = std::env::temp_dir();
        let path = dir.join(format!("engine-bench-test-{}.img", std::process::id()));
        assert!(
            prepare_file(&path, 3 << 20).unwrap(),
            "written the first time"
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 << 20);
        assert!(
            !prepare_file(&path, 3 << 20).unwrap(),
            "reused at the same size"
        );
        assert!(
            prepare_file(&path, 1 << 20).unwrap(),
            "rewritten at another size"
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
        assert_ne!(filesystem(&path).unwrap(), "");
        let _ = std::fs::remove_file(path);
    }
}
