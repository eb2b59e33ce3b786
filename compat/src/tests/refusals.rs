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

/// The check hook's report reaches the host whole; a long list is cut at the SDK's bound
/// with a count; a plugin without the hook (or a table that predates it) has none.
#[test]
fn a_check_report_reaches_the_host_and_old_tables_have_none() {
    let disk = MemDisk::new(1 << 20);
    let check = |problems: u64| {
        let chain = [spec(
            "c",
            static_table!(SelfChecking),
            serde_json::json!({ "problems": problems }),
        )];
        let stack = BlockStack::build("vda", disk.clone(), &chain).unwrap();
        let outcome = stack.layers()[0].check().unwrap().unwrap();
        outcome
    };
    let clean = check(0);
    assert!(clean.problems.is_empty());
    assert_eq!(clean.details["blocks_checked"], 8);
    assert_eq!(check(2).problems, ["block 0 is bad", "block 1 is bad"]);
    let many = check(250);
    assert_eq!(many.problems.len(), 101);
    assert_eq!(many.problems[100], "... and 150 more");

    // A plugin that keeps nothing on the disk: the SDK answers "not checked".
    let stack = BlockStack::build("vda", disk.clone(), &[recorder("r", "x", "", "")]).unwrap();
    assert_eq!(stack.layers()[0].check().unwrap(), None);

    // A table of the first size: the host never reads past it, so its check is not seen.
    static mut OLD: abi::InterceptorTable = interceptor_sdk::table::<SelfChecking>();
    // SAFETY: written once here, before any reader.
    let old = unsafe {
        let t = &mut *std::ptr::addr_of_mut!(OLD);
        t.table_size = abi::TABLE_V1_SIZE as u32;
        &*t
    };
    let plugin = Plugin::from_static("old", old).unwrap();
    let chain = [InstanceSpec {
        id: "o".into(),
        plugin,
        config_json: "{}".into(),
        enabled: true,
    }];
    let stack = BlockStack::build("vda", disk.clone(), &chain).unwrap();
    assert_eq!(stack.layers()[0].check().unwrap(), None);

    // A size smaller than the first table is refused.
    static mut TINY: abi::InterceptorTable = interceptor_sdk::table::<SelfChecking>();
    // SAFETY: as above.
    let tiny = unsafe {
        let t = &mut *std::ptr::addr_of_mut!(TINY);
        t.table_size = 8;
        &*t
    };
    let e = Plugin::from_static("tiny", tiny).unwrap_err().to_string();
    assert!(e.contains("table_size 8 is smaller"), "{e}");
}
