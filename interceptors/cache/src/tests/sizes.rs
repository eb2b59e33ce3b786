//! The cache's size is bounded before anything is allocated, and the refusal names the
//! field: through the pure check, and through the shim as the vmm and the API create it.

use super::*;

#[test]
fn sizes_are_bounded_by_the_hard_maximum_and_the_hosts_memory() {
    assert_eq!(size_blocks(1, Some(64)).unwrap().get(), 256);
    assert_eq!(size_blocks(64, None).unwrap().get(), 64 * 256);
    assert_eq!(
        size_blocks(0, Some(1024)).unwrap_err(),
        "size_mib = 0: must be at least 1"
    );
    let e = size_blocks(MAX_SIZE_MIB + 1, None).unwrap_err();
    assert!(
        e.starts_with("size_mib = 1048577: more than the largest cache allowed"),
        "{e}"
    );
    let e = size_blocks(u64::MAX, Some(1 << 40)).unwrap_err();
    assert!(e.contains("host's available memory"), "{e}");
    let e = size_blocks(u64::MAX, None).unwrap_err();
    assert!(e.contains("largest cache allowed"), "{e}");
    // With its index a cache takes a little more than its data: 1024 MiB of data does not
    // fit in 1024 MiB.
    let e = size_blocks(1024, Some(1024)).unwrap_err();
    assert!(
        e.starts_with("size_mib = 1024: more than the host's available memory (1024 MiB"),
        "{e}"
    );
    assert!(size_blocks(1024, Some(1100)).is_ok());
    assert!(size_blocks(MAX_SIZE_MIB, None).is_ok());
}

struct Zeros;

impl BlockBackend for Zeros {
    fn capacity(&self) -> u64 {
        1 << 20
    }

    unsafe fn execute(&self, _: &IoRequest<'_>) -> RequestStatus {
        RequestStatus::Ok
    }
}

fn create(config: serde_json::Value) -> Result<Arc<BlockStack>, String> {
    let spec = InstanceSpec {
        id: "cache".into(),
        plugin: Plugin::from_static("cache", static_table!(Cache)).map_err(|e| e.to_string())?,
        config_json: config.to_string(),
        enabled: true,
    };
    BlockStack::build("d", Arc::new(Zeros), &[spec]).map_err(|e| e.to_string())
}

/// A huge size used to abort the whole process with an allocation failure (the map for
/// every block was taken up front); it is refused naming the field, and so is one just
/// over the host's available memory.
#[test]
fn a_size_over_the_hosts_memory_is_refused_not_allocated() {
    let e = create(serde_json::json!({ "size_mib": 99_999_999_u64 })).unwrap_err();
    assert!(e.contains("size_mib = 99999999: more than"), "{e}");
    let available = interceptor_sdk::host_available_mib().expect("MemAvailable in /proc/meminfo");
    if available < MAX_SIZE_MIB {
        let over = available + 1;
        let e = create(serde_json::json!({ "size_mib": over })).unwrap_err();
        assert!(
            e.contains(&format!(
                "size_mib = {over}: more than the host's available memory"
            )),
            "{e}"
        );
    }
    let e = create(serde_json::json!({ "size_mib": 0 })).unwrap_err();
    assert!(e.contains("size_mib = 0: must be at least 1"), "{e}");
    create(serde_json::json!({ "size_mib": 1 })).unwrap();
}
