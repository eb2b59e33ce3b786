//! Loading plugins by path. The file is opened once and copied into a sealed memfd; the
//! BLAKE3 pin is checked on those sealed bytes, and the dynamic loader maps exactly them
//! (`/proc/self/fd/N` of the memfd), so none of a plugin's code runs unless it is the code
//! that was hashed, and a file changed or swapped at its path after that changes nothing.
//! Then the entry symbol and the ABI version. A library is identified by its content hash:
//! the same bytes are loaded once (and unloaded when the last instance holding it is gone),
//! new bytes at the same path are loaded anew.

use interceptor_abi::{self as abi, InterceptorTable};
use std::collections::HashMap;
use std::ffi::CStr;
use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

/// The largest plugin file the loader copies into memory (a debug build of the largest
/// plugin here is about 13 MiB).
pub const MAX_PLUGIN_BYTES: u64 = 256 << 20;

/// Why a plugin or an instance was refused. Each message is one line.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: no such file")]
    NotFound { path: String },
    #[error("{path}: cannot read: {message}")]
    Unreadable { path: String, message: String },
    #[error("{path}: BLAKE3 is {found}, but the config pins {expected}")]
    HashMismatch {
        path: String,
        expected: String,
        found: String,
    },
    #[error("{path}: not a loadable shared object: {message}")]
    NotSharedObject { path: String, message: String },
    #[error("{path}: no entry symbol `{symbol}`: not an interceptor plugin")]
    NoEntry { path: String, symbol: &'static str },
    #[error("{path}: plugin ABI version {found}, this VMM speaks 1 to {expected}")]
    AbiMismatch {
        path: String,
        found: u32,
        expected: u32,
    },
    #[error("{path}: bad plugin table: {message}")]
    BadTable { path: String, message: String },
    #[error("plugin `{plugin}` does not support {kind} devices")]
    UnsupportedDevice { plugin: String, kind: &'static str },
    #[error("plugin `{plugin}` refused its config: {message}")]
    CreateFailed { plugin: String, message: String },
    #[error("plugin `{plugin}`: {message}")]
    BadInstance { plugin: String, message: String },
    #[error(
        "plugin `{plugin}` would expose {exposed} bytes where the layers below hold {below}: \
         a running guest's disk cannot change size; load it from the config at boot"
    )]
    CapacityChange {
        plugin: String,
        exposed: u64,
        below: u64,
    },
    #[error("chain of device `{device}` is longer than {max} interceptors")]
    ChainTooLong { device: String, max: usize },
}

/// A loaded plugin library and its validated table.
pub struct Plugin {
    path: PathBuf,
    blake3: String,
    name: String,
    /// The plugin's table as far as it declares it, fields it predates `None`.
    table: InterceptorTable,
    // Dropped (dlclose) after everything that points into it...
    _library: libloading::Library,
    // ...and the sealed copy it was loaded from closed after that: while the library is
    // loaded, its `/proc/self/fd/N` name is held by no other file.
    _memfd: Option<OwnedFd>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("path", &self.path)
            .field("name", &self.name)
            .field("blake3", &self.blake3)
            .finish()
    }
}

impl Plugin {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// BLAKE3 of the bytes loaded (the sealed copy of the file), in hex.
    pub fn blake3(&self) -> &str {
        &self.blake3
    }

    /// The name the plugin gives itself.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn abi_version(&self) -> u32 {
        self.table.abi_version
    }

    /// The flags the plugin declares (`abi::F_*`).
    pub fn flags(&self) -> u32 {
        self.table.flags
    }

    pub(crate) fn table(&self) -> &InterceptorTable {
        &self.table
    }

    /// A plugin linked into this program instead of loaded (tests, benchmarks).
    pub fn from_static(
        name: &str,
        table: &'static InterceptorTable,
    ) -> Result<Arc<Plugin>, LoadError> {
        let path = format!("<static {name}>");
        // SAFETY: a reference to a whole table.
        let table = unsafe { read_table(&path, table)? };
        check_table(&path, &table)?;
        Ok(Arc::new(Plugin {
            path: PathBuf::from(&path),
            blake3: String::new(),
            name: table_name(&table),
            table,
            _library: libloading::os::unix::Library::this().into(),
            _memfd: None,
        }))
    }
}

