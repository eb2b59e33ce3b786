//! Interceptor plugins as shared objects, on the host: the loader's refusals (through the
//! real `vmm` binary, exit 2), libraries shared and unloaded, state per instance, and
//! misbehaving plugins, over real file-backed disks.

mod common;

use common::{out_file, output, run_vmm_config};
use compat::{
    BlockBackend, BlockRequestKind, BlockStack, InstanceSpec, PluginRegistry, RequestStatus,
    Segment,
};
use devices::virtio::block::RawFile;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vmm_lab::plugins::{build_c, plugin_dir, plugins, Plugins};

fn built() -> Plugins {
    plugins().expect("building the example plugins")
}

fn file_disk(name: &str, bytes: usize) -> (PathBuf, Arc<RawFile>) {
    let path = out_file(name);
    std::fs::write(&path, vec![0u8; bytes]).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    (path, Arc::new(RawFile::new(f, false, name).unwrap()))
}

fn spec(reg: &PluginRegistry, id: &str, path: &Path, config: serde_json::Value) -> InstanceSpec {
    InstanceSpec {
        id: id.into(),
        plugin: reg.load(path, None).unwrap(),
        config_json: config.to_string(),
        enabled: true,
    }
}

fn io(stack: &BlockStack, kind: BlockRequestKind, offset: u64, buf: &mut [u8]) -> RequestStatus {
    let seg = [Segment {
        base: buf.as_mut_ptr(),
        len: buf.len(),
    }];
    // SAFETY: buf outlives the call.
    unsafe { stack.submit(kind, offset, &seg) }
}

/// Is the plugin at `path` mapped? The loader maps the sealed copy it hashed, which shows
/// as `/memfd:vmm-plugin:FILE (deleted)`.
fn mapped(path: &Path) -> bool {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let file = path.file_name().unwrap().to_string_lossy();
    let name = format!("/memfd:vmm-plugin:{file}");
    maps.lines().any(|l| l.contains(&name))
}

