//! What `vmm-img` does with an image: open it read-only under an [`Overlay`], build the
//! disk's chain of interceptors over it exactly as `vmm` would, and ask each layer what it
//! holds (its stats) or to verify itself (its check hook). Without a chain, only the
//! outermost layer is named, from its magic bytes.

use crate::config::InterceptorConfig;
use compat::{
    BlockBackend, BlockRequestKind, BlockStack, IoRequest, PluginRegistry, RequestStatus,
};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const SECTOR: u64 = compat::SECTOR_SIZE;

/// The image read-only, with every write the layers make while they open or check (a
/// journal replay, a new header generation, a commit at close) kept in memory instead:
/// inspecting an image never changes it, whatever a plugin does.
pub struct Overlay {
    file: File,
    capacity: u64,
    written: Mutex<BTreeMap<u64, Box<[u8; SECTOR as usize]>>>,
}

impl Overlay {
    pub fn new(file: File) -> std::io::Result<Overlay> {
        let capacity = file.metadata()?.len() / SECTOR * SECTOR;
        Ok(Overlay {
            file,
            capacity,
            written: Mutex::new(BTreeMap::new()),
        })
    }

    /// Bytes the layers wrote (kept in memory, not on the image).
    pub fn overlay_bytes(&self) -> u64 {
        self.written.lock().map_or(0, |w| w.len() as u64 * SECTOR)
    }

    /// `buf.len()` bytes at `offset`: the image's, with what was written over them.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> bool {
        if self.file.read_exact_at(buf, offset).is_err() {
            return false;
        }
        let Ok(w) = self.written.lock() else {
            return false;
        };
        let end = offset + buf.len() as u64;
        for (&sector, data) in w.range(offset / SECTOR..end.div_ceil(SECTOR)) {
            let (s_start, s_end) = (sector * SECTOR, sector * SECTOR + SECTOR);
            let (from, to) = (s_start.max(offset), s_end.min(end));
            buf[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&data[(from - s_start) as usize..(to - s_start) as usize]);
        }
        true
    }

    /// Keeps `data` at `offset` in memory; a sector it covers in part is read first.
    fn write_at(&self, offset: u64, data: &[u8]) -> bool {
        let end = offset + data.len() as u64;
        for sector in offset / SECTOR..end.div_ceil(SECTOR) {
            let (s_start, s_end) = (sector * SECTOR, sector * SECTOR + SECTOR);
            let mut block = Box::new([0u8; SECTOR as usize]);
            let (from, to) = (s_start.max(offset), s_end.min(end));
            if (from, to) != (s_start, s_end) && !self.read_at(s_start, &mut block[..]) {
                return false;
            }
            block[(from - s_start) as usize..(to - s_start) as usize]
                .copy_from_slice(&data[(from - offset) as usize..(to - offset) as usize]);
            let Ok(mut w) = self.written.lock() else {
                return false;
            };
            w.insert(sector, block);
        }
        true
    }
}

impl BlockBackend for Overlay {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    unsafe fn execute(&self, req: &IoRequest<'_>) -> RequestStatus {
        let mut at = req.offset;
        let ok = match req.kind {
            BlockRequestKind::Read | BlockRequestKind::Write => req.segments.iter().all(|s| {
                let done = if req.kind == BlockRequestKind::Read {
                    // SAFETY: the caller guarantees the segment is writable for its length.
                    let buf = unsafe { std::slice::from_raw_parts_mut(s.base, s.len) };
                    self.read_at(at, buf)
                } else {
                    // SAFETY: the caller guarantees the segment is readable for its length.
                    let buf = unsafe { std::slice::from_raw_parts(s.base, s.len) };
                    self.write_at(at, buf)
                };
                at += s.len as u64;
                done
            }),
            BlockRequestKind::Flush => true,
            // The zeroes a punched hole reads back as, in memory like every write.
            BlockRequestKind::Discard | BlockRequestKind::WriteZeroes => {
                let zeros = vec![0u8; 1 << 20];
                let mut left = req.len;
                let mut ok = true;
                while left > 0 && ok {
                    let n = left.min(zeros.len() as u64);
                    ok = self.write_at(at, &zeros[..n as usize]);
                    at += n;
                    left -= n;
                }
                ok
            }
            _ => return RequestStatus::Unsupported,
        };
        if ok {
            RequestStatus::Ok
        } else {
            RequestStatus::IoError
        }
    }
}

/// Where an image is and which chain of interceptors holds it (top first).
pub struct Target {
    pub image: PathBuf,
    pub chain: Vec<InterceptorConfig>,
}

/// A file of `[[interceptor]]` entries (as in `configs/interceptors/`), each plugin path and
/// `*_file` value (`key_file`) taken relative to the file's directory; the chain is the
/// entries in order.
pub fn chain_file(path: &Path) -> Result<Vec<InterceptorConfig>, String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        #[serde(default)]
        interceptor: Vec<InterceptorConfig>,
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let f: File = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut chain = f.interceptor;
    for ic in &mut chain {
        if ic.path.is_relative() {
            ic.path = base.join(&ic.path);
        }
        ic.resolve_files(base);
    }
    Ok(chain)
}

