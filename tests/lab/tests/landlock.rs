//! The vmm's Landlock rules (docs/security.md, "Landlock"): on the host, the rules of the
//! API's and devices' threads with the real plugins and the real dynamic loader; in the lab,
//! a real guest whose plugin hook tries to read /etc/passwd and whose API is asked to load
//! a plugin from outside the folders its config declares.

mod common;

use common::{out_file, output, skip};
use compat::{BlockRequestKind, BlockStack, InstanceSpec, PluginRegistry, RequestStatus, Segment};
use devices::virtio::block::RawFile;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vmm::config::VmConfig;
use vmm::landlock::{kernel_abi, LandlockMode, Rulesets};
use vmm::seccomp::ThreadKind;
use vmm_lab::plugins::{plugin_dir, plugins};

#[test]
fn landlock_is_on_unless_the_operator_says_otherwise() {
    let line = common::option_help("--landlock");
    for word in ["on", "off", "[default: on]"] {
        assert!(line.contains(word), "--landlock: no `{word}` in: {line}");
    }
}

fn landlock_here() -> bool {
    if kernel_abi() > 0 {
        return true;
    }
    skip("this kernel has no Landlock");
    false
}

/// Rules from a config that declares `plugin_dirs` and `read_paths`.
fn rulesets(plugin_dirs: &[&Path], read_paths: &[&Path]) -> &'static Rulesets {
    let list = |ps: &[&Path]| {
        ps.iter()
            .map(|p| format!("{:?}", p.to_string_lossy()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let text = format!(
        "[kernel]\npath = \"/nonexistent\"\ncmdline = \"\"\n[landlock]\n\
         plugin_dirs = [{}]\nread_paths = [{}]\n",
        list(plugin_dirs),
        list(read_paths)
    );
    let cfg = VmConfig::parse(&text, "landlock.toml").unwrap();
    Box::leak(Box::new(
        Rulesets::build(LandlockMode::On, &cfg, None).unwrap(),
    ))
}

/// The API's thread loads plugins from its plugin folder (the loader's sealed memfd and
/// the plugin's own libraries included), and the kernel refuses the same plugin copied
/// elsewhere, whatever the API's own check would have said.
#[test]
fn the_api_thread_loads_plugins_only_from_its_plugin_folder() {
    if !landlock_here() {
        return;
    }
    let p = plugins().expect("building the plugins");
    let outside = out_file("landlock-outside-counter.so");
    std::fs::copy(&p.counter, &outside).unwrap();
    let rules = rulesets(&[&plugin_dir()], &[]);
    let (counter, xor) = (p.counter.clone(), p.xor.clone());
    let (inside, c_plugin, copied, passwd) = std::thread::spawn(move || {
        rules.apply(ThreadKind::Api).unwrap();
        let reg = PluginRegistry::new();
        (
            reg.load(&counter, None)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            reg.load(&xor, None).map(|_| ()).map_err(|e| e.to_string()),
            reg.load(&outside, None)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            std::fs::read("/etc/passwd").map(|_| ()),
        )
    })
    .join()
    .unwrap();
    assert!(inside.is_ok(), "{inside:?}");
    assert!(c_plugin.is_ok(), "{c_plugin:?}");
    let e = copied.unwrap_err();
    assert!(e.contains("Permission denied"), "{e}");
    assert_eq!(
        passwd.unwrap_err().kind(),
        std::io::ErrorKind::PermissionDenied
    );
}

fn io(stack: &BlockStack, offset: u64) -> RequestStatus {
    let mut buf = vec![0u8; 4096];
    let seg = [Segment {
        base: buf.as_mut_ptr(),
        len: buf.len(),
    }];
    // SAFETY: buf outlives the call.
    unsafe { stack.submit(BlockRequestKind::Read, offset, &seg) }
}

/// A plugin hook on a device's thread reads a file the config grants, and is refused
/// /etc/passwd; the request goes on either way.
#[test]
fn a_plugin_hook_reads_what_the_config_grants_and_not_etc_passwd() {
    if !landlock_here() {
        return;
    }
    let p = plugins().expect("building the plugins");
    let granted = out_file("landlock-granted.txt");
    std::fs::write(&granted, b"granted").unwrap();
    let rules = rulesets(&[], &[&granted]);
    let reg = PluginRegistry::new();
    let faulty = reg.load(&p.faulty, None).unwrap();
    let disk_path = out_file("landlock-hook.img");
    std::fs::write(&disk_path, vec![0u8; 1 << 20]).unwrap();
    let stats = std::thread::spawn(move || {
        rules.apply(ThreadKind::Device).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&disk_path);
        // Opened after the restriction: an image is not among a device's files.
        assert_eq!(
            file.unwrap_err().kind(),
            std::io::ErrorKind::PermissionDenied
        );
        let mut stats = Vec::new();
        for target in [Path::new("/etc/passwd"), granted.as_path()] {
            let spec = |id: &str| InstanceSpec {
                id: id.into(),
                plugin: faulty.clone(),
                config_json: serde_json::json!({
                    "mode": "read-file", "from": 0, "to": 1u64 << 40, "target": target,
                })
                .to_string(),
                enabled: true,
            };
            let disk = Arc::new(RawFile::new(tempfile_in_memory(), false, "d").unwrap());
            let stack = BlockStack::build("d", disk, &[spec("reader")]).unwrap();
            assert_eq!(io(&stack, 0), RequestStatus::Ok);
            assert_eq!(io(&stack, 4096), RequestStatus::Ok);
            stats.push(stack.layers()[0].plugin_stats().unwrap());
        }
        stats
    })
    .join()
    .unwrap();
    assert_eq!(stats[0]["read_ok"], 0, "{}", stats[0]);
    assert_eq!(stats[0]["read_refused"], 2, "{}", stats[0]);
    assert!(
        stats[0]["read_error"]
            .as_str()
            .is_some_and(|e| e.contains("Permission denied")),
        "{}",
        stats[0]
    );
    assert_eq!(stats[1]["read_ok"], 2, "{}", stats[1]);
    assert_eq!(stats[1]["read_refused"], 0, "{}", stats[1]);
}

/// A disk file that needs no path: a memfd (Landlock does not govern it), 1 MiB.
fn tempfile_in_memory() -> std::fs::File {
    // SAFETY: a NUL-terminated name and no flags beyond CLOEXEC.
    let fd = unsafe { libc::memfd_create(c"landlock-disk".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a new descriptor nobody else owns.
    let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    f.set_len(1 << 20).unwrap();
    f
}

/// In a real guest: the hook that reads /etc/passwd is refused on every request while the
/// one that reads /proc/meminfo (granted to devices) is not, and the guest's I/O goes on;
/// the API refuses a plugin from outside `[landlock] plugin_dirs` (403, naming the folder)
/// and loads one from inside it, with the dynamic loader under the API thread's rules. The
/// vmm says at start what the lab kernel's Landlock leaves unconfined.
#[test]
fn in_a_real_guest_a_hook_cannot_read_etc_passwd_and_the_api_loads_only_declared_plugins() {
    let p = plugins().expect("building the plugins");
    let outside: PathBuf = out_file("landlock-outside-xor.so");
    std::fs::copy(&p.xor, &outside).unwrap();
    let disk = common::chain::fresh_disk("landlock-guest");
    let toml = out_file("landlock-guest.toml");
    let faulty = |id: &str, target: &str| {
        common::chain::interceptor(
            id,
            &p.faulty,
            &format!(
                "config = {{ mode = \"read-file\", from = 0, to = 1099511627776, target = {target:?} }}"
            ),
        )
    };
    std::fs::write(
        &toml,
        faulty("passwd", "/etc/passwd") + &faulty("meminfo", "/proc/meminfo"),
    )
    .unwrap();
    let control = format!(
        "load:stray:{};load:xor:{}",
        outside.display(),
        p.xor.display()
    );
    let (disk_arg, toml_arg) = (
        disk.to_string_lossy().into_owned(),
        toml.to_string_lossy().into_owned(),
    );
    let args = [
        "--backend",
        "vmm",
        "--task",
        "fio=randread-4k-qd1",
        "--fio-runtime",
        "6",
        "--data-disk",
        &disk_arg,
        "--interceptors",
        &toml_arg,
        "--control",
        &control,
    ];
    let Some((out, r)) = common::guest_run("landlock-guest", &args) else {
        return;
    };
    let text = output(&out);
    assert_eq!(r["vmm_exit"]["status"], 0, "{r}\n{text}");
    let stats = |id: &str| common::chain::plugin_stats(&text, id);
    let (passwd, meminfo) = (stats("passwd"), stats("meminfo"));
    assert_eq!(passwd["read_ok"], 0, "{passwd}");
    assert!(
        passwd["read_refused"].as_u64().unwrap_or(0) > 100,
        "{passwd}"
    );
    assert!(
        passwd["read_error"]
            .as_str()
            .is_some_and(|e| e.contains("Permission denied")),
        "{passwd}"
    );
    assert!(meminfo["read_ok"].as_u64().unwrap_or(0) > 100, "{meminfo}");
    assert_eq!(meminfo["read_refused"], 0, "{meminfo}");
    let steps = &r["control"];
    let refused = steps[0]["error"].as_str().unwrap_or("");
    assert!(
        refused.contains("403") && refused.contains("[landlock] plugin_dirs: "),
        "{r}"
    );
    let seen = &steps[1]["result"]["requests"];
    assert!(seen[1].as_u64().unwrap_or(0) > 0, "{r}");
    // Debian 6.1's Landlock is ABI 2: the vmm says what it leaves out, once.
    let notes: Vec<&str> = text
        .lines()
        .filter_map(|l| l.find("vmm: landlock: ").map(|at| &l[at..]))
        .collect();
    assert!(
        !notes.is_empty()
            && notes
                .iter()
                .all(|n| n.contains("ABI 2") && n.contains("truncating (ABI 3)")),
        "{notes:?}"
    );
}
