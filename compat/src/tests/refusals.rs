//! What the stack refuses to build, and why.

use super::plugins::*;
use super::*;
use interceptor_sdk::static_table;

#[test]
fn refusals_name_the_reason() {
    let disk = MemDisk::new(1 << 20);
    let err = |chain: &[InstanceSpec]| {
        BlockStack::build("vda", disk.clone(), chain)
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        err(&[recorder("r", "x", "refuse", "")]),
        "plugin `recorder` refused its config: recorder: refused on purpose"
    );
    assert!(
        err(&[recorder("r", "x", "panic-create", "")]).contains("create panicked: boom in create")
    );
    assert!(err(&[spec(
        "x",
        static_table!(Recorder),
        serde_json::json!({"name": 3})
    )])
    .contains("refused its config: config:"));
    assert_eq!(
        err(&[spec("n", static_table!(NetOnly), serde_json::json!({}))]),
        "plugin `net-only` does not support block devices"
    );
    assert!(
        err(&[spec("s", static_table!(BadShrink), serde_json::json!({}))])
            .contains("only a plugin that stays in the path")
    );
    // A plugin that owns its format but would be skipped while disabled: the guest would
    // read its bytes raw. Refused when the table is checked, before any instance exists.
    let e = Plugin::from_static("skips", static_table!(OwnsButSkips)).unwrap_err();
    assert!(e.to_string().contains("OWNS_FORMAT needs"), "{e}");
    let long: Vec<_> = (0..=MAX_CHAIN)
        .map(|i| recorder("r", &format!("l{i}"), "", ""))
        .collect();
    assert_eq!(
        err(&long),
        "chain of device `vda` is longer than 16 interceptors"
    );
}

/// The loader reads only regular files: a FIFO would block its open, a device like
/// /dev/zero its hash, forever (the REST API loads whatever path a client names).
#[test]
fn the_loader_refuses_what_is_not_a_regular_file_without_blocking() {
    let dir = std::env::temp_dir().join(format!("compat-loader-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("plugin.so");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string; mkfifo only creates a file.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let registry = PluginRegistry::new();
    for path in [
        fifo.as_path(),
        std::path::Path::new("/dev/zero"),
        dir.as_path(),
    ] {
        let err = registry.load(path, None).unwrap_err().to_string();
        assert!(
            err.contains("not a regular file"),
            "{}: {err}",
            path.display()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