/// The image and chain of disk `disk` in a `vmm` config.
pub fn from_vm_config(path: &Path, disk: &str) -> Result<Target, String> {
    let cfg = crate::config::VmConfig::load(path).map_err(|e| e.to_string())?;
    let b = cfg.block.iter().find(|b| b.id == disk).ok_or_else(|| {
        let ids: Vec<&str> = cfg.block.iter().map(|b| b.id.as_str()).collect();
        format!(
            "{}: no [[block]] has id `{disk}` (there are: {})",
            path.display(),
            ids.join(", ")
        )
    })?;
    let mut chain = Vec::new();
    for id in &b.interceptors {
        let ic = cfg
            .interceptor
            .iter()
            .find(|i| &i.id == id)
            .ok_or_else(|| format!("{}: no [[interceptor]] has id `{id}`", path.display()))?;
        chain.push(ic.clone());
    }
    Ok(Target {
        image: b.path.clone(),
        chain,
    })
}

/// Why inspecting did not get as far as the layers' own answers.
#[derive(Debug)]
pub enum OpenFailure {
    /// vmm-img cannot run at all: the image or a plugin cannot be read, a config is wrong.
    Error(String),
    /// A layer refused to open the image (it is damaged, or the key is not its key).
    Refused(String),
}

/// The image opened (read-only, shared lock) with its chain built over it.
pub struct Opened {
    pub overlay: Arc<Overlay>,
    pub stack: Arc<BlockStack>,
    /// Bytes the image takes on the host's file system.
    pub allocated: u64,
}

pub fn open(target: &Target) -> Result<Opened, OpenFailure> {
    let file = crate::storage::open_image(&target.image, true).map_err(OpenFailure::Error)?;
    let allocated = {
        use std::os::unix::fs::MetadataExt;
        file.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
    };
    let overlay = Arc::new(
        Overlay::new(file)
            .map_err(|e| OpenFailure::Error(format!("{}: {e}", target.image.display())))?,
    );
    let registry = PluginRegistry::new();
    let mut specs = Vec::new();
    for ic in &target.chain {
        let spec = crate::storage::instance_spec(&registry, ic)
            .map_err(|e| OpenFailure::Error(format!("interceptor {}: {e}", ic.id)))?;
        specs.push(spec);
    }
    let backend: Arc<dyn BlockBackend> = overlay.clone();
    let stack = BlockStack::build("image", backend, &specs)
        .map_err(|e| OpenFailure::Refused(e.to_string()))?;
    Ok(Opened {
        overlay,
        stack,
        allocated,
    })
}

/// The outermost layer named by its magic bytes (a superblock or header copy at 0, 512 or
/// 4096), with its version; `None` for an image that starts with none vmm knows.
pub fn sniff(image: &Path) -> Result<Option<String>, String> {
    let file = File::open(image).map_err(|e| format!("{}: {e}", image.display()))?;
    let mut head = vec![0u8; 8192];
    let n = file
        .read_at(&mut head, 0)
        .map_err(|e| format!("{}: {e}", image.display()))?;
    head.truncate(n);
    if head.iter().all(|&b| b == 0) {
        return Ok(Some("blank (all zeroes at the start)".into()));
    }
    for at in [0usize, 512, 4096] {
        let Some(h) = head.get(at..at + 16) else {
            continue;
        };
        let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        let what = match &h[..8] {
            b"VMMCRYPT" => format!("encrypt layout v{version}"),
            b"VMMREMAP" => format!("remap layout v{version}"),
            b"VMMSTORE" => {
                // The owner's 16 bytes may be cut off by a short (hostile) file.
                let owner: String = head[at + 12..head.len().min(at + 28)]
                    .iter()
                    .take_while(|&&b| b != 0)
                    .map(|&b| char::from(b))
                    .collect();
                format!("extent store v{version} of `{owner}`")
            }
            _ => continue,
        };
        return Ok(Some(what));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::sniff;

    /// A file that ends inside a superblock (someone wrote the magic and stopped) is named
    /// from what is there, never read past its end.
    #[test]
    fn sniffing_a_file_cut_short_inside_its_header_does_not_read_past_it() {
        let dir = std::env::temp_dir().join(format!("vmm-img-sniff-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("short.img");
        let mut bytes = vec![0u8; 4096];
        bytes.extend_from_slice(b"VMMSTORE\x01\0\0\0dedu");
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(
            sniff(&path).unwrap().as_deref(),
            Some("extent store v1 of `dedu`")
        );
        // Magic and nothing after it: too short to name.
        std::fs::write(&path, b"VMMCRYPT").unwrap();
        assert_eq!(sniff(&path).unwrap(), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
