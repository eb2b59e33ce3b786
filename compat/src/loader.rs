//! Loading plugins by path: checks before any of the plugin's code runs (file, BLAKE3 pin),
//! then the entry symbol and the ABI version. A library is loaded once and unloaded when the
//! last instance holding it is gone.

use interceptor_abi::{self as abi, InterceptorTable};
use std::collections::HashMap;
use std::ffi::CStr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

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
    #[error("{path}: plugin ABI version {found}, this VMM speaks {expected}")]
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
    #[error("chain of device `{device}` is longer than {max} interceptors")]
    ChainTooLong { device: String, max: usize },
}

/// A loaded plugin library and its validated table.
pub struct Plugin {
    path: PathBuf,
    blake3: String,
    name: String,
    table: &'static InterceptorTable,
    // Last: dropped (dlclose) after everything that points into it.
    _library: libloading::Library,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("path", &self.path)
            .field("name", &self.name)
            .finish()
    }
}

impl Plugin {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// BLAKE3 of the file as loaded, in hex.
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

    pub(crate) fn table(&self) -> &'static InterceptorTable {
        self.table
    }

    /// A plugin linked into this program instead of loaded (tests, benchmarks).
    pub fn from_static(
        name: &str,
        table: &'static InterceptorTable,
    ) -> Result<Arc<Plugin>, LoadError> {
        let path = format!("<static {name}>");
        check_table(&path, table)?;
        Ok(Arc::new(Plugin {
            path: PathBuf::from(&path),
            blake3: String::new(),
            name: table_name(table),
            table,
            _library: libloading::os::unix::Library::this().into(),
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

fn check_table(path: &str, t: &InterceptorTable) -> Result<(), LoadError> {
    if t.abi_version != abi::ABI_VERSION {
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
    let known = abi::F_MODIFIES_DATA | abi::F_KEEP_WHEN_DISABLED | abi::F_OWNS_FORMAT;
    if t.flags & !known != 0 {
        return Err(bad(&format!("unknown flags {:#x}", t.flags & !known)));
    }
    Ok(())
}

/// Plugins loaded so far, by canonical path.
#[derive(Default)]
pub struct PluginRegistry {
    loaded: Mutex<HashMap<PathBuf, Weak<Plugin>>>,
}

impl PluginRegistry {
    pub fn new() -> PluginRegistry {
        PluginRegistry::default()
    }

    /// Loads `path` (or returns the library already loaded from it). With `pin`, the file's
    /// BLAKE3 must match before any of its code runs.
    pub fn load(&self, path: &Path, pin: Option<&str>) -> Result<Arc<Plugin>, LoadError> {
        let shown = path.display().to_string();
        // O_NONBLOCK: opening a FIFO must not wait for a writer. Only a regular file is
        // hashed (a device like /dev/zero would never end).
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => LoadError::NotFound {
                    path: shown.clone(),
                },
                _ => LoadError::Unreadable {
                    path: shown.clone(),
                    message: e.to_string(),
                },
            })?;
        let unreadable = |e: std::io::Error| LoadError::Unreadable {
            path: shown.clone(),
            message: e.to_string(),
        };
        if !file.metadata().map_err(unreadable)?.is_file() {
            return Err(LoadError::Unreadable {
                path: shown,
                message: "not a regular file".into(),
            });
        }
        let canonical = path.canonicalize().map_err(unreadable)?;
        // Hash the open file; `open` checks that the path still names it once loaded.
        let mut hasher = blake3::Hasher::new();
        hasher.update_reader(&file).map_err(unreadable)?;
        let found = hasher.finalize().to_hex().to_string();
        if let Some(expected) = pin {
            if !expected.eq_ignore_ascii_case(&found) {
                return Err(LoadError::HashMismatch {
                    path: shown,
                    expected: expected.to_string(),
                    found,
                });
            }
        }
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = loaded.get(&canonical).and_then(Weak::upgrade) {
            if p.blake3 == found {
                return Ok(p);
            }
        }
        let plugin = Arc::new(open(&shown, &canonical, &file, found)?);
        loaded.retain(|_, w| w.strong_count() > 0);
        loaded.insert(canonical, Arc::downgrade(&plugin));
        Ok(plugin)
    }
}

/// (device, inode) of a file, to see that a path still names it.
fn identity(m: std::io::Result<std::fs::Metadata>) -> Option<(u64, u64)> {
    m.ok().map(|m| (m.dev(), m.ino()))
}

fn open(
    shown: &str,
    canonical: &Path,
    file: &std::fs::File,
    blake3: String,
) -> Result<Plugin, LoadError> {
    // SAFETY: loading a library runs its initializers; that is what loading a plugin the
    // operator named means. (Not loaded through /proc/self/fd: the dynamic loader matches
    // libraries by name, and descriptor numbers are reused.)
    let library =
        unsafe { libloading::Library::new(canonical) }.map_err(|e| LoadError::NotSharedObject {
            path: shown.into(),
            message: e.to_string().replace(&*canonical.to_string_lossy(), "file"),
        })?;
    // The hash (when pinned) was checked on `file`: the path must still name that file.
    if identity(file.metadata()) != identity(std::fs::metadata(canonical)) {
        return Err(LoadError::Unreadable {
            path: shown.into(),
            message: "the file was replaced while it was being loaded".into(),
        });
    }
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
    // SAFETY: the table is static data inside the library, which `Plugin` keeps loaded.
    let table: &'static InterceptorTable =
        unsafe { table.as_ref() }.ok_or(LoadError::BadTable {
            path: shown.into(),
            message: "entry returned NULL".into(),
        })?;
    check_table(shown, table)?;
    Ok(Plugin {
        path: canonical.to_path_buf(),
        blake3,
        name: table_name(table),
        table,
        _library: library,
    })
}
