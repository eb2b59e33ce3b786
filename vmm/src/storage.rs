//! Opening the disks: each `[[block]]` becomes a backend under its chain of
//! interceptor instances. Plugins are loaded here, before the VM exists, so every refusal
//! is a config error (exit 2) naming the file and the entry.

use crate::config::{ConfigError, InterceptorConfig, VmConfig};
use compat::{InstanceSpec, LiveStack, PluginRegistry, ThreadStart};
use devices::virtio::block::{RawFile, QUEUE_SIZE};
use std::collections::HashMap;
use std::fs::{File, TryLockError};
use std::path::Path;
use std::sync::Arc;

/// A disk ready for its device model.
pub struct Disk {
    pub id: String,
    pub read_only: bool,
    pub stack: Arc<LiveStack>,
    /// The block size the guest is told: 512, or O_DIRECT's alignment with `direct`.
    pub block_size: u32,
    /// One I/O engine per queue, until the device model takes them.
    pub engines: std::sync::Mutex<Vec<Box<dyn block::AsyncIo>>>,
    /// Interrupt coalescing (`coalesce_us`).
    pub coalesce: std::time::Duration,
    /// What the device's queues are doing, shared with the API.
    pub queue_stats: Arc<devices::virtio::block::QueueStats>,
}

pub fn instance_spec(
    registry: &PluginRegistry,
    ic: &InterceptorConfig,
) -> Result<InstanceSpec, String> {
    let plugin = registry
        .load(&ic.path, ic.blake3.as_deref())
        .map_err(|e| e.to_string())?;
    Ok(InstanceSpec {
        id: ic.id.clone(),
        plugin,
        config_json: ic.config_json(),
        enabled: ic.enabled,
    })
}

/// Opens a disk image and locks it for the life of the returned file (the lock goes with
/// the open file, which the backend keeps): exclusively when writable, shared when
/// read-only, so any number of readers or one writer. A second opener (another process,
/// or another `[[block]]` naming the same file by any path, since each open is its own
/// lock holder) is refused with a message naming the file. The locks are advisory: `flock`
/// excludes other `vmm`s and `vmm-img`, QEMU's OFD lock bytes ([`crate::qemu_lock`]) QEMU,
/// qemu-img, qemu-io and qemu-nbd; a program that takes neither is not stopped.
pub fn open_image(path: &Path, read_only: bool) -> Result<File, String> {
    open_image_with(path, read_only, false)
}

/// Why an image did not open, in one line naming it.
fn open_error(path: &Path, e: &std::io::Error, direct: bool) -> String {
    match e.raw_os_error() {
        // open(2): EINVAL with O_DIRECT is the file system refusing it.
        Some(libc::EINVAL) if direct => format!(
            "{}: its file system does not support O_DIRECT (direct = true; tmpfs before \
             Linux 6.6, for one, does not)",
            path.display()
        ),
        _ => format!("{}: {e}", path.display()),
    }
}

/// As [`open_image`]; `direct` opens it with O_DIRECT (past the host's page cache), refused
/// with a line saying so where the file system cannot (tmpfs, for one).
pub fn open_image_with(path: &Path, read_only: bool, direct: bool) -> Result<File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(if direct { libc::O_DIRECT } else { 0 })
        .open(path)
        .map_err(|e| open_error(path, &e, direct))?;
    let locked = if read_only {
        file.try_lock_shared()
    } else {
        file.try_lock()
    };
    match locked {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            return Err(format!(
            "{} is in use by another process or by another [[block]] of this config (it is locked)",
            path.display()
        ))
        }
        Err(TryLockError::Error(e)) => {
            return Err(format!("{}: cannot lock it: {e}", path.display()))
        }
    }
    crate::qemu_lock::take(&file, read_only)
        .map_err(|why| format!("{} is in use by another process: {why}", path.display()))?;
    Ok(file)
}

