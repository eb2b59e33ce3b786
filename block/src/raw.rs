//! The raw-file backend: the disk is a host file (or block device), read and written with
//! positioned I/O straight between the file and the request's buffers (guest memory when no
//! interceptor transforms data, so nothing is copied in between).

use crate::direct::{AlignedBuf, DirectAlign};
use crate::{BlockBackend, BlockRequestKind, IoRequest, RequestStatus, Segment};
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;

/// Bytes of a virtio-blk serial (GET_ID).
const ID_BYTES: u32 = 20;

// A segment is handed to preadv/pwritev as an iovec: the ABI defines it with that layout.
const _: () = assert!(std::mem::size_of::<Segment>() == std::mem::size_of::<libc::iovec>());

pub struct RawFile {
    file: File,
    read_only: bool,
    capacity: u64,
    id: [u8; ID_BYTES as usize],
    /// Set when the file was opened with O_DIRECT.
    direct: Option<DirectAlign>,
}

impl RawFile {
    pub fn new(file: File, read_only: bool, id: &str) -> std::io::Result<RawFile> {
        let mut f = file;
        let bytes = f.seek(SeekFrom::End(0))?;
        let mut serial = [0u8; ID_BYTES as usize];
        let n = id.len().min(serial.len());
        serial[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(RawFile {
            file: f,
            read_only,
            // Whole sectors only; a trailing partial sector is not exposed.
            capacity: bytes / 512 * 512,
            id: serial,
            direct: None,
        })
    }

    /// The file was opened with O_DIRECT: transfers that do not line up go through an
    /// aligned copy, and the capacity is cut to whole aligned blocks.
    pub fn with_direct(mut self) -> RawFile {
        let align = DirectAlign::of(&self.file);
        self.capacity = self.capacity / align.offset as u64 * align.offset as u64;
        self.direct = Some(align);
        self
    }

    /// The O_DIRECT alignment, when the file was opened with it.
    pub fn direct(&self) -> Option<DirectAlign> {
        self.direct
    }

    /// A transfer that O_DIRECT cannot take as it is: through an aligned copy.
    unsafe fn bounced(
        &self,
        align: DirectAlign,
        offset: u64,
        segments: &[Segment],
        write: bool,
    ) -> std::io::Result<()> {
        let len: usize = segments.iter().map(|s| s.len).sum();
        if !align.range_fits(offset, len as u64) {
            // The guest was told the block size: only a caller that ignores it gets here.
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut buf = AlignedBuf::new(len, align)?;
        let one = [Segment {
            base: buf.as_mut_ptr(),
            len,
        }];
        if write {
            buf.gather(segments);
            self.vectored_raw(offset, &one, true)
        } else {
            self.vectored_raw(offset, &one, false)?;
            buf.scatter(segments);
            Ok(())
        }
    }

    /// The disk's file (an engine registers its descriptor).
    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// One preadv/pwritev for the whole request (re-issued for the rest after a short
    /// transfer).
    ///
    /// # Safety
    /// The segments must be valid for their lengths (see `BlockBackend::execute`).
    unsafe fn vectored(
        &self,
        offset: u64,
        segments: &[Segment],
        write: bool,
    ) -> std::io::Result<()> {
        match self.direct {
            Some(align) if !align.fits(offset, segments) => {
                self.bounced(align, offset, segments, write)
            }
            _ => self.vectored_raw(offset, segments, write),
        }
    }

    unsafe fn vectored_raw(
        &self,
        offset: u64,
        segments: &[Segment],
        write: bool,
    ) -> std::io::Result<()> {
        let mut iovs: Vec<libc::iovec> = segments
            .iter()
            .map(|s| libc::iovec {
                iov_base: s.base.cast(),
                iov_len: s.len,
            })
            .collect();
        let mut offset = offset as libc::off_t;
        let mut first = 0;
        while first < iovs.len() {
            let batch = &iovs[first..];
            let count = batch.len().min(1024) as libc::c_int;
            let fd = self.file.as_raw_fd();
            // SAFETY: the caller guarantees every iovec is valid memory for its length.
            let n = if write {
                libc::pwritev(fd, batch.as_ptr(), count, offset)
            } else {
                libc::preadv(fd, batch.as_ptr(), count, offset)
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
                    // SAFETY: advancing within the same valid buffer.
                    iovs[first].iov_base = iovs[first].iov_base.cast::<u8>().add(left).cast();
                    iovs[first].iov_len -= left;
                    left = 0;
                }
            }
        }
        Ok(())
    }
}

/// Deallocates `[offset, offset + len)` of `file` (a hole: it reads back as zeros, and a
/// sparse image shrinks). Where the filesystem cannot punch holes, a discard is a no-op
/// (the guest only said it no longer needs the data) and a write-zeroes writes zeros.
pub(crate) fn deallocate(file: &File, offset: u64, len: u64, zeroes: bool) -> std::io::Result<()> {
    let (Ok(at), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    };
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    loop {
        // SAFETY: plain syscall on a descriptor we own.
        if unsafe { libc::fallocate(file.as_raw_fd(), mode, at, n) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EOPNOTSUPP) if !zeroes => return Ok(()),
            Some(libc::EOPNOTSUPP) => return write_zeros(file, offset, len),
            _ => return Err(e),
        }
    }
}

