//! The device's and the VMM's life cycle with a real guest: the guest's driver resets the
//! disk and starts over (sysfs unbind and bind), and SIGTERM stops the VMM with every
//! acknowledged write on the disk, through a write-back cache over encryption; at exit every
//! instance is destroyed after the flush, with the layers below still working.

mod common;

use common::stack::{file_stack, io, stats};
use common::{out_file, output};
use compat::{BlockRequestKind, RequestStatus};
use vmm_lab::plugins::plugins;

fn markers(r: &serde_json::Value) -> Vec<String> {
    r["console"]["markers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| m.as_str().unwrap_or("").to_string())
        .collect()
}

fn fresh_disk(name: &str) -> std::path::PathBuf {
    let disk = out_file(&format!("{name}.img"));
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    disk
}

/// Unbinding virtio_blk resets the device (status 0 after DRIVER_OK): the device gives its
/// queue up and the bind initializes it again. The data written before is still there and
/// fio verify passes on the disk it comes back as. With interrupt coalescing on, so its
/// timer is armed and fires on the I/O thread, across the reset too.
#[test]
fn the_guest_driver_resets_the_disk_and_starts_over() {
    let disk = fresh_disk("life-rebind");
    let disk_arg = disk.to_string_lossy().into_owned();
    let args = [
        "--backend",
        "vmm",
        "--task",
        "selftest rebind readcheck=0 fio=verify-crc32c selftest",
        "--data-disk",
        &disk_arg,
        "--block-option",
        "coalesce_us=2000",
    ];
    let Some((out, r)) = common::guest_run("life-rebind", &args) else {
        return;
    };
    let text = output(&out);
    assert!(out.status.success(), "{text}");
    assert_eq!(r["problems"].as_array().map(Vec::len), Some(0), "{r}");
    let m = markers(&r);
    let rebound = m.iter().position(|l| l.starts_with("rebind ok"));
    assert!(rebound.is_some(), "{m:?}");
    let passes: Vec<_> = m
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with("selftest PASS"))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(passes.len(), 2, "{m:?}");
    assert!(passes[0] < rebound.unwrap() && rebound.unwrap() < passes[1]);
    assert!(
        m.iter().any(|l| l.starts_with("readcheck block=0 ok")),
        "{m:?}"
    );
    assert_eq!(r["console"]["exit_rc"], 0, "{r}");
}

/// SIGTERM while the guest writes: the vCPUs stop, the queue is drained, the write-back
/// cache writes back and encrypt commits, and vmm exits 0. Reopened, the image holds every
/// block the guest was told was written, and encrypt needed no fallback (its last commit
/// covered everything).
#[test]
fn sigterm_during_writes_keeps_every_acknowledged_write() {
    let p = plugins().expect("building the plugins");
    let disk = fresh_disk("life-sigterm");
    let key = out_file("life-sigterm.key");
    std::fs::write(&key, "5c".repeat(32)).unwrap();
    let chain = out_file("life-sigterm.toml");
    std::fs::write(
        &chain,
        format!(
            "[[interceptor]]\nid = \"cache\"\npath = {:?}\nconfig = {{ size_mib = 16, write_back = true }}\n\
             [[interceptor]]\nid = \"enc\"\npath = {:?}\nconfig = {{ key_file = {key:?} }}\n",
            p.cache, p.encrypt
        ),
    )
    .unwrap();
    let (disk_arg, chain_arg) = (
        disk.to_string_lossy().into_owned(),
        chain.to_string_lossy().into_owned(),
    );
    let args = [
        "--backend",
        "vmm",
        "--task",
        "stamp",
        "--data-disk",
        &disk_arg,
        "--interceptors",
        &chain_arg,
        "--control",
        "sigterm",
    ];
    let Some((out, r)) = common::guest_run("life-sigterm", &args) else {
        return;
    };
    let text = output(&out);
    assert_eq!(
        r["vmm_exit"]["status"], 0,
        "vmm must exit 0 on SIGTERM: {r}"
    );
    assert!(
        text.contains("vmm: SIGTERM: the guest was stopped and every disk settled"),
        "{text}"
    );
    let acked: Vec<usize> = markers(&r)
        .iter()
        .filter_map(|l| l.strip_prefix("stamp acked=")?.trim().parse().ok())
        .collect();
    let last = *acked.last().expect("the guest acknowledged some writes");
    // Reopen: cache over encrypt, as the guest had it; encrypt alone is enough to read.
    let stack = file_stack(
        &disk,
        "enc",
        &p.encrypt,
        serde_json::json!({ "key_file": key }),
    )
    .expect("the image opens after SIGTERM");
    for n in 0..=last {
        let mut block = vec![0u8; 4096];
        assert_eq!(
            io(&stack, BlockRequestKind::Read, n * 4096, &mut block),
            RequestStatus::Ok
        );
        let want: Vec<u8> = format!("stamp {n}\n").bytes().cycle().take(4096).collect();
        assert!(
            block == want,
            "block {n} (of {last} acknowledged) is not its stamp"
        );
    }
    let s = stats(&stack, "enc");
    assert_eq!(s["fallbacks"], 0, "{s}");
}

/// The ordered teardown after the guest's reset: the vCPUs stop, each disk's queues settle,
/// its chain is flushed, then every instance is destroyed on the disk's I/O thread while the
/// layers below still work. The counter's destroy writes its counts to the image through
/// them; the record is there after vmm exits, with every request it saw counted.
#[test]
fn at_exit_every_instance_is_destroyed_after_the_flush_and_its_last_write_lands() {
    let p = plugins().expect("building the plugins");
    let disk = fresh_disk("teardown");
    const STAMP_AT: u64 = 200 << 20;
    let chain = out_file("teardown.toml");
    std::fs::write(
        &chain,
        format!(
            "[[interceptor]]\nid = \"count\"\npath = {:?}\nconfig = {{ stamp_on_destroy = {STAMP_AT} }}\n",
            p.counter
        ),
    )
    .unwrap();
    let (disk_arg, chain_arg) = (
        disk.to_string_lossy().into_owned(),
        chain.to_string_lossy().into_owned(),
    );
    let args = [
        "--backend",
        "vmm",
        "--task",
        "fio=verify-crc32c",
        "--data-disk",
        &disk_arg,
        "--interceptors",
        &chain_arg,
    ];
    let Some((out, r)) = common::guest_run("teardown", &args) else {
        return;
    };
    assert!(out.status.success(), "{}", output(&out));
    assert_eq!(r["console"]["exit_rc"], 0, "{r}");
    use std::os::unix::fs::FileExt;
    let mut record = [0u8; 512];
    std::fs::File::open(&disk)
        .unwrap()
        .read_exact_at(&mut record, STAMP_AT)
        .unwrap();
    let text = String::from_utf8_lossy(&record);
    let line = text.trim_end_matches('\0');
    assert!(line.starts_with("counter destroyed: "), "{line:?}");
    let count = |key: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    // fio verify wrote 16 MiB in 4 KiB blocks and read them back.
    assert!(count("writes=") >= 4096, "{line}");
    assert!(count("reads=") >= 4096, "{line}");
    assert!(
        count("flushes=") >= 1,
        "the guest's sync and the shutdown flush: {line}"
    );
}