/// Opens every disk of a validated config and builds its stack on the disk's I/O thread
/// (which runs `on_start` first).
pub fn open_disks(
    cfg: &VmConfig,
    file: &str,
    registry: &PluginRegistry,
    on_start: Option<ThreadStart>,
) -> Result<Vec<Disk>, ConfigError> {
    let invalid = |field: String, message: String| ConfigError::Invalid {
        file: file.to_string(),
        field,
        message,
    };
    let mut specs = HashMap::new();
    for (i, ic) in cfg.interceptor.iter().enumerate() {
        let spec = instance_spec(registry, ic)
            .map_err(|m| invalid(format!("interceptor[{i}] ({})", ic.id), m))?;
        specs.insert(ic.id.as_str(), (i, spec));
    }
    let mut disks = Vec::new();
    for (i, b) in cfg.block.iter().enumerate() {
        let opened = open_image_with(&b.path, b.read_only, b.direct)
            .and_then(|f| {
                RawFile::new(f, b.read_only, &b.id)
                    .map(|r| if b.direct { r.with_direct() } else { r })
                    .map_err(|e| format!("{}: {e}", b.path.display()))
            })
            .map_err(|m| invalid(format!("block[{i}].path"), m))?;
        // Opened here, before any thread's seccomp filter: setting a ring up takes calls
        // the disk's thread may not make.
        let block_size = opened
            .direct()
            .map_or(512, |a| u32::try_from(a.offset).unwrap_or(4096));
        let opened = Arc::new(opened);
        let backend: Arc<dyn compat::BlockBackend> = opened.clone();
        let mut queue_engines = Vec::new();
        for _ in 0..b.queues(cfg.machine.vcpus) {
            let engine = b
                .engine
                .choice()
                .open(opened.file(), b.read_only, QUEUE_SIZE, &backend)
                .map_err(|m| invalid(format!("block[{i}].engine"), m))?;
            queue_engines.push(engine);
        }
        let mut chain = Vec::new();
        for id in &b.interceptors {
            // validate() guarantees every id names an [[interceptor]].
            if let Some((_, spec)) = specs.get(id.as_str()) {
                chain.push(spec.clone());
            }
        }
        // The chain is built on the disk's I/O thread, which calls every hook from then on.
        // Off unless asked for (docs/architecture.md, "Queues, engines and threads").
        let hook_threads = b.hook_threads.unwrap_or(0);
        let started =
            LiveStack::start_with_pool(&b.id, backend, &chain, on_start.clone(), hook_threads);
        let stack = started.map_err(|e| {
            let at = e
                .instance
                .as_deref()
                .and_then(|id| specs.get(id))
                .map_or(format!("block[{i}].interceptors"), |(n, s)| {
                    format!("interceptor[{n}] ({})", s.id)
                });
            invalid(at, e.to_string())
        })?;
        disks.push(Disk {
            id: b.id.clone(),
            read_only: b.read_only,
            stack: Arc::new(stack),
            engines: std::sync::Mutex::new(queue_engines),
            block_size,
            coalesce: std::time::Duration::from_micros(u64::from(b.coalesce_us)),
            queue_stats: Arc::default(),
        });
    }
    Ok(disks)
}

/// The line saying which I/O engine the disks use, printed once when the VM starts.
pub fn engine_line(disks: &[Disk]) -> Option<String> {
    let names: Vec<&'static str> = disks
        .iter()
        .filter_map(|d| {
            let engines = d.engines.lock().unwrap_or_else(|p| p.into_inner());
            engines.first().map(|e| e.name())
        })
        .collect();
    let first = names.first()?;
    Some(if names.iter().all(|n| n == first) {
        format!("vmm: block I/O engine: {first}")
    } else {
        format!("vmm: block I/O engines: {}", names.join(", "))
    })
}

/// One line per instance: its counters and the plugin's own stats.
pub fn report(disks: &[Disk]) -> Vec<String> {
    let mut lines = Vec::new();
    for d in disks {
        for layer in d.stack.snapshot().layers() {
            lines.push(instance_line(layer, &d.id));
        }
    }
    lines
}

