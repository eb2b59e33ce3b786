//! Disks for the harnesses: a RAM disk whose every request is checked against the
//! backend contract (so a shim that hands a backend a request out of range, or segments that
//! do not add up, is a finding), and a scratch directory of this process's own.

use compat::{BlockBackend, BlockRequestKind, IoRequest, RequestStatus};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock};

pub struct MemDisk {
    data: Mutex<Vec<u8>>,
    serial: [u8; 20],
}

impl MemDisk {
    pub fn new(bytes: usize) -> MemDisk {
        MemDisk::from_image(vec![0; bytes])
    }

    pub fn from_image(image: Vec<u8>) -> MemDisk {
        let mut serial = [0u8; 20];
        serial[..9].copy_from_slice(b"fuzz-disk");
        MemDisk {
            data: Mutex::new(image),
            serial,
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn image(&self) -> Vec<u8> {
        self.lock().clone()
    }
}

impl BlockBackend for MemDisk {
    fn capacity(&self) -> u64 {
        self.lock().len() as u64
    }

    unsafe fn execute(&self, req: &IoRequest<'_>) -> RequestStatus {
        let mut data = self.lock();
        let sum: u64 = req.segments.iter().map(|s| s.len as u64).sum();
        assert_eq!(
            sum, req.len,
            "backend: the segments do not add up to the request"
        );
        let end = req.offset.checked_add(req.len);
        assert!(
            end.is_some_and(|e| e <= data.len() as u64),
            "backend: {:?} at {}+{} past the capacity {}",
            req.kind,
            req.offset,
            req.len,
            data.len()
        );
        if matches!(
            req.kind,
            BlockRequestKind::Discard | BlockRequestKind::WriteZeroes
        ) {
            assert!(
                req.segments.is_empty(),
                "backend: a range request with buffers"
            );
            let at = req.offset as usize;
            data[at..at + req.len as usize].fill(0);
            return RequestStatus::Ok;
        }
        let mut at = req.offset as usize;
        for s in req.segments {
            assert!(s.len == 0 || !s.base.is_null(), "backend: a NULL segment");
            match req.kind {
                // SAFETY: the caller guarantees each segment is valid for its length; the
                // range on the disk was checked above.
                BlockRequestKind::Read => unsafe {
                    std::ptr::copy_nonoverlapping(data[at..at + s.len].as_ptr(), s.base, s.len)
                },
                // SAFETY: as above.
                BlockRequestKind::Write => unsafe {
                    std::ptr::copy_nonoverlapping(s.base, data[at..at + s.len].as_mut_ptr(), s.len)
                },
                BlockRequestKind::GetId => {
                    let n = s.len.min(self.serial.len());
                    // SAFETY: as above; n is at most the segment's length.
                    unsafe { std::ptr::copy_nonoverlapping(self.serial.as_ptr(), s.base, n) };
                    return RequestStatus::Ok;
                }
                BlockRequestKind::Flush
                | BlockRequestKind::Discard
                | BlockRequestKind::WriteZeroes => {}
            }
            at += s.len;
        }
        RequestStatus::Ok
    }
}

static SCRATCH: OnceLock<PathBuf> = OnceLock::new();

/// A directory for this process's files (sockets, key files, images), made once and
/// emptied of what an earlier process with the same id left.
pub fn scratch_dir() -> &'static PathBuf {
    SCRATCH.get_or_init(|| {
        // Short: the API's socket path must fit in sun_path.
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("vmm-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch directory");
        // SAFETY: registers a plain function with no arguments.
        unsafe { libc::atexit(remove_scratch) };
        dir
    })
}

extern "C" fn remove_scratch() {
    if let Some(dir) = SCRATCH.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
}
