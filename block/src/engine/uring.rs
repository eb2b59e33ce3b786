//! The io_uring engine. Its ring is created disabled, given the disk file as its only
//! registered file and an allowlist (readv, writev and fsync, each on the registered file
//! only; no further registration), and only then enabled, as Firecracker restricts its
//! async engine's ring: a hook or a guest that subverts the queue cannot turn the ring into
//! a way around the seccomp filter. Completions signal an eventfd the queue's thread waits
//! on. A short transfer (a regular file may return one near its end, or after a signal) is
//! resubmitted for the rest.

use super::AsyncIo;
use crate::direct::{AlignedBuf, DirectAlign};
use crate::{BlockRequestKind, IoRequest, RequestStatus, Segment};
use io_uring::{opcode, register::Restriction, squeue, types, IoUring};
use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The registered file's index.
const DISK: types::Fixed = types::Fixed(0);
/// io_uring_register's opcode that drops the registered files.
const IORING_UNREGISTER_FILES: u8 = 3;
/// Segments one readv/writev takes (the kernel's IOV_MAX).
const MAX_IOVECS: usize = 1024;

/// One request in flight: what a short transfer needs to go on.
struct Slot {
    token: u64,
    write: bool,
    offset: u64,
    /// The rest still to transfer, as iovecs (advanced after a short transfer). The ring
    /// reads them at submission; they stay here until completion all the same.
    iovecs: Vec<libc::iovec>,
    /// O_DIRECT: the aligned copy the kernel transfers instead of the request's buffers,
    /// and (a read) the buffers to copy it to when it completes.
    bounce: Option<(AlignedBuf, Vec<Segment>)>,
}

// SAFETY: the iovecs point at memory the queue keeps valid until completion (the
// `submit` contract); the slot only carries them to the thread that owns the engine.
unsafe impl Send for Slot {}

pub struct UringEngine {
    ring: IoUring,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// Requests completed without the kernel (refused at submission).
    ready: VecDeque<(u64, RequestStatus)>,
    in_flight: usize,
    read_only: bool,
    notifier: EventFd,
    /// The disk file, for discard and write-zeroes (a fallocate, run at submission).
    file: File,
    /// The file was opened with O_DIRECT.
    direct: Option<DirectAlign>,
}

/// Was `file` opened with O_DIRECT?
fn opened_direct(file: &File) -> bool {
    // SAFETY: plain fcntl on a descriptor we hold.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    flags >= 0 && flags & libc::O_DIRECT != 0
}

