//! The raw-file backend: the disk is a host file (or block device), read and written with
//! positioned I/O straight between the file and guest memory (no copy in between).

use super::request::{BlockRequest, SECTOR_SIZE};
use compat::{BlockRequestKind, RequestStatus};
use std::fs::File;
use std::io::{Seek, SeekFrom};
use vm_memory::{Bytes, GuestMemoryMmap};

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

    fn run(&mut self, mem: &GuestMemoryMmap, req: &BlockRequest) -> Result<u32, RequestStatus> {
        let io = |e: std::io::Error| {
            tracing::warn!("block backend: {e}");
            RequestStatus::IoError
        };
        match req.kind {
            BlockRequestKind::Read => {
                self.file
                    .seek(SeekFrom::Start(req.sector * SECTOR_SIZE))
                    .map_err(io)?;
                for &(addr, len) in &req.segments {
                    mem.read_exact_volatile_from(addr, &mut self.file, len as usize)
                        .map_err(|e| io(std::io::Error::other(e)))?;
                }
                Ok(req.data_len as u32)
            }
            BlockRequestKind::Write => {
                if self.read_only {
                    return Err(RequestStatus::IoError);
                }
                self.file
                    .seek(SeekFrom::Start(req.sector * SECTOR_SIZE))
                    .map_err(io)?;
                for &(addr, len) in &req.segments {
                    mem.write_all_volatile_to(addr, &mut self.file, len as usize)
                        .map_err(|e| io(std::io::Error::other(e)))?;
                }
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
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut be = RawFile::new(file, false, "d").unwrap();
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
