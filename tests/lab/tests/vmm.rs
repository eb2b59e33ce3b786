//! Our `vmm` with the real guest under real KVM (inside the lab on this machine kind), and
//! its refusal of bad configs.

mod common;

use common::{output, pattern, report, run_vmm_config};
use std::process::Command;

#[test]
fn vmm_guest_boots_passes_selftest_and_fio_verify() {
    let args = [
        "--backend",
        "vmm",
        "--task",
        "selftest fio=verify-crc32c,randread-4k-qd1",
        "--fio-runtime",
        "2",
    ];
    let Some((out, r)) = common::guest_run("vmm-selftest-verify", &args) else {
        return;
    };
    assert!(out.status.success(), "{}", output(&out));
    assert_eq!(r["backend"], "vmm");
    assert_eq!(
        r["vmm_exit"]["status"], 0,
        "the guest's reset must end vmm with 0: {r}"
    );
    assert_eq!(r["console"]["selftest"], true);
    assert_eq!(r["console"]["exit_rc"], 0);
    assert_eq!(r["problems"].as_array().unwrap().len(), 0, "{r}");
    let rows = r["fio"].as_array().unwrap();
    for (job, dir) in [
        ("verify-crc32c", "write"),
        ("verify-crc32c", "read"),
        ("randread-4k-qd1", "read"),
    ] {
        assert!(
            rows.iter().any(|x| x["job"] == job
                && x["dir"] == dir
                && x["iops"].as_f64().unwrap_or(0.0) > 0.0),
            "{job} {dir} missing: {rows:?}"
        );
    }
}

#[test]
fn vmm_boots_the_elf_vmlinux_too() {
    let args = ["--backend", "vmm", "--elf-kernel", "--task", "selftest"];
    let Some((out, r)) = common::guest_run("vmm-elf", &args) else {
        return;
    };
    assert!(out.status.success(), "{}", output(&out));
    assert_eq!(r["console"]["selftest"], true, "{r}");
    assert_eq!(r["console"]["exit_rc"], 0);
}

#[test]
fn vmm_guest_with_two_vcpus_sees_both() {
    let args = ["--backend", "vmm", "--vcpus", "2", "--task", "boot"];
    let Some((out, r)) = common::guest_run("vmm-2vcpu", &args) else {
        return;
    };
    assert!(out.status.success(), "{}", output(&out));
    assert_eq!(
        r["console"]["init_cpus"], 2,
        "MP table must announce both vCPUs: {r}"
    );
    assert_eq!(r["console"]["exit_rc"], 0);
}