#[test]
fn c_plugin_transforms_what_reaches_the_file_and_rust_plugin_counts() {
    let p = built();
    let reg = PluginRegistry::new();
    let (path, disk) = file_disk("plug-xor.img", 1 << 20);
    let chain = [
        spec(&reg, "count", &p.counter, serde_json::json!({})),
        spec(&reg, "xor", &p.xor, serde_json::json!({"key": 0x3c})),
    ];
    let stack = BlockStack::build("d", disk, &chain).unwrap();
    let mut data = b"guest bytes!".repeat(512)[..4096].to_vec();
    let original = data.clone();
    assert_eq!(
        io(&stack, BlockRequestKind::Write, 8192, &mut data),
        RequestStatus::Ok
    );
    assert_eq!(data, original, "the guest's buffer is never transformed");
    let raw = std::fs::read(&path).unwrap();
    let xored: Vec<u8> = original.iter().map(|b| b ^ 0x3c).collect();
    assert_eq!(
        raw[8192..12288],
        xored[..],
        "the file holds the XORed bytes"
    );
    let mut back = vec![0u8; 4096];
    assert_eq!(
        io(&stack, BlockRequestKind::Read, 8192, &mut back),
        RequestStatus::Ok
    );
    assert_eq!(back, original);
    let counts = stack.layers()[0].plugin_stats().unwrap();
    assert_eq!(
        (counts["writes"].as_u64(), counts["reads"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(counts["bytes_written"].as_u64(), Some(4096));
    let xor = stack.layers()[1].plugin_stats().unwrap();
    assert_eq!(
        (xor["key"].as_u64(), xor["requests"].as_u64()),
        (Some(0x3c), Some(2))
    );
}

#[test]
fn two_disks_share_one_library_with_separate_state_and_it_unloads_after_the_last() {
    let p = built();
    let reg = PluginRegistry::new();
    let a = reg.load(&p.counter, None).unwrap();
    let b = reg.load(&p.counter, None).unwrap();
    assert!(Arc::ptr_eq(&a, &b), "loaded once");
    assert_eq!(a.name(), "counter");
    assert_eq!(a.blake3().len(), 64);
    drop((a, b));
    assert!(!mapped(&p.counter), "nothing holds it: unloaded");
    let (_, d1) = file_disk("plug-share1.img", 1 << 20);
    let (_, d2) = file_disk("plug-share2.img", 1 << 20);
    let s1 = BlockStack::build(
        "d1",
        d1,
        &[spec(&reg, "c1", &p.counter, serde_json::json!({}))],
    )
    .unwrap();
    let s2 = BlockStack::build(
        "d2",
        d2,
        &[spec(&reg, "c2", &p.counter, serde_json::json!({}))],
    )
    .unwrap();
    assert!(Arc::ptr_eq(
        s1.layers()[0].plugin(),
        s2.layers()[0].plugin()
    ));
    let mut buf = vec![1u8; 512];
    for _ in 0..3 {
        io(&s1, BlockRequestKind::Write, 0, &mut buf);
    }
    io(&s2, BlockRequestKind::Write, 0, &mut buf);
    let writes = |s: &BlockStack| s.layers()[0].plugin_stats().unwrap()["writes"].as_u64();
    assert_eq!((writes(&s1), writes(&s2)), (Some(3), Some(1)));
    assert!(mapped(&p.counter));
    drop(s1);
    assert!(mapped(&p.counter), "still used by d2");
    assert_eq!(writes(&s2), Some(1));
    drop(s2);
    assert!(!mapped(&p.counter), "unloaded with its last instance");
}

#[test]
fn a_panicking_or_failing_plugin_fails_only_its_requests() {
    let p = built();
    let reg = PluginRegistry::new();
    for mode in ["panic", "fail", "panic-post"] {
        let (path, disk) = file_disk(&format!("plug-faulty-{mode}.img"), 1 << 20);
        let cfg = serde_json::json!({"mode": mode, "from": 4096, "to": 8192});
        let stack = BlockStack::build("d", disk, &[spec(&reg, "f", &p.faulty, cfg)]).unwrap();
        let mut buf = vec![7u8; 4096];
        assert_eq!(
            io(&stack, BlockRequestKind::Write, 0, &mut buf),
            RequestStatus::Ok,
            "{mode}"
        );
        assert_eq!(
            io(&stack, BlockRequestKind::Write, 4096, &mut buf),
            RequestStatus::IoError,
            "{mode}"
        );
        assert_eq!(
            io(&stack, BlockRequestKind::Write, 8192, &mut buf),
            RequestStatus::Ok,
            "{mode}: goes on"
        );
        let raw = std::fs::read(&path).unwrap();
        assert!(raw[..4096].iter().all(|&b| b == 7) && raw[8192..12288].iter().all(|&b| b == 7));
        if mode != "panic-post" {
            assert!(
                raw[4096..8192].iter().all(|&b| b == 0),
                "{mode}: the failed write never ran"
            );
        }
        assert_eq!(
            stack.layers()[0]
                .counters()
                .errors
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        assert_eq!(
            stack.layers()[0].plugin_stats().unwrap()["hits"].as_u64(),
            Some(1)
        );
    }
}

#[test]
fn remap_plugin_owns_its_layout_and_finds_it_again_after_reopening() {
    let p = built();
    let reg = PluginRegistry::new();
    let (path, disk) = file_disk("plug-remap.img", 4 << 20);
    let total = 8192u64; // sectors
    let stack = BlockStack::build(
        "d",
        disk.clone(),
        &[spec(&reg, "r", &p.remap, serde_json::json!({}))],
    )
    .unwrap();
    let n = stack.capacity() / 512;
    assert!(
        n < total && 1 + n.div_ceil(64) + n <= total,
        "capacity {n} leaves room for the map"
    );
    let mut a = vec![0xa1u8; 1024]; // logical sectors 100, 101
    let mut b = vec![0xb2u8; 512]; // logical sector 7
    assert_eq!(
        io(&stack, BlockRequestKind::Write, 100 * 512, &mut a),
        RequestStatus::Ok
    );
    assert_eq!(
        io(&stack, BlockRequestKind::Write, 7 * 512, &mut b),
        RequestStatus::Ok
    );
    drop(stack);
    let raw = std::fs::read(&path).unwrap();
    assert_eq!(&raw[..8], b"VMMREMAP");
    let d = u64::from_le_bytes(raw[24..32].try_into().unwrap()) as usize;
    let entry =
        |i: usize| u64::from_le_bytes(raw[512 + 8 * i..512 + 8 * i + 8].try_into().unwrap());
    assert_eq!(
        (entry(100), entry(101), entry(7), entry(8)),
        (1, 2, 3, 0),
        "slots in order of first write"
    );
    assert!(
        raw[d * 512..(d + 2) * 512].iter().all(|&x| x == 0xa1),
        "sectors 100-101 at slots 0-1"
    );
    assert!(raw[(d + 2) * 512..(d + 3) * 512].iter().all(|&x| x == 0xb2));
    assert!(
        raw[100 * 512..102 * 512].iter().all(|&x| x != 0xa1),
        "not at their own offset"
    );
    // Reopened, the map is read back.
    let stack = BlockStack::build(
        "d",
        disk,
        &[spec(&reg, "r", &p.remap, serde_json::json!({}))],
    )
    .unwrap();
    let mut back = vec![0u8; 3 * 512]; // sectors 99..102: a hole, then a
    assert_eq!(
        io(&stack, BlockRequestKind::Read, 99 * 512, &mut back),
        RequestStatus::Ok
    );
    assert!(back[..512].iter().all(|&x| x == 0) && back[512..].iter().all(|&x| x == 0xa1));
    assert_eq!(
        stack.layers()[0].plugin_stats().unwrap()["mapped_sectors"].as_u64(),
        Some(3)
    );
    // A disk with foreign data is refused, not reformatted.
    let (_, foreign) = file_disk("plug-remap-foreign.img", 1 << 20);
    let mut junk = vec![0xeeu8; 512];
    unsafe {
        foreign.execute(&compat::IoRequest {
            kind: BlockRequestKind::Write,
            offset: 0,
            len: 512,
            segments: &[Segment {
                base: junk.as_mut_ptr(),
                len: 512,
            }],
        })
    };
    let err = BlockStack::build(
        "d",
        foreign,
        &[spec(&reg, "r", &p.remap, serde_json::json!({}))],
    )
    .unwrap_err();
    assert!(err.to_string().contains("holds no remap layout"), "{err}");
}

/// A guest config for the refusal cases: everything valid but the interceptors.
fn base_config() -> String {
    let kernel = out_file("plug-cfg-kernel");
    // A bzImage's setup header magic: enough for the config check to pass.
    let mut fake = vec![0u8; 0x1000];
    fake[0x202..0x206].copy_from_slice(b"HdrS");
    std::fs::write(&kernel, fake).unwrap();
    let disk = out_file("plug-cfg-disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let disk2 = out_file("plug-cfg-disk2.img");
    std::fs::write(&disk2, vec![0u8; 1 << 20]).unwrap();
    format!(
        "[machine]\nmemory_mib = 128\n[kernel]\npath = {kernel:?}\n\
         [[block]]\nid = \"data\"\npath = {disk:?}\ninterceptors = [\"a\"]\n\
         [[block]]\nid = \"other\"\npath = {disk2:?}\n"
    )
}

fn interceptor(id: &str, path: &Path, extra: &str) -> String {
    format!("[[interceptor]]\nid = {id:?}\npath = {path:?}\n{extra}\n")
}

#[test]
fn vmm_refuses_each_bad_plugin_with_one_line_and_exit_2() {
    let p = built();
    let dir = plugin_dir();
    let src = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let no_entry = build_c(
        &src("no-entry.c", "int not_the_entry(void) { return 1; }\n"),
        "libno-entry.so",
    )
    .unwrap();
    let old_abi = build_c(
        &src(
            "old-abi.c",
            "#include <vmm_interceptor.h>\nstatic const struct vmm_interceptor_table t = { .abi_version = 99, .name = \"old\" };\n\
             const struct vmm_interceptor_table *vmm_interceptor_entry(void) { return &t; }\n",
        ),
        "libold-abi.so",
    )
    .unwrap();
    let text_file = src("not-a-library.so", "this is text\n");
    let zeros = "0".repeat(64);
    let base = base_config();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "plug-missing.toml",
            interceptor("a", Path::new("/no/such/plugin.so"), ""),
            "no such file",
        ),
        (
            "plug-not-so.toml",
            interceptor("a", &text_file, ""),
            "not a loadable shared object",
        ),
        (
            "plug-no-entry.toml",
            interceptor("a", &no_entry, ""),
            "no entry symbol `vmm_interceptor_entry`",
        ),
        (
            "plug-old-abi.toml",
            interceptor("a", &old_abi, ""),
            "plugin ABI version 99, this VMM speaks 1 to 2",
        ),
        (
            "plug-pin.toml",
            interceptor("a", &p.counter, &format!("blake3 = {zeros:?}")),
            "but the config pins",
        ),
        (
            "plug-create.toml",
            interceptor("a", &p.xor, "config = { key = 300 }"),
            "refused its config: config: key must be a number from 0 to 255",
        ),
        (
            "plug-rust-config.toml",
            interceptor("a", &p.counter, "config = { trace = 3 }"),
            "refused its config: config: trace: invalid type",
        ),
        (
            "plug-dup-id.toml",
            interceptor("a", &p.counter, "") + &interceptor("a", &p.counter, ""),
            "interceptor[1].id: \"a\" is used twice",
        ),
        (
            "plug-unknown.toml",
            interceptor("b", &p.counter, ""),
            "block[0].interceptors[0]: no [[interceptor]] has id \"a\"",
        ),
    ];
    for (name, extra, want) in cases {
        let out = run_vmm_config(name, &format!("{base}{extra}"));
        let text = output(&out);
        assert_eq!(out.status.code(), Some(2), "{name}: {text}");
        assert!(
            text.contains(name) && text.contains(want),
            "{name}: want {want:?} in {text}"
        );
        assert_eq!(text.trim().lines().count(), 1, "{name}: one line: {text}");
    }
    // One instance serving two disks is refused too (it sits over one disk's layers).
    let two = base.replace("id = \"other\"", "id = \"other\"\ninterceptors = [\"a\"]")
        + &interceptor("a", &p.counter, "");
    let out = run_vmm_config("plug-two-disks.toml", &two);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        output(&out).contains("already serves device \"data\""),
        "{}",
        output(&out)
    );
    // The right pin is accepted: vmm gets past the plugins to the (fake) kernel and fails
    // there, not with exit 2.
    let pin = blake3_of(&p.counter);
    let out = run_vmm_config(
        "plug-pin-ok.toml",
        &format!(
            "{base}{}",
            interceptor("a", &p.counter, &format!("blake3 = {pin:?}"))
        ),
    );
    assert_ne!(out.status.code(), Some(2), "{}", output(&out));
    assert!(
        output(&out).contains("neither a bzImage"),
        "{}",
        output(&out)
    );
}

fn blake3_of(path: &Path) -> String {
    let reg = PluginRegistry::new();
    reg.load(path, None).unwrap().blake3().to_string()
}
