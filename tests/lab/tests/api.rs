//! The REST API on the host: the real server, socket and plugins (shared objects) over real
//! files, with a VM stand-in for `GET /vm` and the shutdown action (the guest itself is in
//! the lab tests, `interceptors.rs`). Every answer is checked against `docs/api.yaml`.

mod common;

use common::openapi::Spec;
use common::out_file;
use compat::{BlockRequestKind, InstanceSpec, LiveStack, PluginRegistry, Segment};
use devices::virtio::block::RawFile;
use serde_json::{json, Value};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use vmm_api::client::{request, Answer};
use vmm_api::{ApiState, Disk, VmControl, VmInfo};
use vmm_lab::control::{exchange_closing, malformed};
use vmm_lab::plugins::plugins;

/// The VM's side of the API, without a VM: what the real one reports, and a record of the
/// shutdown action.
struct StandInVm {
    stopping: AtomicBool,
}

impl VmControl for StandInVm {
    fn info(&self) -> VmInfo {
        VmInfo {
            state: if self.stopping.load(Ordering::SeqCst) {
                "ShuttingDown"
            } else {
                "Running"
            },
            vcpus: 2,
            memory_mib: 256,
            uptime: Duration::from_secs(7),
        }
    }

    fn shutdown(&self) -> Result<(), String> {
        self.stopping.store(true, Ordering::SeqCst);
        Ok(())
    }
}

struct Api {
    sock: PathBuf,
    vm: Arc<StandInVm>,
    disks: Vec<Arc<LiveStack>>,
    /// The disks' image files, in the same order.
    images: Vec<PathBuf>,
    spec: Spec,
}

fn image(name: &str) -> PathBuf {
    let path = out_file(name);
    std::fs::write(&path, vec![0u8; 8 << 20]).unwrap();
    path
}

fn stack_over(path: &Path, id: &str, chain: &[InstanceSpec]) -> Arc<LiveStack> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let raw = Arc::new(RawFile::new(file, false, id).unwrap());
    Arc::new(LiveStack::start(id, raw, chain, None).unwrap())
}

/// vda: encrypt (from "boot"); vdb: a write-back cache over nothing (images `name`-a.img
/// and `name`-b.img); served on `name`.sock.
fn start(name: &str) -> Api {
    let p = plugins().expect("building the plugins");
    let registry = Arc::new(PluginRegistry::new());
    let key = out_file(&format!("{name}.key"));
    std::fs::write(&key, "42".repeat(32)).unwrap();
    let enc = InstanceSpec {
        id: "enc".into(),
        plugin: registry.load(&p.encrypt, None).unwrap(),
        config_json: json!({ "key_file": key }).to_string(),
        enabled: true,
    };
    let cache = InstanceSpec {
        id: "cache".into(),
        plugin: registry.load(&p.cache, None).unwrap(),
        config_json: json!({ "size_mib": 1, "write_back": true }).to_string(),
        enabled: true,
    };
    let images = vec![
        image(&format!("{name}-a.img")),
        image(&format!("{name}-b.img")),
    ];
    let vda = stack_over(&images[0], "vda", &[enc]);
    let vdb = stack_over(&images[1], "vdb", &[cache]);
    let vm = Arc::new(StandInVm {
        stopping: AtomicBool::new(false),
    });
    let disks = vec![
        Disk {
            id: "vda".into(),
            read_only: false,
            stack: vda.clone(),
            queues: Arc::new(Vec::new),
        },
        Disk {
            id: "vdb".into(),
            read_only: false,
            stack: vdb.clone(),
            queues: Arc::new(Vec::new),
        },
    ];
    let sock = out_file(&format!("{name}.sock"));
    vmm_api::serve(&sock, ApiState::new(vm.clone(), disks, registry)).unwrap();
    Api {
        sock,
        vm,
        disks: vec![vda, vdb],
        images,
        spec: Spec::load(),
    }
}

impl Api {
    /// One request; the answer checked against the document for `doc_path`.
    fn call(&self, method: &str, path: &str, doc_path: &str, body: Option<Value>) -> Answer {
        let body = body.map(|b| b.to_string());
        let a = request(&self.sock, method, path, body.as_deref()).unwrap();
        self.spec.assert_answer(doc_path, method, a.status, &a.body);
        a
    }

