//! The REST API with the real guest (vmm under real KVM, in the lab on this machine kind):
//! a client beside the guest (`lab guest --control`) sends garbage, toggles encryption and
//! the cache under fio verify, and loads a plugin into the running chain.

mod common;

use common::{contains, out_file, output};
use vmm_lab::plugins::plugins;

/// Runs the guest with `args` and `control` steps; checks that the run and every control
/// step passed; returns the report and output.
fn controlled(name: &str, args: &[&str], control: &str) -> Option<(serde_json::Value, String)> {
    let disk = out_file(&format!("{name}.img"));
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let disk_arg = disk.to_string_lossy().into_owned();
    let mut all = vec![
        "--backend",
        "vmm",
        "--data-disk",
        &disk_arg,
        "--control",
        control,
    ];
    all.extend_from_slice(args);
    let (out, r) = common::guest_run(name, &all)?;
    let text = output(&out);
    assert!(out.status.success(), "{text}");
    assert_eq!(r["problems"].as_array().map(Vec::len), Some(0), "{r}");
    Some((r, text))
}

/// While fio verify runs three times through cache (write-back) over encryption: 1,000
/// malformed requests change nothing, then both are toggled at random every 100 ms for 20 s.
/// Every verify passes and no request fails.
#[test]
fn toggles_under_fio_verify_and_garbage_change_nothing_the_guest_sees() {
    let p = plugins().expect("building the plugins");
    let key = out_file("control-toggle.key");
    std::fs::write(&key, "5a".repeat(32)).unwrap();
    let chain = format!(
        "[[interceptor]]\nid = \"cache\"\npath = {:?}\nconfig = {{ size_mib = 8, write_back = true }}\n\n\
         [[interceptor]]\nid = \"enc\"\npath = {:?}\nconfig = {{ key_file = {:?} }}\n",
        p.cache, p.encrypt, key
    );
    let toml = out_file("control-toggle.toml");
    std::fs::write(&toml, chain).unwrap();
    let toml_arg = toml.to_string_lossy().into_owned();
    let Some((r, text)) = controlled(
        "control-toggle",
        &[
            "--interceptors",
            &toml_arg,
            "--task",
            "fio=verify-crc32c,verify-crc32c,verify-crc32c",
            // Three verify runs through the debug build's cache and encryption, beside 20 s
            // of toggles, take 250-300 s on a 2-core CI machine: more than the default.
            "--timeout",
            "600",
        ],
        "garbage:1000; toggle:cache,enc:20",
    ) else {
        return;
    };
    let verified = r["fio"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["job"] == "verify-crc32c" && x["iops"].as_f64().unwrap_or(0.0) > 0.0)
        .count();
    assert_eq!(verified, 6, "three verify runs, both directions: {r}");
    let garbage = &r["control"][0]["result"];
    assert_eq!(garbage["sent"], 1000, "{r}");
    assert_eq!(garbage["unchanged"], true, "{r}");
    assert!(garbage["answered"].as_u64().unwrap_or(0) > 300, "{r}");
    let toggles = &r["control"][1]["result"];
    // 2 instances every 100 ms for 20 s, less what the emulated lab's round trips cost.
    assert!(toggles["patches"].as_u64().unwrap_or(0) >= 100, "{r}");
    assert!(toggles["flips"].as_u64().unwrap_or(0) >= 50, "{r}");
    assert!(
        toggles["guest_requests_meanwhile"].as_u64().unwrap_or(0) > 500,
        "{r}"
    );
    assert_eq!(toggles["device_errors"], 0, "{r}");
    // Toggled off, encryption stored some writes in the clear; on, the rest encrypted.
    assert!(text.contains("\"blocks_clear\":"), "{text}");
    assert!(
        text.contains("interceptor enc on data0:") && text.contains("errors=0"),
        "{text}"
    );
}

/// A plugin loaded while fio writes (the C XOR plugin, at the bottom of the chain, declared
/// fresh: fio's data is scratch) counts the requests after it, and what the guest writes
/// next reaches the host image transformed.
#[test]
fn a_plugin_loaded_at_run_time_counts_and_transforms_what_follows() {
    let p = plugins().expect("building the plugins");
    let load = format!("load:xor:{}", p.xor.display());
    let Some((r, text)) = controlled(
        "control-load",
        &[
            "--task",
            "fio=randwrite-4k-qd32 hostcheck hostcheck.base=8192",
            "--fio-runtime",
            "8",
        ],
        &load,
    ) else {
        return;
    };
    let seen = &r["control"][0]["result"]["requests"];
    let (first, second) = (seen[0].as_u64().unwrap_or(0), seen[1].as_u64().unwrap_or(0));
    assert!(first > 0 && second > first, "counters must rise: {r}");
    assert!(
        text.contains("vmm: interceptor xor on data0: requests="),
        "{text}"
    );
    // hostcheck wrote "guest-wrote-this" lines at 4 KiB block 8192 + 1000, after the load.
    let image = std::fs::read(out_file_kept("control-load.img")).unwrap();
    let at = (8192 + 1000) * 4096;
    let block = &image[at..at + 4096];
    let plain = b"guest-wrote-this\n";
    let xored: Vec<u8> = plain.iter().map(|b| b ^ 0x5a).collect();
    assert!(
        !contains(block, plain),
        "the guest's bytes reached the image untransformed"
    );
    assert!(
        contains(block, &xored),
        "the image does not hold the XORed bytes"
    );
}

/// `out_file` without the removal: the path of a file a run left.
fn out_file_kept(name: &str) -> std::path::PathBuf {
    common::repo().join("build/test-out").join(name)
}