/// The exit report's line for one instance on `device`: the shim's counters and the
/// plugin's own stats (disks and network cards alike).
pub fn instance_line(layer: &compat::Instance, device: &str) -> String {
    let c = layer.counters();
    let ld = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    let stats = layer
        .plugin_stats()
        .unwrap_or_else(|e| serde_json::json!({ "error": e }));
    format!(
        "interceptor {} on {device}: requests={} bytes={} errors={} completed={} stats={stats}",
        layer.id(),
        ld(&c.requests),
        ld(&c.bytes),
        ld(&c.errors),
        ld(&c.completed),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system temp dir, removed on drop.
    struct Dir(std::path::PathBuf);

    impl Dir {
        fn new(tag: &str) -> Dir {
            let p = std::env::temp_dir().join(format!("vmm-storage-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn locked_out(e: &str) -> bool {
        e.contains("is in use by another process or by another [[block]] of this config")
    }

    #[test]
    fn one_writer_or_many_readers() {
        let d = Dir::new("lock");
        let img = d.0.join("disk.img");
        std::fs::write(&img, [0u8; 4096]).unwrap();
        let writer = open_image(&img, false).unwrap();
        let e = open_image(&img, false).unwrap_err();
        assert!(
            locked_out(&e) && e.starts_with(&*img.to_string_lossy()),
            "{e}"
        );
        assert!(locked_out(&open_image(&img, true).unwrap_err()));
        drop(writer);
        let r1 = open_image(&img, true).unwrap();
        let _r2 = open_image(&img, true).unwrap();
        assert!(locked_out(&open_image(&img, false).unwrap_err()));
        drop((r1, _r2));
        // Released with the file: it opens again.
        open_image(&img, false).unwrap();
    }

    /// Issue 29, item 8: QEMU's tools and vmm refuse each other's open images. `flock`
    /// alone did not conflict with QEMU's OFD lock bytes, so both could write one image.
    #[test]
    fn qemu_and_vmm_refuse_each_others_open_images() {
        let qemu_io = |args: &[&str], img: &Path| {
            std::process::Command::new("qemu-io")
                .args(["-f", "raw"])
                .args(args)
                .arg(img)
                .output()
        };
        let d = Dir::new("qemu-lock");
        let img = d.0.join("disk.img");
        std::fs::write(&img, [0u8; 65536]).unwrap();
        let Ok(probe) = qemu_io(&["-c", "read 0 512"], &img) else {
            if std::env::var_os("CI").is_some() {
                panic!("needs qemu-io (Debian's qemu-utils; scripts/setup.sh installs it)");
            }
            eprintln!("SKIPPED: needs qemu-io (Debian's qemu-utils)");
            return;
        };
        assert!(probe.status.success(), "{probe:?}");
        // vmm writes: qemu-io may not.
        let writer = open_image(&img, false).unwrap();
        let out = qemu_io(&["-c", "write 0 512"], &img).unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("Failed to get \"write\" lock"),
            "qemu-io wrote an image vmm has open: {out:?}"
        );
        drop(writer);
        // vmm reads (a read-only disk, vmm-img): no writer either.
        let reader = open_image(&img, true).unwrap();
        assert!(!qemu_io(&["-c", "write 0 512"], &img)
            .unwrap()
            .status
            .success());
        drop(reader);
        // qemu-io writes: vmm neither writes nor reads it.
        let mut child = std::process::Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write 0 512", "-c", "sleep 20000"])
            .arg(&img)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let e = loop {
            match open_image(&img, false) {
                Err(e) => break e,
                Ok(f) if std::time::Instant::now() < deadline => {
                    drop(f);
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Ok(_) => panic!("vmm opened an image qemu-io is writing"),
            }
        };
        assert!(e.contains("with the \"write\" permission"), "{e}");
        assert!(e.starts_with(&*img.to_string_lossy()), "{e}");
        let e = open_image(&img, true).unwrap_err();
        assert!(e.contains("\"write\""), "{e}");
        let _ = child.kill();
        let _ = child.wait();
        open_image(&img, false).unwrap();
    }

    #[test]
    fn the_same_image_named_twice_is_refused_by_any_spelling() {
        for (case, other) in ["disk.img", "./disk.img", "link.img", "hard.img"]
            .into_iter()
            .enumerate()
        {
            // A directory per case: a process another test forks meanwhile holds copies of
            // this one's descriptors (and so its locks) until it execs.
            let d = Dir::new(&format!("twice-{case}"));
            let img = d.0.join("disk.img");
            std::fs::write(&img, [0u8; 4096]).unwrap();
            std::os::unix::fs::symlink(&img, d.0.join("link.img")).unwrap();
            std::fs::hard_link(&img, d.0.join("hard.img")).unwrap();
            let text = format!(
                "[kernel]\npath = \"k\"\n\
                 [[block]]\nid = \"a\"\npath = \"disk.img\"\n\
                 [[block]]\nid = \"b\"\npath = {other:?}\n"
            );
            let mut cfg = VmConfig::parse(&text, "guest.toml").unwrap();
            for b in &mut cfg.block {
                b.path = d.0.join(&b.path);
            }
            let e = open_disks(&cfg, "guest.toml", &PluginRegistry::new(), None)
                .err()
                .unwrap()
                .to_string();
            assert!(e.starts_with("guest.toml: block[1].path: "), "{other}: {e}");
            assert!(
                locked_out(&e) && e.contains(other.trim_start_matches("./")),
                "{e}"
            );
        }
        // Both read-only: they share it.
        let d = Dir::new("twice-ro");
        std::fs::write(d.0.join("disk.img"), [0u8; 4096]).unwrap();
        std::os::unix::fs::symlink(d.0.join("disk.img"), d.0.join("link.img")).unwrap();
        let text = "[kernel]\npath = \"k\"\n\
             [[block]]\nid = \"a\"\npath = \"disk.img\"\nread_only = true\n\
             [[block]]\nid = \"b\"\npath = \"link.img\"\nread_only = true\n";
        let mut cfg = VmConfig::parse(text, "guest.toml").unwrap();
        for b in &mut cfg.block {
            b.path = d.0.join(&b.path);
        }
        assert_eq!(
            open_disks(&cfg, "guest.toml", &PluginRegistry::new(), None)
                .map(|d| d.len())
                .ok(),
            Some(2)
        );
    }

    /// `direct = true` on a file system that cannot take O_DIRECT is one clear line; on one
    /// that can (/var/tmp here), the image opens with its alignment.
    #[test]
    fn direct_is_refused_with_a_reason_where_the_file_system_cannot() {
        // The kernel's refusal (EINVAL from open with O_DIRECT) becomes the reason; this
        // host's file systems all take O_DIRECT, so the refusal itself is made up here.
        let shm = Path::new("/dev/shm/disk.img");
        let einval = std::io::Error::from_raw_os_error(libc::EINVAL);
        let e = open_error(shm, &einval, true);
        assert!(
            e.starts_with("/dev/shm/disk.img: its file system does not support O_DIRECT"),
            "{e}"
        );
        assert_eq!(
            open_error(shm, &einval, false),
            "/dev/shm/disk.img: Invalid argument (os error 22)"
        );
        let disk = std::path::PathBuf::from(format!("/var/tmp/vmm-direct-{}", std::process::id()));
        std::fs::write(&disk, [0u8; 8192]).unwrap();
        if let Ok(f) = open_image_with(&disk, false, true) {
            let raw = RawFile::new(f, false, "d").unwrap().with_direct();
            assert!(raw.direct().is_some());
        }
        let _ = std::fs::remove_file(&disk);
    }
}