    fn interceptor(&self, id: &str) -> Answer {
        self.call(
            "GET",
            &format!("/interceptors/{id}"),
            "/interceptors/{id}",
            None,
        )
    }
}

fn write(stack: &LiveStack, offset: u64) {
    let mut buf = vec![0x77u8; 4096];
    let seg = [Segment {
        base: buf.as_mut_ptr(),
        len: buf.len(),
    }];
    // SAFETY: the buffer lives across the call; the range is inside the disk.
    let status = unsafe { stack.submit(BlockRequestKind::Write, offset, &seg) };
    assert_eq!(status, compat::RequestStatus::Ok);
}

fn requests(a: &Answer, device: usize) -> u64 {
    a.json()["devices"][device]["counters"]["requests"]
        .as_u64()
        .unwrap()
}

#[test]
fn the_socket_is_private_and_a_stale_one_is_replaced_but_a_live_one_refused() {
    let api = start("api-socket");
    let mode = std::fs::metadata(&api.sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
    assert!(std::fs::metadata(&api.sock)
        .unwrap()
        .file_type()
        .is_socket());
    let state = || ApiState::new(api.vm.clone(), vec![], Arc::new(PluginRegistry::new()));
    let err = vmm_api::serve(&api.sock, state())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("another process is serving"), "{err}");

    let stale = out_file("api-stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap()); // nobody listens now
    vmm_api::serve(&stale, state()).unwrap();
    let a = request(&stale, "GET", "/vm", None).unwrap();
    assert_eq!(a.status, 200);

    let plain = out_file("api-plain.sock");
    std::fs::write(&plain, "not a socket").unwrap();
    let err = vmm_api::serve(&plain, state()).err().unwrap().to_string();
    assert!(err.contains("not a socket"), "{err}");
}

#[test]
fn every_documented_operation_answers_as_documented_and_every_route_is_documented() {
    let api = start("api-doc");
    let vm = api.call("GET", "/vm", "/vm", None);
    assert_eq!(vm.status, 200);
    assert_eq!(vm.json()["vcpus"], 2);
    // What the device refused (as its queue handler counts it) is shown per device.
    api.disks[0]
        .counters()
        .refused
        .fetch_add(3, Ordering::SeqCst);
    let devices = api.call("GET", "/devices", "/devices", None).json();
    assert_eq!(devices[0]["refused"], 3);
    assert_eq!(devices[1]["refused"], 0);
    assert_eq!(devices[0]["chain"][0]["id"], "enc");
    assert_eq!(devices[1]["chain"][0]["id"], "cache");
    assert_eq!(
        devices[0]["capacity_bytes"].as_u64(),
        Some(api.disks[0].capacity())
    );
    let all = api
        .call("GET", "/interceptors", "/interceptors", None)
        .json();
    assert_eq!(all.as_array().map(Vec::len), Some(2));
    let enc = api.interceptor("enc").json();
    assert_eq!(enc["plugin"], "encrypt");
    assert_eq!(
        enc["abi_version"], 2,
        "the SDK builds plugins of ABI version 2"
    );
    // Every flag the plugin declares (issue 30, item 8: only three kinds were shown, so
    // net-encrypt's net_plain_frames and encrypt's concurrent were missing).
    assert_eq!(
        enc["flags"],
        serde_json::json!(["keep_when_disabled", "owns_format", "concurrent"])
    );
    assert_eq!(enc["blake3"].as_str().map(str::len), Some(64));
    assert!(
        !api.interceptor("enc").body.contains("4242"),
        "the key leaked"
    );
    let metrics = api.call("GET", "/metrics", "/metrics", None);
    assert_eq!(metrics.status, 200);
    assert!(metrics
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/plain")));
    for line in metrics.body.lines().filter(|l| !l.starts_with('#')) {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "not a sample: {line}");
    }
    assert!(metrics
        .body
        .contains("vmm_interceptor_enabled{device=\"vda\",interceptor=\"enc\"} 1"));
    assert!(metrics
        .body
        .contains("vmm_block_refused_total{device=\"vda\"} 3"));
    // The plugin's own stats are there too, one sample per number.
    assert!(metrics.body.contains(
        "vmm_interceptor_stat{device=\"vda\",interceptor=\"enc\",stat=\"auth_failures\"} 0"
    ));

    // Every documented operation exists (its answer is documented, never 404/405 for the
    // path itself), and every other method on a documented path is 405.
    let ops = api.spec.operations();
    for path in [
        "/vm",
        "/vm/kvm",
        "/vm/vcpus",
        "/devices",
        "/interceptors",
        "/interceptors/{id}",
        "/actions",
        "/metrics",
    ] {
        for method in ["GET", "PUT", "PATCH", "DELETE", "POST"] {
            let documented = ops.iter().any(|(p, m)| p == path && m == method);
            let concrete = path.replace("{id}", "nosuch");
            let a = request(&api.sock, method, &concrete, Some("{}")).unwrap();
            if documented {
                assert_ne!(a.status, 405, "{method} {path} is documented but refused");
                api.spec.assert_answer(path, method, a.status, &a.body);
            } else {
                assert_eq!(
                    a.status, 405,
                    "{method} {path} is served but not documented"
                );
                assert!(a.header("allow").is_some());
                api.spec.assert_answer("/vm", "GET", 405, &a.body);
            }
        }
    }
    let missing = request(&api.sock, "GET", "/nothing/here", None).unwrap();
    assert_eq!(missing.status, 404);
    assert!(missing.json()["fault_message"].is_string());
}

#[test]
fn toggles_take_effect_for_the_next_request() {
    let api = start("api-toggle");
    write(&api.disks[1], 0);
    let before = requests(&api.interceptor("cache"), 0);
    let a = api.call(
        "PATCH",
        "/interceptors/cache",
        "/interceptors/{id}",
        Some(json!({"enabled": false})),
    );
    assert_eq!(a.status, 204);
    assert_eq!(api.interceptor("cache").json()["enabled"], false);
    write(&api.disks[1], 4096);
    // The cache stays in the path while disabled (it may hold dirty data), so it still
    // counts; its stats show it bypassing.
    let stats = api.interceptor("cache").json()["devices"][0]["stats"].clone();
    assert_eq!(stats["bytes_cached"], 0, "{stats}");
    api.call(
        "PATCH",
        "/interceptors/cache",
        "/interceptors/{id}",
        Some(json!({"enabled": true})),
    );
    write(&api.disks[1], 8192);
    let after = api.interceptor("cache");
    assert_eq!(after.json()["enabled"], true);
    assert!(requests(&after, 0) >= before + 2);
    let latency = &after.json()["devices"][0]["counters"]["latency_ns"];
    assert!(
        latency["p50"].as_u64().is_some_and(|ns| ns > 0),
        "{latency}"
    );
}

#[test]
fn an_instance_loads_at_run_time_and_unloads_but_a_format_owner_is_kept() {
    let api = start("api-load");
    let p = plugins().unwrap();
    let load = |id: &str, path: &Path, device: &str, extra: Value| {
        let mut body = json!({ "path": path, "device": device, "position": 0 });
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        api.call(
            "PUT",
            &format!("/interceptors/{id}"),
            "/interceptors/{id}",
            Some(body),
        )
    };
    let a = load("count", &p.counter, "vdb", json!({}));
    assert_eq!(a.status, 204, "{}", a.body);
    let chain = api.call("GET", "/devices", "/devices", None).json()[1]["chain"].clone();
    assert_eq!(chain[0]["id"], "count");
    assert_eq!(chain[1]["id"], "cache");
    write(&api.disks[1], 0);
    write(&api.disks[1], 4096);
    assert_eq!(requests(&api.interceptor("count"), 0), 2);

    let again = load("count", &p.counter, "vdb", json!({}));
    assert_eq!(again.status, 409, "{}", again.body);
    let xor = load("xor", &p.xor, "vdb", json!({}));
    assert_eq!(xor.status, 409, "{}", xor.body);
    assert!(xor.body.contains("owns the format"), "{}", xor.body);
    let bad = load("x2", Path::new("/nonexistent/lib.so"), "vdb", json!({}));
    assert_eq!(bad.status, 400, "{}", bad.body);
    let nodev = load("x3", &p.counter, "vdz", json!({}));
    assert_eq!(nodev.status, 400, "{}", nodev.body);
    let relative = load("x4", Path::new("lib.so"), "vdb", json!({}));
    assert_eq!(relative.status, 400, "{}", relative.body);

    let gone = api.call("DELETE", "/interceptors/count", "/interceptors/{id}", None);
    assert_eq!(gone.status, 204, "{}", gone.body);
    assert_eq!(api.interceptor("count").status, 404);
    let kept = api.call("DELETE", "/interceptors/enc", "/interceptors/{id}", None);
    assert_eq!(kept.status, 409, "{}", kept.body);
    assert!(kept.body.contains("garbage"), "{}", kept.body);
    assert_eq!(api.interceptor("enc").status, 200);
    // The write-back cache holds the writes above; it hands them down before it goes.
    let on_disk = || std::fs::read(&api.images[1]).unwrap()[..8192].to_vec();
    assert_eq!(on_disk(), vec![0u8; 8192], "write-back holds until a flush");
    let cache_gone = api.call("DELETE", "/interceptors/cache", "/interceptors/{id}", None);
    assert_eq!(cache_gone.status, 204, "{}", cache_gone.body);
    assert_eq!(
        on_disk(),
        vec![0x77u8; 8192],
        "removal wrote the dirty blocks back"
    );
}

/// `PATCH /interceptors/{id}` with a `config` (ABI version 2): a throttle takes new limits
/// while it runs; a bad one is refused with the plugin's reason and the old stays; a plugin
/// that cannot change its config answers 409 or 400, and an empty patch is refused.
#[test]
fn a_running_instance_takes_a_new_config_through_patch() {
    let api = start("api-reconfigure");
    let p = plugins().unwrap();
    let body = json!({
        "path": p.throttle, "device": "vdb", "position": 0,
        "config": { "iops": 100, "burst_ms": 100 }
    });
    let a = api.call(
        "PUT",
        "/interceptors/limit",
        "/interceptors/{id}",
        Some(body),
    );
    assert_eq!(a.status, 204, "{}", a.body);
    let stats = |api: &Api| api.interceptor("limit").json()["devices"][0]["stats"].clone();
    assert_eq!(stats(&api)["iops_limit"], 100);
    let patch = |body: Value| {
        api.call(
            "PATCH",
            "/interceptors/limit",
            "/interceptors/{id}",
            Some(body),
        )
    };
    let a = patch(json!({ "config": { "iops": 5000, "burst_ms": 200 } }));
    assert_eq!(a.status, 204, "{}", a.body);
    assert_eq!(stats(&api)["iops_limit"], 5000);
    assert_eq!(stats(&api)["burst_ms"], 200);
    let a = patch(json!({ "config": { "iops": 0 } }));
    assert_eq!(a.status, 400, "{}", a.body);
    assert!(a.body.contains("at least 1"), "{}", a.body);
    assert_eq!(stats(&api)["iops_limit"], 5000, "the old config stays");
    let a = patch(json!({ "config": { "iops": 10 }, "enabled": false }));
    assert_eq!(a.status, 204, "{}", a.body);
    let v = api.interceptor("limit").json();
    assert_eq!(v["enabled"], false);
    assert_eq!(v["devices"][0]["stats"]["iops_limit"], 10);
    // Encryption keeps the SDK's default: it cannot change its config while it runs.
    let a = api.call(
        "PATCH",
        "/interceptors/enc",
        "/interceptors/{id}",
        Some(json!({ "config": { "key_file": "/x" } })),
    );
    assert!(
        a.status == 400 || a.status == 403,
        "{}: {}",
        a.status,
        a.body
    );
    let a = patch(json!({}));
    assert_eq!(a.status, 400, "{}", a.body);
    // Requests still pass the throttle after all of it.
    write(&api.disks[1], 0);
}

#[test]
fn errors_are_json_faults_with_the_right_status() {
    let api = start("api-errors");
    let cases: [(&str, &str, &str, Option<&str>, u16); 9] = [
        (
            "PATCH",
            "/interceptors/enc",
            "/interceptors/{id}",
            Some("{\"enabled\": tru"),
            400,
        ),
        (
            "PATCH",
            "/interceptors/enc",
            "/interceptors/{id}",
            Some("{\"enabled\": true, \"x\": 1}"),
            400,
        ),
        (
            "PATCH",
            "/interceptors/enc",
            "/interceptors/{id}",
            Some("{\"enabled\": \"yes\"}"),
            400,
        ),
        (
            "PATCH",
            "/interceptors/enc",
            "/interceptors/{id}",
            None,
            400,
        ),
        (
            "PATCH",
            "/interceptors/nosuch",
            "/interceptors/{id}",
            Some("{\"enabled\": true}"),
            404,
        ),
        (
            "GET",
            "/interceptors/bad%20id",
            "/interceptors/{id}",
            None,
            400,
        ),
        (
            "PUT",
            "/actions",
            "/actions",
            Some("{\"action_type\": \"Reboot\"}"),
            400,
        ),
        ("PUT", "/actions", "/actions", Some("[]"), 400),
        ("POST", "/vm", "/vm", None, 405),
    ];
    for (method, path, doc, body, status) in cases {
        let a = request(&api.sock, method, path, body).unwrap();
        assert_eq!(a.status, status, "{method} {path} {body:?}: {}", a.body);
        // A 405 is documented on the operations the path does have.
        let documented = if status == 405 { "GET" } else { method };
        api.spec.assert_answer(doc, documented, status, &a.body);
    }
    let big = format!(
        "{{\"enabled\": true, \"pad\": \"{}\"}}",
        "x".repeat(100_000)
    );
    let a = request(&api.sock, "PATCH", "/interceptors/enc", Some(&big)).unwrap();
    assert_eq!(a.status, 413, "{}", a.body);
    api.spec
        .assert_answer("/interceptors/{id}", "PATCH", 413, &a.body);
    assert_eq!(
        api.interceptor("enc").json()["enabled"],
        true,
        "nothing changed"
    );
}

/// Random garbage: raw bytes, truncated requests, clients that vanish, random methods,
/// paths and bodies. The server keeps serving and no state changes.
#[test]
fn a_thousand_malformed_requests_change_nothing() {
    let api = start("api-garbage");
    let state = |api: &Api| {
        let mut d = api.call("GET", "/devices", "/devices", None).json();
        for dev in d.as_array_mut().unwrap() {
            for k in ["requests", "errors", "completed_without_driver", "refused"] {
                dev[k] = Value::Null;
            }
        }
        d
    };
    let before = state(&api);
    let mut answered = 0;
    for i in 0..1000 {
        let bytes = malformed(i);
        // A client that vanishes: connect, send, close without reading.
        if i % 10 == 0 {
            let mut s = std::os::unix::net::UnixStream::connect(&api.sock).unwrap();
            let _ = std::io::Write::write_all(&mut s, &bytes);
            continue;
        }
        let out = exchange_closing(&api.sock, &bytes).unwrap();
        if out.starts_with(b"HTTP/1.1 ") {
            answered += 1;
            let code: u16 = String::from_utf8_lossy(&out[9..12]).parse().unwrap_or(0);
            assert!(
                code != 0 && code < 500,
                "request {i} got {code}: {:?}",
                String::from_utf8_lossy(&out)
            );
        }
    }
    assert!(
        answered > 300,
        "only {answered} garbage requests got an answer"
    );
    assert_eq!(api.call("GET", "/vm", "/vm", None).status, 200);
    assert_eq!(state(&api), before, "garbage changed the chains");
    assert!(
        !api.vm.stopping.load(Ordering::SeqCst),
        "garbage shut the VM down"
    );
}

#[test]
fn the_shutdown_action_reaches_the_vm() {
    let api = start("api-shutdown");
    let a = api.call(
        "PUT",
        "/actions",
        "/actions",
        Some(json!({"action_type": "Shutdown"})),
    );
    assert_eq!(a.status, 204, "{}", a.body);
    assert!(api.vm.stopping.load(Ordering::SeqCst));
    assert_eq!(
        api.call("GET", "/vm", "/vm", None).json()["state"],
        "ShuttingDown"
    );
}

/// `vmmctl` against the live server: tables, edits, and its exit codes.
#[test]
fn vmmctl_shows_tables_edits_chains_and_reports_faults() {
    let api = start("api-vmmctl");
    let p = plugins().unwrap();
    // Built with `vmm` by the workspace build the test command runs first.
    let ctl = common::vmm_bin().with_file_name("vmmctl");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(&ctl)
            .arg("--sock")
            .arg(&api.sock)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, _) = run(&["vm"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("STATE") && out.contains("Running"), "{out}");

    let counter = p.counter.to_str().unwrap();
    let (code, _, err) = run(&["load", "count", "--path", counter, "--device", "vdb"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(&["disable", "cache"]);
    assert_eq!(code, 0, "{err}");
    write(&api.disks[1], 0);
    let (_, out, _) = run(&["devices"]);
    let vdb = out.lines().find(|l| l.starts_with("vdb")).unwrap_or("");
    assert!(vdb.ends_with("count > cache (off)"), "{out}");
    let (_, out, _) = run(&["list"]);
    let row = |id: &str| -> Vec<String> {
        out.lines()
            .find(|l| l.starts_with(id))
            .unwrap_or("")
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        row("count")[..6],
        ["count", "counter", "vdb", "0", "on", "1"],
        "{out}"
    );
    assert_eq!(
        row("cache")[..5],
        ["cache", "cache", "vdb", "1", "off"],
        "{out}"
    );
    assert_eq!(api.interceptor("cache").json()["enabled"], false);

    let (code, _, err) = run(&["unload", "enc"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("409") && err.contains("Disable it instead"),
        "{err}"
    );
    let (code, _, err) = run(&["show", "nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("404"), "{err}");
    let (code, _, err) = run(&[
        "load", "x", "--path", counter, "--device", "vdb", "--config", "{",
    ]);
    assert_eq!(code, 2, "{err}");
    let (code, _, _) = run(&["unload", "count"]);
    assert_eq!(code, 0);
    assert_eq!(api.interceptor("count").status, 404);

    let elsewhere = std::process::Command::new(&ctl)
        .args(["--sock", "/nonexistent/vmm.sock", "vm"])
        .output()
        .unwrap();
    assert_eq!(elsewhere.status.code(), Some(2));
    let (code, out, _) = run(&["shutdown"]);
    assert_eq!((code, out.as_str()), (0, "ok\n"));
    assert!(api.vm.stopping.load(Ordering::SeqCst));
}

/// The `vmm` binary refuses a socket path another process serves on, or one that is not a
/// socket, before it starts the VM: exit 2, one line naming the path.
#[test]
fn vmm_refuses_a_live_or_foreign_api_socket_with_one_line_and_exit_2() {
    // Only its header is read before the socket is: a bzImage's magic is enough.
    let kernel = out_file("api-sock-kernel");
    let mut header = vec![0u8; 4096];
    header[0x202..0x206].copy_from_slice(b"HdrS");
    std::fs::write(&kernel, header).unwrap();
    let disk = out_file("api-sock-disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let config = out_file("api-sock.toml");
    std::fs::write(
        &config,
        format!(
            "[machine]\nmemory_mib = 128\n[kernel]\npath = {kernel:?}\n\
             [[block]]\nid = \"data\"\npath = {disk:?}\n"
        ),
    )
    .unwrap();
    let live = out_file("api-sock-live.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
    let foreign = out_file("api-sock-file");
    std::fs::write(&foreign, b"keep me").unwrap();
    for (sock, why) in [
        (&live, "another process is serving on it"),
        (&foreign, "is not a socket"),
    ] {
        let out = std::process::Command::new(common::vmm_bin())
            .arg("--config")
            .arg(&config)
            .arg("--api-sock")
            .arg(sock)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains(why) && err.contains(&*sock.to_string_lossy()),
            "{err}"
        );
    }
    assert_eq!(std::fs::read(&foreign).unwrap(), b"keep me");
}
