use super::*;
use crate::{BlockRequestKind, RawFile, Segment};
use std::collections::HashMap;

struct Disk {
    path: std::path::PathBuf,
    file: File,
    backend: Arc<dyn BlockBackend>,
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn disk(tag: &str, bytes: usize, read_only: bool) -> Disk {
    let path = std::env::temp_dir().join(format!("engine-{tag}-{}", std::process::id()));
    std::fs::write(&path, vec![0u8; bytes]).unwrap();
    let open = || {
        std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(&path)
            .unwrap()
    };
    let backend: Arc<dyn BlockBackend> = Arc::new(RawFile::new(open(), read_only, "t").unwrap());
    Disk {
        file: open(),
        path,
        backend,
    }
}

fn engines(d: &Disk, read_only: bool) -> Vec<Box<dyn AsyncIo>> {
    vec![
        EngineChoice::Sync
            .open(&d.file, read_only, 256, &d.backend)
            .unwrap(),
        EngineChoice::IoUring
            .open(&d.file, read_only, 256, &d.backend)
            .unwrap(),
    ]
}

fn one_segment(buf: &mut [u8]) -> Vec<Segment> {
    vec![Segment {
        base: buf.as_mut_ptr(),
        len: buf.len(),
    }]
}

/// Submits every request, commits once, and collects every completion.
fn run_all(
    e: &mut dyn AsyncIo,
    reqs: &[(BlockRequestKind, u64, Vec<Segment>)],
) -> HashMap<u64, RequestStatus> {
    for (token, (kind, offset, segments)) in reqs.iter().enumerate() {
        let len = segments.iter().map(|s| s.len as u64).sum();
        let io = IoRequest {
            kind: *kind,
            offset: *offset,
            len,
            segments,
        };
        // SAFETY: the buffers outlive the completions collected below.
        unsafe { e.submit(&io, token as u64) };
    }
    e.commit();
    let mut done = HashMap::new();
    while done.len() < reqs.len() {
        match e.next_completion() {
            Some((token, status)) => {
                assert!(done.insert(token, status).is_none(), "token {token} twice");
            }
            None => e.wait(),
        }
    }
    assert_eq!(e.in_flight(), 0);
    done
}

/// A queue's worth of 4 KiB writes in flight at once, then as many reads: every block
/// lands where it was written and reads back whole, on both engines.
#[test]
fn a_queue_full_of_requests_lands_and_reads_back_on_both_engines() {
    let d = disk("full", 256 * 4096, false);
    for mut e in engines(&d, false) {
        let name = e.name();
        let mut bufs: Vec<Vec<u8>> = (0..256u32)
            .map(|i| vec![(i as u8) ^ name.len() as u8; 4096])
            .collect();
        let writes: Vec<_> = bufs
            .iter_mut()
            .enumerate()
            .map(|(i, b)| {
                let at = (i as u64) * 4096;
                (BlockRequestKind::Write, at, one_segment(b))
            })
            .collect();
        let done = run_all(e.as_mut(), &writes);
        assert!(done.values().all(|s| *s == RequestStatus::Ok), "{name}");
        let on_disk = std::fs::read(&d.path).unwrap();
        for i in 0..256usize {
            assert!(
                on_disk[i * 4096..(i + 1) * 4096]
                    .iter()
                    .all(|&b| b == bufs[i][0]),
                "{name}: block {i}"
            );
        }
        let mut back: Vec<Vec<u8>> = (0..256).map(|_| vec![0u8; 4096]).collect();
        let reads: Vec<_> = back
            .iter_mut()
            .enumerate()
            .map(|(i, b)| {
                let at = (i as u64) * 4096;
                (BlockRequestKind::Read, at, one_segment(b))
            })
            .collect();
        let flush = vec![(BlockRequestKind::Flush, 0, Vec::new())];
        assert_eq!(run_all(e.as_mut(), &flush)[&0], RequestStatus::Ok, "{name}");
        let done = run_all(e.as_mut(), &reads);
        assert!(done.values().all(|s| *s == RequestStatus::Ok), "{name}");
        assert_eq!(back, bufs, "{name}");
    }
}

/// Scattered buffers make one contiguous range; on a read-only disk writes fail and
/// flushes succeed without touching the file.
#[test]
fn scattered_buffers_and_read_only_disks_on_both_engines() {
    let d = disk("scatter", 16 * 4096, false);
    for mut e in engines(&d, false) {
        let (mut a, mut b) = (vec![1u8; 512], vec![2u8; 3584]);
        let segs = vec![
            Segment {
                base: a.as_mut_ptr(),
                len: a.len(),
            },
            Segment {
                base: b.as_mut_ptr(),
                len: b.len(),
            },
        ];
        let done = run_all(e.as_mut(), &[(BlockRequestKind::Write, 8192, segs)]);
        assert_eq!(done[&0], RequestStatus::Ok);
        let on_disk = std::fs::read(&d.path).unwrap();
        assert!(on_disk[8192..8704].iter().all(|&x| x == 1), "{}", e.name());
        assert!(on_disk[8704..12288].iter().all(|&x| x == 2), "{}", e.name());
    }
    let ro = disk("ro", 4096, true);
    std::fs::write(&ro.path, vec![7u8; 4096]).unwrap();
    for mut e in engines(&ro, true) {
        let mut buf = vec![0u8; 4096];
        let w = one_segment(&mut buf);
        let done = run_all(
            e.as_mut(),
            &[
                (BlockRequestKind::Write, 0, w),
                (BlockRequestKind::Flush, 0, Vec::new()),
            ],
        );
        assert_eq!(done[&0], RequestStatus::IoError, "{}", e.name());
        assert_eq!(done[&1], RequestStatus::Ok, "{}", e.name());
        assert_eq!(std::fs::read(&ro.path).unwrap(), vec![7u8; 4096]);
    }
}

/// The ring runs nothing but readv, writev and fsync on the registered disk: any other
/// operation, or one on a descriptor of its own, is refused by the kernel.
#[test]
fn the_ring_refuses_every_other_operation() {
    let d = disk("restrict", 4096, false);
    let mut e = UringEngine::new(&d.file, false, 8).unwrap();
    let other = std::fs::File::open(&d.path).unwrap();
    let mut buf = [0u8; 16];
    let entries = [
        io_uring::opcode::Nop::new()
            .build()
            .flags(io_uring::squeue::Flags::FIXED_FILE),
        // A plain read on a descriptor it was not given (no FIXED_FILE).
        io_uring::opcode::Read::new(
            io_uring::types::Fd(std::os::fd::AsRawFd::as_raw_fd(&other)),
            buf.as_mut_ptr(),
            16,
        )
        .build(),
    ];
    for (i, entry) in entries.into_iter().enumerate() {
        let result = e.raw_single(entry.user_data(99));
        assert_eq!(result, -libc::EACCES, "entry {i}");
    }
    assert_eq!(buf, [0u8; 16]);
}

/// Where the host refuses io_uring (here a seccomp filter on the thread, as a container's
/// profile or `kernel.io_uring_disabled` would), `auto` falls back to the synchronous
/// engine and `io_uring` is an error naming it.
#[test]
fn a_host_that_refuses_io_uring_gets_the_synchronous_engine() {
    let d = disk("refused", 4096, false);
    let (file, backend) = (d.file.try_clone().unwrap(), d.backend.clone());
    let (auto, named) = std::thread::spawn(move || {
        let filter = seccompiler::SeccompFilter::new(
            [(libc::SYS_io_uring_setup, vec![])].into_iter().collect(),
            seccompiler::SeccompAction::Allow,
            seccompiler::SeccompAction::Errno(libc::EPERM as u32),
            std::env::consts::ARCH.try_into().unwrap(),
        )
        .unwrap();
        let program: seccompiler::BpfProgram = filter.try_into().unwrap();
        seccompiler::apply_filter(&program).unwrap();
        let auto = EngineChoice::Auto
            .open(&file, false, 8, &backend)
            .map(|e| e.name());
        let named = EngineChoice::IoUring
            .open(&file, false, 8, &backend)
            .map(|e| e.name());
        (auto, named)
    })
    .join()
    .unwrap();
    assert_eq!(auto, Ok("sync"));
    let err = named.err().unwrap();
    assert!(
        err.starts_with("io_uring: ") && err.contains("not permitted"),
        "{err}"
    );
}

/// A file opened with O_DIRECT (here on /var/tmp, which takes it), through both engines:
/// buffers that are not aligned go through an aligned copy, aligned ones straight; the data
/// lands and reads back; a transfer that does not line up with the file's alignment fails
/// instead of reaching the kernel.
#[test]
fn o_direct_files_take_aligned_and_unaligned_buffers_on_both_engines() {
    use std::os::unix::fs::OpenOptionsExt;
    let path = std::path::PathBuf::from(format!("/var/tmp/engine-direct-{}", std::process::id()));
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    let open = || {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
    };
    let Ok(file) = open() else {
        eprintln!("SKIPPED: /var/tmp does not take O_DIRECT here");
        let _ = std::fs::remove_file(&path);
        return;
    };
    let raw = RawFile::new(open().unwrap(), false, "d")
        .unwrap()
        .with_direct();
    let align = raw.direct().unwrap();
    assert!(align.offset >= 512 && align.mem >= 1, "{align:?}");
    let backend: Arc<dyn BlockBackend> = Arc::new(raw);
    let mut engines = [
        EngineChoice::Sync.open(&file, false, 8, &backend).unwrap(),
        EngineChoice::IoUring
            .open(&file, false, 8, &backend)
            .unwrap(),
    ];
    for (n, e) in engines.iter_mut().enumerate() {
        let name = e.name();
        // A 4 KiB buffer at an odd address (inside a larger Vec), and an aligned one.
        let mut odd = vec![0u8; 4096 + 1];
        odd[1..].fill(0x30 + n as u8);
        let mut aligned = crate::direct::AlignedBuf::new(4096, align).unwrap();
        // SAFETY: the buffer is valid for its length.
        unsafe { std::ptr::write_bytes(aligned.as_mut_ptr(), 0x40 + n as u8, 4096) };
        let at = (n as u64) * 8192;
        let writes = vec![
            (
                BlockRequestKind::Write,
                at,
                vec![Segment {
                    base: odd[1..].as_mut_ptr(),
                    len: 4096,
                }],
            ),
            (
                BlockRequestKind::Write,
                at + 4096,
                vec![Segment {
                    base: aligned.as_mut_ptr(),
                    len: 4096,
                }],
            ),
        ];
        let done = run_all(e.as_mut(), &writes);
        assert!(
            done.values().all(|s| *s == RequestStatus::Ok),
            "{name}: {done:?}"
        );
        let mut back = vec![0u8; 8192 + 3];
        let read = vec![(
            BlockRequestKind::Read,
            at,
            vec![Segment {
                base: back[3..].as_mut_ptr(),
                len: 8192,
            }],
        )];
        assert_eq!(run_all(e.as_mut(), &read)[&0], RequestStatus::Ok, "{name}");
        assert!(back[3..4099].iter().all(|&b| b == 0x30 + n as u8), "{name}");
        assert!(back[4099..].iter().all(|&b| b == 0x40 + n as u8), "{name}");
        // Half a block at an unaligned offset cannot be done with O_DIRECT.
        if align.offset > 512 {
            let mut small = vec![0u8; 512];
            let bad = vec![(BlockRequestKind::Write, 512, one_segment(&mut small))];
            assert_eq!(
                run_all(e.as_mut(), &bad)[&0],
                RequestStatus::IoError,
                "{name}"
            );
        }
    }
    let _ = std::fs::remove_file(&path);
}