impl UringEngine {
    /// A ring for `depth` requests in flight over `file`.
    pub fn new(file: &File, read_only: bool, depth: u16) -> std::io::Result<UringEngine> {
        let entries = u32::from(depth.max(1)).next_power_of_two();
        let ring = IoUring::builder()
            .setup_r_disabled()
            .setup_cqsize(entries.saturating_mul(2))
            .build(entries)?;
        let notifier = EventFd::new(EFD_NONBLOCK)?;
        let submitter = ring.submitter();
        submitter.register_files(&[file.as_raw_fd()])?;
        submitter.register_eventfd(notifier.as_raw_fd())?;
        let fixed = squeue::Flags::FIXED_FILE.bits();
        submitter.register_restrictions(&mut [
            Restriction::sqe_op(opcode::Readv::CODE),
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_op(opcode::Fsync::CODE),
            // Every entry names the registered file, never a descriptor of its own.
            Restriction::sqe_flags_required(fixed),
            Restriction::sqe_flags_allowed(fixed),
            // Letting go of the disk file when the engine goes (see `Drop`).
            Restriction::register_op(IORING_UNREGISTER_FILES),
        ])?;
        submitter.register_enable_rings()?;
        let depth = usize::from(depth.max(1));
        Ok(UringEngine {
            ring,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth).rev().collect(),
            ready: VecDeque::new(),
            in_flight: 0,
            read_only,
            notifier,
            file: file.try_clone()?,
            direct: opened_direct(file).then(|| DirectAlign::of(file)),
        })
    }

    /// Completes `token` without the kernel.
    fn done_now(&mut self, token: u64, status: RequestStatus) {
        self.ready.push_back((token, status));
        self.in_flight += 1;
        let _ = self.notifier.write(1);
    }

    fn slot_index(&mut self) -> usize {
        match self.free.pop() {
            Some(i) => i,
            None => {
                // More in flight than the depth the queue promised: grow rather than fail.
                self.slots.push(None);
                self.slots.len() - 1
            }
        }
    }

    /// Pushes slot `i`'s (remaining) transfer, or its fsync.
    fn push(&mut self, i: usize, fsync: bool) {
        let Some(slot) = self.slots[i].as_ref() else {
            return;
        };
        let entry = if fsync {
            opcode::Fsync::new(DISK)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
        } else if slot.write {
            opcode::Writev::new(DISK, slot.iovecs.as_ptr(), slot.iovecs.len() as u32)
                .offset(slot.offset)
                .build()
        } else {
            opcode::Readv::new(DISK, slot.iovecs.as_ptr(), slot.iovecs.len() as u32)
                .offset(slot.offset)
                .build()
        }
        .flags(squeue::Flags::FIXED_FILE)
        .user_data(i as u64);
        loop {
            // SAFETY: the entry's iovecs live in the slot, and the buffers they name stay
            // valid until completion (the `submit` contract).
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            // The submission ring is full: hand it to the kernel and try again.
            if let Err(e) = self.ring.submit() {
                tracing::warn!("io_uring submit: {e}");
            }
        }
    }

    /// Takes one completion from the ring: `Some` when its request is finished.
    fn reap(&mut self, user_data: u64, result: i32) -> Option<(u64, RequestStatus)> {
        let i = usize::try_from(user_data).ok()?;
        let slot = self.slots.get_mut(i)?.as_mut()?;
        let status = if result < 0 {
            let e = std::io::Error::from_raw_os_error(-result);
            if e.kind() == std::io::ErrorKind::Interrupted {
                let fsync = slot.iovecs.is_empty();
                self.push(i, fsync);
                return None;
            }
            tracing::warn!("block backend (io_uring): {e}");
            RequestStatus::IoError
        } else {
            let mut left = result as usize;
            let offset = slot.offset;
            slot.offset = offset.saturating_add(left as u64);
            let mut first = 0;
            while left > 0 && first < slot.iovecs.len() {
                let len = slot.iovecs[first].iov_len;
                if left >= len {
                    left -= len;
                    first += 1;
                } else {
                    // SAFETY: advancing within the same valid buffer.
                    slot.iovecs[first].iov_base =
                        unsafe { slot.iovecs[first].iov_base.cast::<u8>().add(left).cast() };
                    slot.iovecs[first].iov_len -= left;
                    left = 0;
                }
            }
            slot.iovecs.drain(..first);
            if slot.iovecs.is_empty() {
                RequestStatus::Ok
            } else if result == 0 {
                // Nothing moved: the end of the file (the disk shrank under us).
                tracing::warn!("block backend (io_uring): short transfer at {offset}");
                RequestStatus::IoError
            } else {
                self.push(i, false);
                return None;
            }
        };
        let slot = self.slots[i].take()?;
        if let (Some((buf, back)), RequestStatus::Ok) = (&slot.bounce, status) {
            // SAFETY: the request's buffers are still valid (they are until its completion
            // is returned) and add up to the copy's transfer.
            unsafe { buf.scatter(back) };
        }
        self.free.push(i);
        Some((slot.token, status))
    }
}

#[cfg(test)]
impl UringEngine {
    /// Test only: pushes `entry` as it is and returns its result.
    pub(super) fn raw_single(&mut self, entry: squeue::Entry) -> i32 {
        // SAFETY: the caller's entry names memory that outlives the call.
        unsafe { self.ring.submission().push(&entry) }.expect("room in the ring");
        self.ring.submit_and_wait(1).expect("io_uring_enter");
        self.ring.completion().next().map_or(0, |c| c.result())
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // The kernel frees a closed ring (and its reference to the disk file, which holds
        // the image's lock) later, on a work queue; dropping the file here lets a disk be
        // reopened at once (a config refused at start, a test).
        let _ = self.ring.submitter().unregister_files();
    }
}

