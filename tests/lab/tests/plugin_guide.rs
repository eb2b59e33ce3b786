//! docs/plugins.md is honest: its C and Rust plugins, exactly as printed there, build from
//! the header and the SDK alone, load, and behave as the guide says.

mod common;

use common::out_file;
use compat::{BlockRequestKind, BlockStack, InstanceSpec, PluginRegistry, RequestStatus, Segment};
use devices::virtio::block::RawFile;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use vmm_lab::plugins::{build_c, plugin_dir};

/// Code blocks whose fence names a file: ```lang FILE
fn guide_files() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(common::repo().join("docs/plugins.md")).unwrap();
    let mut files = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in text.lines() {
        match (&mut current, line.strip_prefix("```")) {
            (None, Some(info)) => {
                if let Some(name) = info.split_whitespace().nth(1) {
                    current = Some((name.to_string(), String::new()));
                }
            }
            (Some(_), Some("")) => files.push(current.take().unwrap()),
            (Some((_, body)), _) => {
                body.push_str(line);
                body.push('\n');
            }
            _ => {}
        }
    }
    files
}

fn file<'a>(files: &'a [(String, String)], name: &str) -> &'a str {
    &files
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("{name} not in the guide"))
        .1
}

fn stack_with(path: &Path, config: &str, disk_name: &str) -> Arc<BlockStack> {
    let disk = out_file(disk_name);
    std::fs::write(&disk, vec![0u8; 4 << 20]).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk)
        .unwrap();
    let reg = PluginRegistry::new();
    let spec = InstanceSpec {
        id: "guide".into(),
        plugin: reg.load(path, None).unwrap(),
        config_json: config.into(),
        enabled: true,
    };
    BlockStack::build(
        "data",
        Arc::new(RawFile::new(f, false, "data").unwrap()),
        &[spec],
    )
    .unwrap()
}

fn io(stack: &BlockStack, kind: BlockRequestKind, offset: u64) -> RequestStatus {
    let mut buf = vec![0u8; 4096];
    let seg = [Segment {
        base: buf.as_mut_ptr(),
        len: buf.len(),
    }];
    // SAFETY: buf outlives the call.
    unsafe { stack.submit(kind, offset, &seg) }
}