fn write_zeros(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    // Aligned for O_DIRECT too (the range itself is, in whole blocks of the disk).
    let align = DirectAlign {
        mem: 4096,
        offset: 4096,
    };
    let mut zeros = AlignedBuf::new(1 << 20, align)?;
    // SAFETY: the buffer is valid (and zeroed) for its length.
    let zeros = unsafe { std::slice::from_raw_parts(zeros.as_mut_ptr(), zeros.len()) };
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

impl BlockBackend for RawFile {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    unsafe fn execute(&self, req: &IoRequest<'_>) -> RequestStatus {
        let io = |e: std::io::Error| {
            tracing::warn!("block backend: {e}");
            RequestStatus::IoError
        };
        // The clock is read only while the slow-request debug log is on.
        let t0 = tracing::enabled!(tracing::Level::DEBUG).then(std::time::Instant::now);
        let done = match req.kind {
            BlockRequestKind::Read => self.vectored(req.offset, req.segments, false),
            BlockRequestKind::Write if self.read_only => return RequestStatus::IoError,
            BlockRequestKind::Write => self.vectored(req.offset, req.segments, true),
            BlockRequestKind::Flush if self.read_only => Ok(()),
            BlockRequestKind::Flush => self.file.sync_data(),
            BlockRequestKind::Discard | BlockRequestKind::WriteZeroes if self.read_only => {
                return RequestStatus::IoError
            }
            BlockRequestKind::Discard => deallocate(&self.file, req.offset, req.len, false),
            BlockRequestKind::WriteZeroes => deallocate(&self.file, req.offset, req.len, true),
            BlockRequestKind::GetId => {
                let mut at = 0;
                for s in req.segments {
                    let n = s.len.min(self.id.len() - at);
                    std::ptr::copy_nonoverlapping(self.id[at..].as_ptr(), s.base, n);
                    at += n;
                }
                Ok(())
            }
        };
        // A diagnostic (RUST_LOG=devices=debug): where the host's own I/O path stalls.
        if let Some(ms) = t0.map(|t| t.elapsed().as_secs_f64() * 1e3) {
            if ms > 20.0 {
                tracing::debug!(
                    "slow {:?}: offset {} len {} took {ms:.1} ms",
                    req.kind,
                    req.offset,
                    req.len
                );
            }
        }
        done.map_or_else(io, |()| RequestStatus::Ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn run(
        be: &RawFile,
        kind: BlockRequestKind,
        offset: u64,
        bufs: &mut [&mut [u8]],
    ) -> RequestStatus {
        let segments: Vec<Segment> = bufs
            .iter_mut()
            .map(|b| Segment {
                base: b.as_mut_ptr(),
                len: b.len(),
            })
            .collect();
        let len = segments.iter().map(|s| s.len as u64).sum();
        // SAFETY: the buffers outlive the call.
        unsafe {
            be.execute(&IoRequest {
                kind,
                offset,
                len,
                segments: &segments,
            })
        }
    }

    #[test]
    fn reads_and_writes_land_at_the_right_offset() {
        let path = disk("rw", &[0u8; 8192]);
        let be = open_rw(&path);
        assert_eq!(be.capacity(), 8192);
        let mut data = [0xabu8; 512];
        assert_eq!(
            run(&be, BlockRequestKind::Write, 1536, &mut [&mut data]),
            RequestStatus::Ok
        );
        let on_disk = std::fs::read(&path).unwrap();
        assert!(on_disk[3 * 512..4 * 512].iter().all(|&b| b == 0xab));
        assert!(
            on_disk[..3 * 512].iter().all(|&b| b == 0),
            "nothing before the target sector"
        );
        let mut back = [0u8; 512];
        assert_eq!(
            run(&be, BlockRequestKind::Read, 1536, &mut [&mut back]),
            RequestStatus::Ok
        );
        assert_eq!(back, [0xab; 512]);
        let mut id = [0u8; 20];
        assert_eq!(
            run(&be, BlockRequestKind::GetId, 0, &mut [&mut id]),
            RequestStatus::Ok
        );
        assert_eq!(&id[..2], b"d\0");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn scattered_buffers_make_one_contiguous_disk_range() {
        let path = disk("vec", &[0u8; 8192]);
        let be = open_rw(&path);
        let (mut a, mut b, mut c) = ([1u8; 512], [2u8; 1024], [3u8; 512]);
        let status = run(
            &be,
            BlockRequestKind::Write,
            1024,
            &mut [&mut a, &mut b, &mut c],
        );
        assert_eq!(status, RequestStatus::Ok);
        let d = std::fs::read(&path).unwrap();
        assert!(d[1024..1536].iter().all(|&b| b == 1));
        assert!(d[1536..2560].iter().all(|&b| b == 2));
        assert!(d[2560..3072].iter().all(|&b| b == 3));
        assert!(d[3072..].iter().all(|&b| b == 0));
        // And back, scattered differently.
        let (mut x, mut y) = ([0u8; 1536], [0u8; 512]);
        let status = run(&be, BlockRequestKind::Read, 1024, &mut [&mut x, &mut y]);
        assert_eq!(status, RequestStatus::Ok);
        assert_eq!(&x[..512], &[1u8; 512][..]);
        assert_eq!(&x[512..], &[2u8; 1024][..]);
        assert_eq!(y, [3u8; 512]);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn read_only_disk_answers_writes_with_ioerr_and_keeps_its_data() {
        let path = disk("ro", &[7u8; 4096]);
        let file = std::fs::File::open(&path).unwrap();
        let be = RawFile::new(file, true, "ro").unwrap();
        let mut data = [0u8; 512];
        assert_eq!(
            run(&be, BlockRequestKind::Write, 0, &mut [&mut data]),
            RequestStatus::IoError
        );
        assert_eq!(std::fs::read(&path).unwrap(), vec![7u8; 4096]);
        assert_eq!(
            run(&be, BlockRequestKind::Flush, 0, &mut []),
            RequestStatus::Ok
        );
        let _ = std::fs::remove_file(path);
    }

    /// A discard punches a hole (the sparse file gives its blocks back) and reads back as
    /// zeros; so does a write-zeroes; the data around them stays.
    #[test]
    fn discard_and_write_zeroes_deallocate_their_range() {
        use std::os::unix::fs::MetadataExt;
        let path = disk("discard", &vec![0x5au8; 1 << 20]);
        let be = open_rw(&path);
        let before = std::fs::metadata(&path).unwrap().blocks();
        let range = |kind, offset, len| {
            // SAFETY: a range request carries no buffers.
            unsafe {
                be.execute(&IoRequest {
                    kind,
                    offset,
                    len,
                    segments: &[],
                })
            }
        };
        assert_eq!(
            range(BlockRequestKind::Discard, 0, 512 << 10),
            RequestStatus::Ok
        );
        assert_eq!(
            range(BlockRequestKind::WriteZeroes, 768 << 10, 4096),
            RequestStatus::Ok
        );
        let after = std::fs::metadata(&path).unwrap().blocks();
        assert!(after < before, "{after} blocks after, {before} before");
        let d = std::fs::read(&path).unwrap();
        assert!(d[..512 << 10].iter().all(|&b| b == 0));
        assert!(d[512 << 10..768 << 10].iter().all(|&b| b == 0x5a));
        assert!(d[768 << 10..(768 << 10) + 4096].iter().all(|&b| b == 0));
        assert!(d[(768 << 10) + 4096..].iter().all(|&b| b == 0x5a));
        let _ = std::fs::remove_file(path);
    }
}