/// The start of a bzImage (its setup header's magic, boot protocol 2.15, a 2047-byte command
/// line): enough for vmm's config check, not to boot, so vmm gets past its config and fails
/// loading it (exit 1).
fn fake_bzimage() -> Vec<u8> {
    let mut k = vec![0u8; 0x1000];
    k[0x202..0x206].copy_from_slice(b"HdrS");
    k[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    k[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
    k
}

#[test]
fn bad_configs_exit_2_naming_file_and_field() {
    // The data disk through a dedup instance with `config` as given.
    let dedup_with = |config: &str| {
        let so = vmm_lab::plugins::plugins().unwrap().dedup;
        format!(
            "[[interceptor]]\nid = \"dd\"\npath = {so:?}\nconfig = {{ {config} }}\n[[block]]\ninterceptors = [\"dd\"]"
        )
    };
    let dir = common::repo().join("build/test-out");
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("cfg-disk.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    let kernel = dir.join("cfg-kernel");
    std::fs::write(&kernel, fake_bzimage()).unwrap();
    let good = format!(
        "[machine]\nvcpus = 1\nmemory_mib = 128\n[kernel]\npath = {:?}\ncmdline = \"console=ttyS0\"\n\
         [[block]]\nid = \"data\"\npath = {:?}\n",
        kernel, disk
    );
    for (name, from, to, field) in [
        ("zero-vcpus.toml", "vcpus = 1", "vcpus = 0", "machine.vcpus"),
        (
            "many-vcpus.toml",
            "vcpus = 1",
            "vcpus = 100000",
            "machine.vcpus",
        ),
        (
            "tiny-mem.toml",
            "memory_mib = 128",
            "memory_mib = 1",
            "machine.memory_mib",
        ),
        (
            "huge-mem.toml",
            "memory_mib = 128",
            "memory_mib = 99999999",
            "machine.memory_mib",
        ),
        (
            "no-kernel.toml",
            "cfg-kernel",
            "no-such-kernel",
            "kernel.path",
        ),
        (
            "no-disk.toml",
            "cfg-disk.img",
            "no-such-disk.img",
            "block[0].path",
        ),
        (
            "unknown.toml",
            "vcpus = 1",
            "vcpus = 1\nturbo = true",
            "turbo",
        ),
        (
            "no-queues.toml",
            "id = \"data\"",
            "id = \"data\"\nnum_queues = 0",
            "block[0].num_queues",
        ),
        (
            "many-queues.toml",
            "id = \"data\"",
            "id = \"data\"\nnum_queues = 17",
            "block[0].num_queues",
        ),
        (
            "bad-engine.toml",
            "id = \"data\"",
            "id = \"data\"\nengine = \"posix-aio\"",
            "engine",
        ),
        // Issue 29, item 7: the socket was named, the file and the field not.
        (
            "bad-api.toml",
            "[[block]]",
            "[api]\nsocket = \"/nonexistent/dir/api.sock\"\n[[block]]",
            "api.socket",
        ),
        // A plugin's own config: the file, the instance and the field.
        (
            "plugin-type.toml",
            "[[block]]",
            &dedup_with("index_mib = \"x\""),
            "interceptor[0] (dd): plugin `dedup` refused its config: config: index_mib: invalid type",
        ),
        (
            "plugin-journal.toml",
            "[[block]]",
            &dedup_with("journal_kib = 4294967296"),
            "interceptor[0] (dd): plugin `dedup` refused its config: config: journal_kib = 4294967296: 4 to",
        ),
    ] {
        let body = good.replace(from, to);
        assert_ne!(body, good, "{name}");
        let out = run_vmm_config(name, &body);
        let text = output(&out);
        assert_eq!(out.status.code(), Some(2), "{name}: {text}");
        assert!(
            text.contains(name) && text.contains(field),
            "{name}: {text}"
        );
        assert_eq!(text.trim().lines().count(), 1, "{name}: one line: {text}");
    }
    let dup = format!("{good}[[block]]\nid = \"data\"\npath = {disk:?}\n");
    let out = run_vmm_config("dup.toml", &dup);
    assert_eq!(out.status.code(), Some(2));
    assert!(output(&out).contains("block[1].id"), "{}", output(&out));
    // A config that passes validation but whose kernel only looks like one fails cleanly
    // (1) when it is loaded.
    let out = run_vmm_config("fake-kernel.toml", &good);
    assert_ne!(out.status.code(), Some(0), "{}", output(&out));
    assert_ne!(out.status.code(), Some(2), "{}", output(&out));
}

/// Each config error is exit 2 and one bounded line naming the file and the field, before
/// the VM exists: a file that is not a kernel, a command line too long or with a control
/// character, an initrd bigger than the guest's low memory, a cache bigger than the host's
/// memory, a TOML error on a 200 KB line; and a FIFO or /dev/zero as --config is refused at
/// once, not waited on or read forever.
#[test]
fn config_errors_are_exit_2_and_one_bounded_line() {
    let kernel = common::out_file("cfg2-kernel");
    std::fs::write(&kernel, fake_bzimage()).unwrap();
    let text = common::out_file("cfg2-text-kernel");
    std::fs::write(&text, b"not really a kernel").unwrap();
    let disk = common::out_file("cfg2-disk.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    let initrd = common::out_file("cfg2-initrd");
    std::fs::File::create(&initrd)
        .unwrap()
        .set_len(200 << 20)
        .unwrap();
    let cache = vmm_lab::plugins::plugins()
        .expect("building the plugins")
        .cache;
    let good = format!(
        "[machine]\nmemory_mib = 128\n[kernel]\npath = {kernel:?}\ncmdline = \"console=ttyS0\"\n\
         [[block]]\nid = \"data\"\npath = {disk:?}\ninterceptors = [\"cache\"]\n\
         [[interceptor]]\nid = \"cache\"\npath = {cache:?}\nconfig = {{ size_mib = 8 }}\n"
    );
    let long = "a".repeat(200_000);
    for (name, from, to, want) in [
        (
            "cfg2-not-kernel.toml",
            format!("path = {kernel:?}"),
            format!("path = {text:?}"),
            "kernel.path: ",
        ),
        (
            "cfg2-long-cmdline.toml",
            "console=ttyS0".to_string(),
            "a".repeat(3000),
            "kernel.cmdline: 3000 bytes is longer than",
        ),
        (
            "cfg2-nul-cmdline.toml",
            "console=ttyS0".to_string(),
            "console=ttyS0\\u0000init=/evil".to_string(),
            "kernel.cmdline: byte 13",
        ),
        (
            "cfg2-esc-cmdline.toml",
            "console=ttyS0".to_string(),
            "console=ttyS0\\u001b[2J".to_string(),
            "kernel.cmdline: byte 13",
        ),
        (
            "cfg2-initrd.toml",
            "cmdline = ".to_string(),
            format!("initrd = {initrd:?}\ncmdline = "),
            "kernel.initrd: ",
        ),
        (
            "cfg2-cache.toml",
            "size_mib = 8".to_string(),
            "size_mib = 99999999".to_string(),
            "size_mib = 99999999: more than the host's available memory",
        ),
        (
            "cfg2-toml.toml",
            "memory_mib = 128".to_string(),
            format!("memory_mib = 128\n{long} = 1"),
            "line 3, column 1: unknown field",
        ),
    ] {
        let body = good.replace(&from, &to);
        assert_ne!(body, good, "{name}");
        let out = run_vmm_config(name, &body);
        let text = output(&out);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{name}: {}",
            &text[..text.len().min(400)]
        );
        assert!(
            text.contains(name) && text.contains(want),
            "{name}: want {want:?}: {text}"
        );
        assert_eq!(text.trim().lines().count(), 1, "{name}: one line: {text}");
        assert!(text.len() < 600, "{name}: {} bytes", text.len());
    }
    let fifo = common::out_file("cfg2-fifo.toml");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo")
        .success());
    for config in [fifo.as_path(), std::path::Path::new("/dev/zero")] {
        let started = std::time::Instant::now();
        let out = Command::new(common::vmm_bin())
            .arg("--config")
            .arg(config)
            .output()
            .expect("running vmm");
        let text = output(&out);
        assert_eq!(out.status.code(), Some(2), "{text}");
        assert_eq!(text.trim().lines().count(), 1, "{text}");
        assert!(
            text.contains(&*config.to_string_lossy()) && text.contains("not a regular file"),
            "{text}"
        );
        assert!(started.elapsed().as_secs() < 10, "{}", config.display());
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    let tmp = common::out_file("sha-input.bin");
    std::fs::write(&tmp, bytes).unwrap();
    let out = Command::new("sha256sum")
        .arg(&tmp)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn vmm_data_lands_at_the_right_offsets_and_read_only_disk_refuses_writes() {
    if common::images_or_skip().is_none() {
        return;
    }
    const BLOCK: usize = 4096;
    // Two data disks: a read-write one with a host pattern at block 2000, a read-only one.
    let rw = common::out_file("hostcheck-rw.img");
    let mut img = vec![0u8; 3000 * BLOCK];
    let host_pattern = pattern("host-wrote-this\n", BLOCK);
    img[2000 * BLOCK..2001 * BLOCK].copy_from_slice(&host_pattern);
    std::fs::write(&rw, &img).unwrap();
    let ro = common::out_file("hostcheck-ro.img");
    std::fs::write(&ro, vec![0x5au8; 64 * BLOCK]).unwrap();

    let json = common::out_file("vmm-hostcheck.json");
    let (rw_arg, ro_arg, json_arg) = (
        rw.to_string_lossy().into_owned(),
        format!("{}:ro", ro.display()),
        json.to_string_lossy().into_owned(),
    );
    let out = common::lab(&[
        "guest",
        "--backend",
        "vmm",
        "--task",
        "hostcheck rocheck=/dev/vdc",
        "--data-disk",
        &rw_arg,
        "--data-disk",
        &ro_arg,
        "--json",
        &json_arg,
    ]);
    assert!(out.status.success(), "{}", output(&out));
    let r = report(&json);
    let markers: Vec<String> = r["console"]["markers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_string())
        .collect();

    // The guest read exactly what the host wrote at block 2000.
    let want = format!("hostcheck read-sha256={}", sha256_hex(&host_pattern));
    assert!(markers.contains(&want), "{want} not in {markers:?}");
    // The guest's write is in the host file at block 1000, and nowhere else changed.
    let after = std::fs::read(&rw).unwrap();
    assert_eq!(
        after[1000 * BLOCK..1001 * BLOCK],
        pattern("guest-wrote-this\n", BLOCK)[..]
    );
    assert!(
        after[..1000 * BLOCK].iter().all(|&b| b == 0),
        "bytes before block 1000 changed"
    );
    assert_eq!(after[2000 * BLOCK..2001 * BLOCK], host_pattern[..]);
    // The read-only disk refused the write and kept its bytes, seen from guest and host.
    let ro_sum = sha256_hex(&[0x5au8; BLOCK]);
    let want = format!("rocheck write-refused=yes sha256={ro_sum} ro=1");
    assert!(markers.contains(&want), "{want} not in {markers:?}");
    assert!(std::fs::read(&ro).unwrap().iter().all(|&b| b == 0x5a));
}

/// Every image is locked while a vmm has it open: a second opener (the same file named
/// twice in one config, by any path, or another process holding it) is refused before the
/// VM starts, with exit 2 and one line naming the file.
#[test]
fn an_image_in_use_is_refused_with_exit_2_and_one_line_naming_it() {
    let disk = common::out_file("lock-disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let link = common::out_file("lock-link.img");
    std::os::unix::fs::symlink(&disk, &link).unwrap();
    let kernel = common::out_file("lock-kernel");
    std::fs::write(&kernel, fake_bzimage()).unwrap();
    let config = |blocks: &[(&std::path::Path, bool)]| {
        let mut t = format!("[machine]\nmemory_mib = 128\n[kernel]\npath = {kernel:?}\n");
        for (i, (path, ro)) in blocks.iter().enumerate() {
            t.push_str(&format!(
                "[[block]]\nid = \"d{i}\"\npath = {path:?}\nread_only = {ro}\n"
            ));
        }
        t
    };
    let refused = |name: &str, body: &str, field: &str, file: &std::path::Path| {
        let out = run_vmm_config(name, body);
        let text = output(&out);
        assert_eq!(out.status.code(), Some(2), "{name}: {text}");
        assert_eq!(text.trim().lines().count(), 1, "{name}: one line: {text}");
        let want = format!(
            "{field}: {} is in use by another process or by another [[block]] of this config (it is locked)",
            file.display()
        );
        assert!(text.contains(&want), "{name}: {text}");
    };
    // (a) The same image twice in one config: by its name, through a symlink, read-only
    // beside a writable one.
    refused(
        "lock-twice.toml",
        &config(&[(&disk, false), (&disk, false)]),
        "block[1].path",
        &disk,
    );
    refused(
        "lock-link.toml",
        &config(&[(&disk, false), (&link, false)]),
        "block[1].path",
        &link,
    );
    refused(
        "lock-ro-rw.toml",
        &config(&[(&disk, true), (&disk, false)]),
        "block[1].path",
        &disk,
    );
    // (b) Another process holds it (here the test itself): a writer is refused, and so is
    // a reader.
    let held = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk)
        .unwrap();
    held.lock().unwrap();
    refused(
        "lock-held.toml",
        &config(&[(&disk, false)]),
        "block[0].path",
        &disk,
    );
    refused(
        "lock-held-ro.toml",
        &config(&[(&disk, true)]),
        "block[0].path",
        &disk,
    );
    // A reader elsewhere keeps writers out, not other readers: this vmm gets past its
    // disks (and then fails on the kernel, which is not one).
    held.unlock().unwrap();
    held.lock_shared().unwrap();
    refused(
        "lock-shared-rw.toml",
        &config(&[(&disk, false)]),
        "block[0].path",
        &disk,
    );
    let out = run_vmm_config("lock-shared-ro.toml", &config(&[(&disk, true)]));
    let text = output(&out);
    assert!(!text.contains("is in use"), "{text}");
    assert_ne!(out.status.code(), Some(0), "{text}");
    drop(held);
    // Once nobody holds it, the image opens.
    let out = run_vmm_config("lock-free.toml", &config(&[(&disk, false)]));
    assert!(!output(&out).contains("is in use"), "{}", output(&out));
}