#[test]
fn the_guides_c_plugin_builds_from_the_header_and_guards_the_first_mib() {
    let files = guide_files();
    let src = plugin_dir().join("guide-guard.c");
    std::fs::create_dir_all(plugin_dir()).unwrap();
    std::fs::write(&src, file(&files, "guard.c")).unwrap();
    let so = build_c(&src, "libguard.so").expect("the guide's C plugin compiles with -Werror");
    let stack = stack_with(&so, r#"{"protect_kib":1024}"#, "guide-guard.img");
    assert_eq!(
        io(&stack, BlockRequestKind::Write, 0),
        RequestStatus::IoError
    );
    assert_eq!(
        io(&stack, BlockRequestKind::Write, 1 << 20),
        RequestStatus::Ok
    );
    assert_eq!(io(&stack, BlockRequestKind::Read, 0), RequestStatus::Ok);
    assert_eq!(stack.layers()[0].plugin_stats().unwrap()["refused"], 1);
    let bad = PluginRegistry::new();
    let spec = InstanceSpec {
        id: "g".into(),
        plugin: bad.load(&so, None).unwrap(),
        config_json: r#"{"protect_kib":-5}"#.into(),
        enabled: true,
    };
    let disk = out_file("guide-guard2.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let raw = RawFile::new(std::fs::File::open(&disk).unwrap(), true, "d").unwrap();
    let err = BlockStack::build("d", Arc::new(raw), &[spec]).unwrap_err();
    assert!(
        err.to_string()
            .contains("protect_kib must be a positive number"),
        "{err}"
    );
}

#[test]
fn the_guides_rust_plugin_builds_with_the_sdk_and_reports_the_slowest_request() {
    let files = guide_files();
    let dir = std::env::temp_dir().join(format!("guide-slowest-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("src")).unwrap();
    let repo = std::fs::canonicalize(common::repo()).unwrap();
    let manifest = file(&files, "Cargo.toml").replace("/path/to/vmm", &repo.to_string_lossy());
    std::fs::write(dir.join("Cargo.toml"), manifest).unwrap();
    std::fs::write(dir.join("src/lib.rs"), file(&files, "src/lib.rs")).unwrap();
    // The workspace's lock file pins the same dependency versions (no resolution needed).
    std::fs::copy(repo.join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();
    let target = plugin_dir().join("cargo");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(&dir)
        .args(["build", "--quiet", "--target-dir"])
        .arg(&target)
        .output()
        .expect("running cargo");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let so = target.join("debug/libslowest.so");
    let stack = stack_with(&so, "{}", "guide-slowest.img");
    assert_eq!(io(&stack, BlockRequestKind::Write, 4096), RequestStatus::Ok);
    assert_eq!(io(&stack, BlockRequestKind::Read, 4096), RequestStatus::Ok);
    let stats = stack.layers()[0].plugin_stats().unwrap();
    assert_eq!(stats["requests"], 2, "{stats}");
    assert!(stats["slowest_us"].as_u64().is_some(), "{stats}");
    let _ = std::fs::remove_dir_all(dir);
}

/// The guide's net plugin, built from the SDK alone: on a card's chain it drops the frames
/// the guest sends with its ethertype, passes the rest, and counts both; on a disk it is
/// refused.
#[test]
fn the_guides_net_plugin_drops_one_ethertype_and_is_refused_on_a_disk() {
    use compat::{Direction, FrameBuf, NetChain, Verdict};
    let files = guide_files();
    let dir = std::env::temp_dir().join(format!("guide-netguard-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("src")).unwrap();
    let repo = std::fs::canonicalize(common::repo()).unwrap();
    let manifest = file(&files, "Cargo.toml")
        .replace("/path/to/vmm", &repo.to_string_lossy())
        .replace("name = \"slowest\"", "name = \"ethertype-guard\"");
    std::fs::write(dir.join("Cargo.toml"), manifest).unwrap();
    std::fs::write(dir.join("src/lib.rs"), file(&files, "net-guard/src/lib.rs")).unwrap();
    std::fs::copy(repo.join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();
    let target = plugin_dir().join("cargo");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(&dir)
        .args(["build", "--quiet", "--target-dir"])
        .arg(&target)
        .output()
        .expect("running cargo");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let so = target.join("debug/libethertype_guard.so");
    let registry = PluginRegistry::new();
    let spec = InstanceSpec {
        id: "no-ipv6".into(),
        plugin: registry.load(&so, None).unwrap(),
        config_json: r#"{"ethertype": 34525}"#.into(),
        enabled: true,
    };
    let chain = NetChain::build("net0", std::slice::from_ref(&spec)).unwrap();
    let run = |ethertype: u16| {
        let mut f = FrameBuf::with_capacity(2048);
        let mut bytes = vec![0xffu8; 12];
        bytes.extend_from_slice(&ethertype.to_be_bytes());
        bytes.extend_from_slice(&[0u8; 46]);
        f.buffer_mut()[..bytes.len()].copy_from_slice(&bytes);
        f.set_len(bytes.len());
        chain.run(Direction::Transmit, &mut f, &mut Vec::new())
    };
    assert_eq!(run(0x86dd), Verdict::Taken, "IPv6 is dropped");
    assert_eq!(run(0x0800), Verdict::Pass, "IPv4 passes");
    let stats = chain.layers()[0].plugin_stats().unwrap();
    assert_eq!(stats["seen"], 2, "{stats}");
    assert_eq!(stats["dropped"], 1, "{stats}");
    // A net-only plugin on a disk: refused, saying why.
    let disk = out_file("guide-netguard.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let raw = RawFile::new(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&disk)
            .unwrap(),
        false,
        "d",
    )
    .unwrap();
    let err = BlockStack::build("d", Arc::new(raw), &[spec]).unwrap_err();
    assert!(
        err.to_string().contains("does not support block devices"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