fn table_name(table: &InterceptorTable) -> String {
    // SAFETY: check_table verified the pointer is non-null; plugins promise NUL termination.
    unsafe { CStr::from_ptr(table.name) }
        .to_string_lossy()
        .chars()
        .take(64)
        .collect()
}

/// A copy of the plugin's table: the fields its `table_size` covers, later ones `None`.
///
/// # Safety
/// `t` must point at a table of at least the size it declares (or of
/// [`abi::TABLE_V1_SIZE`] when it declares 0).
unsafe fn read_table(
    path: &str,
    t: *const InterceptorTable,
) -> Result<InterceptorTable, LoadError> {
    // The fields before `table_size` are in every table.
    let declared = std::ptr::addr_of!((*t).table_size).read() as usize;
    let size = if declared == 0 {
        abi::TABLE_V1_SIZE
    } else {
        declared
    };
    if size < abi::TABLE_V1_SIZE {
        return Err(LoadError::BadTable {
            path: path.into(),
            message: format!(
                "table_size {declared} is smaller than the first table ({} bytes)",
                abi::TABLE_V1_SIZE
            ),
        });
    }
    // All-zero is a valid table: every function pointer None, name NULL.
    let mut copy = std::mem::MaybeUninit::<InterceptorTable>::zeroed();
    let n = size.min(std::mem::size_of::<InterceptorTable>());
    std::ptr::copy_nonoverlapping(t.cast::<u8>(), copy.as_mut_ptr().cast::<u8>(), n);
    Ok(copy.assume_init())
}

fn check_table(path: &str, t: &InterceptorTable) -> Result<(), LoadError> {
    if !(abi::ABI_VERSION_MIN..=abi::ABI_VERSION).contains(&t.abi_version) {
        return Err(LoadError::AbiMismatch {
            path: path.into(),
            found: t.abi_version,
            expected: abi::ABI_VERSION,
        });
    }
    let bad = |message: &str| LoadError::BadTable {
        path: path.into(),
        message: message.into(),
    };
    if t.name.is_null() {
        return Err(bad("name is NULL"));
    }
    if t.create.is_none() || t.pre.is_none() || t.post.is_none() || t.destroy.is_none() {
        return Err(bad("create, pre, post and destroy are required"));
    }
    let known = abi::F_MODIFIES_DATA
        | abi::F_KEEP_WHEN_DISABLED
        | abi::F_OWNS_FORMAT
        | abi::F_HANDLES_DISCARD
        | abi::F_NET_PLAIN_FRAMES
        | abi::F_CONCURRENT;
    if t.flags & !known != 0 {
        return Err(bad(&format!("unknown flags {:#x}", t.flags & !known)));
    }
    // Skipped while disabled, a plugin that owns its format would hand its own bytes to the
    // guest as data: such a plugin must stay in the path.
    if t.flags & abi::F_OWNS_FORMAT != 0 && t.flags & abi::F_KEEP_WHEN_DISABLED == 0 {
        return Err(bad(
            "VMM_INTERCEPTOR_F_OWNS_FORMAT needs VMM_INTERCEPTOR_F_KEEP_WHEN_DISABLED: \
             skipped while disabled, its data would read back as it is on the disk",
        ));
    }
    Ok(())
}

/// Plugins loaded so far, by the BLAKE3 of their bytes.
#[derive(Default)]
pub struct PluginRegistry {
    loaded: Mutex<HashMap<String, Weak<Plugin>>>,
}

/// Called between reading a plugin's bytes and loading them (tests swap the file there).
#[cfg(test)]
pub(crate) type AfterRead = HashMap<PathBuf, Box<dyn FnOnce() + Send>>;
#[cfg(test)]
pub(crate) static AFTER_READ: Mutex<Option<AfterRead>> = Mutex::new(None);

impl PluginRegistry {
    pub fn new() -> PluginRegistry {
        PluginRegistry::default()
    }

