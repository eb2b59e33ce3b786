//! What the api crate's tests (and the `serve` example) share: a VM stand-in, disks over
//! temporary files (a positioned-I/O file backend like `devices`' raw-file one, kept here so
//! the API's tests build on the shim alone), and a small keep-alive HTTP client.

#![allow(dead_code)]

use compat::{
    BlockBackend, BlockRequestKind, InstanceSpec, IoRequest, LiveStack, PluginRegistry,
    RequestStatus,
};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use vmm_api::{ApiState, Disk, VmControl, VmInfo};

/// The VM's side of the API without a VM.
#[derive(Default)]
pub struct StandInVm {
    pub stopping: AtomicBool,
}

impl VmControl for StandInVm {
    fn info(&self) -> VmInfo {
        VmInfo {
            state: if self.stopping.load(Ordering::SeqCst) {
                "ShuttingDown"
            } else {
                "Running"
            },
            vcpus: 2,
            memory_mib: 256,
            uptime: Duration::from_secs(7),
        }
    }

    fn shutdown(&self) -> Result<(), String> {
        self.stopping.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// A fresh directory of this process's own under the system's temporary directory (short,
/// so socket paths fit in `sun_path`).
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-api-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A disk that is a host file, read and written at the request's offset.
pub struct FileDisk {
    file: std::fs::File,
    capacity: u64,
}

impl FileDisk {
    /// The whole file is the disk.
    pub fn new(file: std::fs::File) -> FileDisk {
        let capacity = file.metadata().map(|m| m.len()).unwrap_or(0) / 512 * 512;
        FileDisk { file, capacity }
    }
}

impl BlockBackend for FileDisk {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    unsafe fn execute(&self, req: &IoRequest<'_>) -> RequestStatus {
        let mut at = req.offset;
        for s in req.segments {
            let done = match req.kind {
                BlockRequestKind::Read => {
                    // SAFETY: the caller guarantees the segment is writable for its length.
                    let buf = unsafe { std::slice::from_raw_parts_mut(s.base, s.len) };
                    self.file.read_exact_at(buf, at)
                }
                BlockRequestKind::Write => {
                    // SAFETY: the caller guarantees the segment is readable for its length.
                    let buf = unsafe { std::slice::from_raw_parts(s.base, s.len) };
                    self.file.write_all_at(buf, at)
                }
                BlockRequestKind::Flush => self.file.sync_data(),
                _ => return RequestStatus::Unsupported,
            };
            if done.is_err() {
                return RequestStatus::IoError;
            }
            at += s.len as u64;
        }
        RequestStatus::Ok
    }
}

/// A disk of `bytes` zeroes at `path` and its stack, with no interceptors.
pub fn disk(path: &Path, id: &str, bytes: u64) -> Arc<LiveStack> {
    disk_with(path, id, bytes, &[])
}

/// [`disk`] with `chain` (top first) over it.
pub fn disk_with(path: &Path, id: &str, bytes: u64, chain: &[InstanceSpec]) -> Arc<LiveStack> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap();
    file.set_len(bytes).unwrap();
    let backend = Arc::new(FileDisk::new(file));
    Arc::new(LiveStack::start(id, backend, chain, None).unwrap())
}

/// An API state over `disks` (ids and stacks) with a stand-in VM.
pub fn state(disks: &[(&str, Arc<LiveStack>)]) -> ApiState {
    let disks = disks
        .iter()
        .map(|(id, stack)| Disk {
            id: id.to_string(),
            read_only: false,
            stack: stack.clone(),
            queues: Arc::new(Vec::new),
        })
        .collect();
    ApiState::new(
        Arc::new(StandInVm::default()),
        disks,
        Arc::new(PluginRegistry::new()),
    )
}

/// One keep-alive connection: requests one after another, each answer read by its length.
pub struct Conn {
    pub stream: UnixStream,
    buffered: Vec<u8>,
}

impl Conn {
    pub fn open(sock: &Path) -> std::io::Result<Conn> {
        let stream = UnixStream::connect(sock)?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        stream.set_write_timeout(Some(Duration::from_secs(20)))?;
        Ok(Conn {
            stream,
            buffered: Vec::new(),
        })
    }

    /// `GET path` on this connection; the status and the body.
    pub fn get(&mut self, path: &str) -> std::io::Result<(u16, String)> {
        let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        self.stream.write_all(req.as_bytes())?;
        self.answer()
    }

    /// Reads one answer: the head up to the blank line, then content-length bytes.
    pub fn answer(&mut self) -> std::io::Result<(u16, String)> {
        let bad =
            |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
        let head_end = loop {
            if let Some(i) = self.buffered.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "closed before an answer",
                ));
            }
            self.buffered.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&self.buffered[..head_end]).into_owned();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("no status"))?;
        let length: usize = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0);
        while self.buffered.len() < head_end + length {
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(bad("closed in the body"));
            }
            self.buffered.extend_from_slice(&chunk[..n]);
        }
        let body =
            String::from_utf8_lossy(&self.buffered[head_end..head_end + length]).into_owned();
        self.buffered.drain(..head_end + length);
        Ok((status, body))
    }

    /// Waits for the server to close: `Ok(elapsed)` at EOF (or a reset), an error if it is
    /// still open after `limit`.
    pub fn wait_closed(&mut self, limit: Duration) -> std::io::Result<Duration> {
        let start = std::time::Instant::now();
        self.stream.set_read_timeout(Some(limit))?;
        let mut chunk = [0u8; 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(start.elapsed()),
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Ok(start.elapsed())
                }
                Err(e) => return Err(e),
            }
        }
    }
}
