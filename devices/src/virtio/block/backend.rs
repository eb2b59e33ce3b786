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