    /// Loads `path`: its bytes are copied into a sealed memfd and hashed there; with `pin`,
    /// the hash must match before any of its code runs. A library with the same hash that
    /// is still loaded is returned instead of loading it twice.
    pub fn load(&self, path: &Path, pin: Option<&str>) -> Result<Arc<Plugin>, LoadError> {
        let shown = path.display().to_string();
        let unreadable = |message: String| LoadError::Unreadable {
            path: shown.clone(),
            message,
        };
        let (memfd, found) = sealed_copy(path).map_err(|e| match e {
            CopyError::NotFound => LoadError::NotFound {
                path: shown.clone(),
            },
            CopyError::Other(m) => unreadable(m),
        })?;
        #[cfg(test)]
        {
            let hook = AFTER_READ
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_mut()
                .and_then(|m| m.remove(path));
            if let Some(hook) = hook {
                hook();
            }
        }
        if let Some(expected) = pin {
            if !expected.eq_ignore_ascii_case(&found) {
                return Err(LoadError::HashMismatch {
                    path: shown,
                    expected: expected.to_string(),
                    found,
                });
            }
        }
        let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = loaded.get(&found).and_then(Weak::upgrade) {
            return Ok(p);
        }
        let plugin = Arc::new(open(&shown, canonical, memfd, found.clone())?);
        loaded.retain(|_, w| w.strong_count() > 0);
        loaded.insert(found, Arc::downgrade(&plugin));
        Ok(plugin)
    }
}

pub(crate) enum CopyError {
    NotFound,
    Other(String),
}

impl From<std::io::Error> for CopyError {
    fn from(e: std::io::Error) -> CopyError {
        CopyError::Other(e.to_string())
    }
}

/// Opens `path` once, copies its bytes into a new memfd, seals it against any change and
/// hashes the sealed bytes. Only a regular file of at most [`MAX_PLUGIN_BYTES`] is read.
pub(crate) fn sealed_copy(path: &Path) -> Result<(OwnedFd, String), CopyError> {
    // O_NONBLOCK: opening a FIFO must not wait for a writer. Only a regular file is read
    // (a device like /dev/zero would never end).
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => CopyError::NotFound,
            _ => CopyError::Other(e.to_string()),
        })?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(CopyError::Other("not a regular file".into()));
    }
    let too_big = || {
        CopyError::Other(format!(
            "larger than {} MiB, the most a plugin may be",
            MAX_PLUGIN_BYTES >> 20
        ))
    };
    if meta.len() > MAX_PLUGIN_BYTES {
        return Err(too_big());
    }
    let memfd = memfd(path)?;
    let mut copy = std::fs::File::from(memfd);
    // Bounded even if the file grows while it is read. Through a buffer of ours, not
    // `io::copy` (which splices or sends pages between the files): pages still pinned by
    // such a transfer made the seal below fail with EBUSY under load.
    let copied = copy_through_buffer(&mut (&file).take(MAX_PLUGIN_BYTES + 1), &mut copy)?;
    if copied > MAX_PLUGIN_BYTES {
        return Err(too_big());
    }
    copy.flush()?;
    // F_SEAL_FUTURE_WRITE, not F_SEAL_WRITE: the latter waits for every extra reference
    // to the memfd's pages to go (a page still in another CPU's LRU batch, or being
    // migrated) and fails with EBUSY after about 150 ms, which happened under load. The
    // two differ only for writable mappings made before the seal, and this memfd was never
    // mapped: either way no write(2), mmap or truncate can change it afterwards.
    let seals =
        libc::F_SEAL_FUTURE_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a descriptor we own, with an integer argument.
    if unsafe { libc::fcntl(copy.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(CopyError::Other(format!(
            "sealing its copy: {}",
            std::io::Error::last_os_error()
        )));
    }
    // Hash what is sealed: exactly the bytes the dynamic loader will map.
    copy.rewind()?;
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(&copy)?;
    Ok((OwnedFd::from(copy), hasher.finalize().to_hex().to_string()))
}