impl AsyncIo for UringEngine {
    fn notifier(&self) -> &EventFd {
        &self.notifier
    }

    unsafe fn submit(&mut self, req: &IoRequest<'_>, token: u64) {
        let write = match req.kind {
            BlockRequestKind::Read => false,
            BlockRequestKind::Write if self.read_only => {
                return self.done_now(token, RequestStatus::IoError)
            }
            BlockRequestKind::Write => true,
            BlockRequestKind::Flush if self.read_only => {
                return self.done_now(token, RequestStatus::Ok)
            }
            BlockRequestKind::Flush => false,
            BlockRequestKind::GetId => return self.done_now(token, RequestStatus::Unsupported),
            BlockRequestKind::Discard | BlockRequestKind::WriteZeroes if self.read_only => {
                return self.done_now(token, RequestStatus::IoError)
            }
            kind @ (BlockRequestKind::Discard | BlockRequestKind::WriteZeroes) => {
                let zeroes = kind == BlockRequestKind::WriteZeroes;
                let status = match crate::raw::deallocate(&self.file, req.offset, req.len, zeroes) {
                    Ok(()) => RequestStatus::Ok,
                    Err(e) => {
                        tracing::warn!("block backend (io_uring): {kind:?}: {e}");
                        RequestStatus::IoError
                    }
                };
                return self.done_now(token, status);
            }
        };
        let fsync = req.kind == BlockRequestKind::Flush;
        if req.segments.len() > MAX_IOVECS {
            tracing::warn!("block backend (io_uring): {} segments", req.segments.len());
            return self.done_now(token, RequestStatus::IoError);
        }
        let iovecs: Vec<libc::iovec> = if fsync {
            Vec::new()
        } else {
            req.segments
                .iter()
                .filter(|s| s.len > 0)
                .map(|s| libc::iovec {
                    iov_base: s.base.cast(),
                    iov_len: s.len,
                })
                .collect()
        };
        if !fsync && iovecs.is_empty() {
            return self.done_now(token, RequestStatus::Ok);
        }
        let (mut iovecs, mut bounce) = (iovecs, None);
        if let Some(align) = self
            .direct
            .filter(|a| !fsync && !a.fits(req.offset, req.segments))
        {
            if !align.range_fits(req.offset, req.len) {
                tracing::warn!(
                    "block backend (io_uring): {:?} at {}+{} is not aligned for O_DIRECT",
                    req.kind,
                    req.offset,
                    req.len
                );
                return self.done_now(token, RequestStatus::IoError);
            }
            let Ok(mut buf) = AlignedBuf::new(req.len as usize, align) else {
                return self.done_now(token, RequestStatus::IoError);
            };
            if write {
                // SAFETY: the segments are valid for reading (the `submit` contract) and add
                // up to the request's length.
                unsafe { buf.gather(req.segments) };
            }
            iovecs = vec![libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: req.len as usize,
            }];
            let back = if write {
                Vec::new()
            } else {
                req.segments.to_vec()
            };
            bounce = Some((buf, back));
        }
        let i = self.slot_index();
        self.slots[i] = Some(Slot {
            token,
            write,
            offset: req.offset,
            iovecs,
            bounce,
        });
        self.in_flight += 1;
        self.push(i, fsync);
    }

    fn commit(&mut self) {
        if let Err(e) = self.ring.submit() {
            tracing::warn!("io_uring submit: {e}");
        }
    }

    fn next_completion(&mut self) -> Option<(u64, RequestStatus)> {
        if let Some(done) = self.ready.pop_front() {
            self.in_flight -= 1;
            return Some(done);
        }
        loop {
            let cqe = self.ring.completion().next()?;
            if let Some(done) = self.reap(cqe.user_data(), cqe.result()) {
                self.in_flight -= 1;
                return Some(done);
            }
            // A resubmitted rest: hand it to the kernel now.
            self.commit();
        }
    }

    fn wait(&mut self) {
        if self.in_flight == 0 || !self.ready.is_empty() {
            return;
        }
        if let Err(e) = self.ring.submit_and_wait(1) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                tracing::warn!("io_uring wait: {e}");
            }
        }
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn name(&self) -> &'static str {
        "io_uring"
    }
}
