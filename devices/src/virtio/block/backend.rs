//! The raw-file backend: the disk is a host file (or block device), read and written with
//! positioned I/O straight between the file and guest memory (no copy in between).

use super::request::{BlockRequest, SECTOR_SIZE};
use compat::{BlockRequestKind, RequestStatus};
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};

pub struct RawFile {
    file: File,
    read_only: bool,
    capacity_sectors: u64,
    id: [u8; 20],
}

impl RawFile {
    pub fn new(file: File, read_only: bool, id: &str) -> std::io::Result<RawFile> {
        let mut f = file;
        let bytes = f.seek(SeekFrom::End(0))?;
        let mut serial = [0u8; 20];
        let n = id.len().min(20);
        serial[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(RawFile {
            file: f,
            read_only,
            capacity_sectors: bytes / SECTOR_SIZE,
            id: serial,
        })
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Runs a validated request; returns its status and the bytes written to the guest.
    pub fn execute(&mut self, mem: &GuestMemoryMmap, req: &BlockRequest) -> (RequestStatus, u32) {
        match self.run(mem, req) {
            Ok(written) => (RequestStatus::Ok, written),
            Err(status) => (status, 0),
        }
    }

    /// One preadv/pwritev for the whole request, straight between the file and the guest's
    /// buffers (re-issued for the rest after a short transfer).
    fn vectored(
        &self,
        mem: &GuestMemoryMmap,
        req: &BlockRequest,
        write: bool,
    ) -> std::io::Result<()> {
        let mut iovs = Vec::with_capacity(req.segments.len());
        for &(addr, len) in &req.segments {
            let slice = mem
                .get_slice(addr, len as usize)
                .map_err(std::io::Error::other)?;
            iovs.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: len as usize,
            });
        }
        let mut offset = (req.sector * SECTOR_SIZE) as libc::off_t;
        let mut first = 0;
        while first < iovs.len() {
            let batch = &iovs[first..];
            let count = batch.len().min(1024) as libc::c_int;
            let fd = self.file.as_raw_fd();
            // SAFETY: every iovec points into guest memory checked by get_slice above, which
            // stays mapped for the VM's life; the kernel reads or writes within those bounds.
            let n = unsafe {
                if write {
                    libc::pwritev(fd, batch.as_ptr(), count, offset)
                } else {
                    libc::preadv(fd, batch.as_ptr(), count, offset)
                }
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "short transfer",
                ));
            }
            offset += n as libc::off_t;
            // Skip the iovecs done, and trim a partly done one.
            let mut left = n as usize;
            while left > 0 && first < iovs.len() {
                let len = iovs[first].iov_len;
                if left >= len {
                    left -= len;
                    first += 1;
                } else {
                    // SAFETY: advancing within the same checked guest buffer.
                    iovs[first].iov_base =
                        unsafe { iovs[first].iov_base.cast::<u8>().add(left).cast() };
                    iovs[first].iov_len -= left;
                    left = 0;
                }
            }
        }
        Ok(())
    }

    fn run(&mut self, mem: &GuestMemoryMmap, req: &BlockRequest) -> Result<u32, RequestStatus> {
        let io = |e: std::io::Error| {
            tracing::warn!("block backend: {e}");
            RequestStatus::IoError
        };
        match req.kind {
            BlockRequestKind::Read => {
                self.vectored(mem, req, false).map_err(io)?;
                Ok(req.data_len as u32)
            }
            BlockRequestKind::Write => {
                if self.read_only {
                    return Err(RequestStatus::IoError);
                }
                self.vectored(mem, req, true).map_err(io)?;
                Ok(0)
            }
            BlockRequestKind::Flush => {
                if !self.read_only {
                    self.file.sync_data().map_err(io)?;
                }
                Ok(0)
            }
            BlockRequestKind::GetId => {
                let (addr, _) = req.segments[0];
                mem.write_slice(&self.id, addr)
                    .map_err(|e| io(std::io::Error::other(e)))?;
                Ok(self.id.len() as u32)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    fn disk(tag: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("blk-backend-{tag}-{}", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// A read-write backend on `path`.
    fn open_rw(path: &std::path::Path) -> RawFile {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        RawFile::new(file, false, "d").unwrap()
    }

    fn request(kind: BlockRequestKind, sector: u64, addr: u64, len: u32) -> BlockRequest {
        BlockRequest {
            kind,
            sector,
            segments: vec![(GuestAddress(addr), len)],
            data_len: u64::from(len),
            status_addr: GuestAddress(0),
        }
    }

    #[test]
    fn reads_and_writes_land_at_the_right_offset() {
        let path = disk("rw", &[0u8; 8192]);
        let mut be = open_rw(&path);
        assert_eq!(be.capacity_sectors(), 16);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
        mem.write_slice(&[0xab; 512], GuestAddress(0x1000)).unwrap();
        let w = request(BlockRequestKind::Write, 3, 0x1000, 512);
        assert_eq!(be.execute(&mem, &w), (RequestStatus::Ok, 0));
        let on_disk = std::fs::read(&path).unwrap();
        assert!(on_disk[3 * 512..4 * 512].iter().all(|&b| b == 0xab));
        assert!(
            on_disk[..3 * 512].iter().all(|&b| b == 0),
            "nothing before the target sector"
        );
        let r = request(BlockRequestKind::Read, 3, 0x2000, 512);
        assert_eq!(be.execute(&mem, &r), (RequestStatus::Ok, 512));
        let mut back = [0u8; 512];
        mem.read_slice(&mut back, GuestAddress(0x2000)).unwrap();
        assert_eq!(back, [0xab; 512]);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn scattered_guest_buffers_make_one_contiguous_disk_range() {
        let path = disk("vec", &[0u8; 8192]);
        let mut be = open_rw(&path);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
        let segs = [
            (0x1000u64, 512u32, 1u8),
            (0x5000, 1024, 2),
            (0x3000, 512, 3),
        ];
        for (addr, len, v) in segs {
            mem.write_slice(&vec![v; len as usize], GuestAddress(addr))
                .unwrap();
        }
        let w = BlockRequest {
            kind: BlockRequestKind::Write,
            sector: 2,
            segments: segs.iter().map(|&(a, l, _)| (GuestAddress(a), l)).collect(),
            data_len: 2048,
            status_addr: GuestAddress(0),
        };
        assert_eq!(be.execute(&mem, &w).0, RequestStatus::Ok);
        let d = std::fs::read(&path).unwrap();
        assert!(d[1024..1536].iter().all(|&b| b == 1));
        assert!(d[1536..2560].iter().all(|&b| b == 2));
        assert!(d[2560..3072].iter().all(|&b| b == 3));
        assert!(d[3072..].iter().all(|&b| b == 0));
        // And back, scattered differently.
        let r = BlockRequest {
            kind: BlockRequestKind::Read,
            segments: vec![(GuestAddress(0x8000), 1536), (GuestAddress(0x9000), 512)],
            ..w
        };
        assert_eq!(be.execute(&mem, &r), (RequestStatus::Ok, 2048));
        let mut a = vec![0u8; 1536];
        mem.read_slice(&mut a, GuestAddress(0x8000)).unwrap();
        assert_eq!(&a[..512], &[1u8; 512][..]);
        assert_eq!(&a[512..], &[2u8; 1024][..]);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn read_only_disk_answers_writes_with_ioerr_and_keeps_its_data() {
        let path = disk("ro", &[7u8; 4096]);
        let file = std::fs::File::open(&path).unwrap();
        let mut be = RawFile::new(file, true, "ro").unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
        let w = request(BlockRequestKind::Write, 0, 0x1000, 512);
        assert_eq!(be.execute(&mem, &w).0, RequestStatus::IoError);
        assert_eq!(std::fs::read(&path).unwrap(), vec![7u8; 4096]);
        let flush = request(BlockRequestKind::Flush, 0, 0, 0);
        assert_eq!(be.execute(&mem, &flush).0, RequestStatus::Ok);
        let _ = std::fs::remove_file(path);
    }
}