/// Copies `from` into `to` through a buffer in this process; returns the bytes copied.
fn copy_through_buffer(from: &mut impl Read, to: &mut impl Write) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// A new memfd that can be sealed and mapped executable, named after the plugin's file
/// (the name shows in /proc/self/maps as `/memfd:vmm-plugin:FILE (deleted)`).
fn memfd(path: &Path) -> Result<OwnedFd, CopyError> {
    let file = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name: String = format!("vmm-plugin:{file}")
        .chars()
        .filter(|&c| c != '\0')
        .take(200)
        .collect();
    let name = std::ffi::CString::new(name).unwrap_or_default();
    let base = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    // MFD_EXEC says so where vm.memfd_noexec would otherwise refuse executable mappings;
    // kernels before 6.3 do not know the flag (EINVAL), and map any memfd executable.
    for flags in [base | libc::MFD_EXEC, base] {
        // SAFETY: a valid C string and flags; the result is a new descriptor or -1.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
        if fd >= 0 {
            // SAFETY: memfd_create returned a descriptor nobody else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(CopyError::Other(format!(
                "creating its in-memory copy: {e}"
            )));
        }
    }
    Err(CopyError::Other(
        "creating its in-memory copy: memfd_create refused".into(),
    ))
}

/// The dynamic loader knows a library by the name it was opened with: `/proc/self/fd/N`
/// names a library loaded earlier from another descriptor N that is still mapped (one
/// that cannot be unloaded). Such a name would load that library, not ours: move the
/// memfd to a descriptor number whose name is free.
fn free_name(memfd: OwnedFd) -> Result<(OwnedFd, String), String> {
    let mut fd = memfd;
    let mut tried = Vec::new();
    for _ in 0..64 {
        let name = format!("/proc/self/fd/{}", fd.as_raw_fd());
        // SAFETY: RTLD_NOLOAD maps nothing and runs nothing: it only finds a library
        // already loaded under this name (or from this very file, which is new).
        match unsafe {
            libloading::os::unix::Library::open(Some(&name), libc::RTLD_NOLOAD | libc::RTLD_LAZY)
        } {
            Err(_) => return Ok((fd, name)),
            Ok(stale) => drop(stale),
        }
        // SAFETY: F_DUPFD_CLOEXEC on a descriptor we own gives a new one above it.
        let next =
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, fd.as_raw_fd() + 1) };
        if next < 0 {
            return Err(format!("{}", std::io::Error::last_os_error()));
        }
        tried.push(fd);
        // SAFETY: fcntl returned a new descriptor nobody else owns.
        fd = unsafe { OwnedFd::from_raw_fd(next) };
    }
    Err("no free /proc/self/fd name for its copy".into())
}

fn open(
    shown: &str,
    canonical: PathBuf,
    memfd: OwnedFd,
    blake3: String,
) -> Result<Plugin, LoadError> {
    let (memfd, name) = free_name(memfd).map_err(|message| LoadError::Unreadable {
        path: shown.into(),
        message,
    })?;
    // SAFETY: loading a library runs its initializers; that is what loading a plugin the
    // operator named means. These are the sealed bytes whose hash was checked.
    let library =
        unsafe { libloading::Library::new(&name) }.map_err(|e| LoadError::NotSharedObject {
            path: shown.into(),
            message: e.to_string().replace(&name, "file"),
        })?;
    // SAFETY: the symbol's type is fixed by the ABI.
    let entry =
        unsafe { library.get::<abi::EntryFn>(abi::ENTRY_SYMBOL.as_bytes()) }.map_err(|_| {
            LoadError::NoEntry {
                path: shown.into(),
                symbol: abi::ENTRY_SYMBOL,
            }
        })?;
    // SAFETY: the entry takes no arguments and returns a pointer to a static table.
    let table = unsafe { entry() };
    if table.is_null() {
        return Err(LoadError::BadTable {
            path: shown.into(),
            message: "entry returned NULL".into(),
        });
    }
    // SAFETY: the table is static data inside the library, which `Plugin` keeps loaded,
    // at least as long as the size it declares.
    let table = unsafe { read_table(shown, table)? };
    check_table(shown, &table)?;
    Ok(Plugin {
        path: canonical,
        blake3,
        name: table_name(&table),
        table,
        _library: library,
        _memfd: Some(memfd),
    })
}

#[cfg(test)]
#[path = "tests/loader.rs"]
mod tests;
