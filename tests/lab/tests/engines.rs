//! The block I/O engines and queues in the real guest: fio verify on the synchronous engine
//! (the fallback where io_uring is refused), with and without an interceptor; two fio jobs
//! at once on the io_uring engine named explicitly; a 2-queue disk the guest's driver sets
//! up with both queues. vmm says once at start which engine its disks use.

mod common;

use common::{out_file, output};
use vmm_lab::plugins::plugins;

/// A fresh sparse 256 MiB data disk.
fn fresh_disk(name: &str) -> String {
    let disk = out_file(&format!("{name}.img"));
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    disk.to_string_lossy().into_owned()
}

/// Boots vmm with `extra` arguments and `task`; checks the run passed and that vmm named
/// `engine` as its disks' engine; returns the run's markers.
fn run(name: &str, extra: &[&str], task: &str, engine: &str) -> Option<Vec<String>> {
    let disk = fresh_disk(name);
    let mut args = vec![
        "--backend",
        "vmm",
        "--show-console",
        "--data-disk",
        &disk,
        "--task",
        task,
    ];
    args.extend_from_slice(extra);
    let (out, r) = common::guest_run(name, &args)?;
    let text = output(&out);
    assert!(out.status.success(), "{text}");
    assert_eq!(r["problems"].as_array().map(Vec::len), Some(0), "{r}");
    assert_eq!(r["console"]["exit_rc"], 0, "{r}");
    let said = format!("vmm: block I/O engine: {engine}");
    assert_eq!(text.matches(&said).count(), 1, "{said} once in {text}");
    Some(
        r["console"]["markers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_str().unwrap_or("").to_string())
            .collect(),
    )
}

/// The engine vmm picks when a run names none: io_uring here (the lab's kernel allows it),
/// unless the suite runs with `VMM_LAB_ENGINE` set (docs/lab.md).
fn default_engine() -> String {
    match std::env::var("VMM_LAB_ENGINE").as_deref() {
        Ok("sync") => "sync".to_string(),
        _ => "io_uring".to_string(),
    }
}

/// Writes chain file `name`: the C xor plugin (a data transform that does not handle
/// discard); returns its path.
fn xor_chain(name: &str) -> String {
    let p = plugins().expect("building the plugins");
    let chain = out_file(name);
    std::fs::write(
        &chain,
        format!(
            "[[interceptor]]\nid = \"xor\"\npath = {:?}\nconfig = {{ key = 90 }}\n",
            p.xor
        ),
    )
    .unwrap();
    chain.to_string_lossy().into_owned()
}

#[test]
fn fio_verify_passes_on_the_synchronous_engine() {
    run(
        "engine-sync",
        &["--engine", "sync"],
        "selftest fio=verify-crc32c",
        "sync",
    );
}

#[test]
fn fio_verify_passes_through_an_interceptor_on_the_synchronous_engine() {
    let chain = xor_chain("engine-sync-xor.toml");
    run(
        "engine-sync-xor",
        &["--engine", "sync", "--interceptors", &chain],
        "fio=verify-crc32c",
        "sync",
    );
}

#[test]
fn two_fio_jobs_at_once_verify_on_the_io_uring_engine() {
    run(
        "engine-uring-2jobs",
        &["--engine", "io_uring"],
        "fio=verify-2jobs",
        "io_uring",
    );
}

/// A disk offering more queues than the guest has CPUs: the guest's driver sets up one per
/// CPU, and the disk serves those.
#[test]
fn a_two_queue_disk_on_one_vcpu_is_used_with_one_queue() {
    let Some(markers) = run(
        "engine-2queues-1cpu",
        &["--num-queues", "2"],
        "queues fio=verify-crc32c",
        &default_engine(),
    ) else {
        return;
    };
    assert!(
        markers
            .iter()
            .any(|m| m.starts_with("queues ") && m.ends_with(" n=1")),
        "{markers:?}"
    );
}

/// Booting only: in the lab, I/O on a 2-vCPU guest can crash the emulated SVM stack
/// (docs/lab.md), so the two queues serving fio at once are checked by the device's unit
/// tests and, on hardware KVM, by `lab bench --num-queues 2`.
#[test]
fn a_two_queue_disk_is_set_up_with_both_queues_by_the_guest() {
    let Some(markers) = run(
        "engine-2queues",
        &["--vcpus", "2", "--num-queues", "2"],
        "queues",
        &default_engine(),
    ) else {
        return;
    };
    assert!(
        markers
            .iter()
            .any(|m| m.starts_with("queues ") && m.ends_with(" n=2")),
        "{markers:?}"
    );
}

/// `blkdiscard` in the guest punches holes in the sparse image: fio verify wrote 16 MiB
/// into it, and after the discard the host file holds almost nothing. Through a plugin
/// that does not handle discard (xor), the device does not offer it: the guest's discard
/// is refused and the image keeps its blocks. The data disk is the lab's own fresh one (on
/// the lab's tmpfs, which punches holes; the repository's 9p share does not).
#[test]
fn a_guest_discard_shrinks_the_sparse_image_unless_a_plugin_cannot_handle_it() {
    let chain = xor_chain("engine-discard-xor.toml");
    for (name, extra, offered) in [
        ("engine-discard", vec![], true),
        (
            "engine-discard-xor",
            vec!["--interceptors", chain.as_str()],
            false,
        ),
    ] {
        let mut args = vec![
            "--backend",
            "vmm",
            "--disk-mib",
            "256",
            "--task",
            "fio=verify-crc32c discard",
        ];
        args.extend_from_slice(&extra);
        let Some((out, r)) = common::guest_run(name, &args) else {
            return;
        };
        assert!(out.status.success(), "{}", output(&out));
        assert_eq!(r["console"]["exit_rc"], 0, "{r}");
        let markers = r["console"]["markers"].to_string();
        let held = r["data_allocated"][0].as_u64().unwrap();
        if offered {
            assert!(markers.contains("\"discard ok\""), "{markers}");
            assert!(
                held < 1 << 20,
                "{held} bytes still allocated after the discard"
            );
        } else {
            assert!(markers.contains("\"discard refused"), "{markers}");
            assert!(
                held >= 16 << 20,
                "{held} bytes: fio's 16 MiB are still there"
            );
        }
    }
}
