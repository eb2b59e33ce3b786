//! A client of the vmm's REST API that runs beside the guest (`lab guest --control ...`):
//! the scenarios the API's lab tests need, each reporting what it saw as JSON in the run's
//! report (`control`). Steps run in order, separated by `;`:
//!
//! - `garbage:N` sends N malformed requests (random bytes, cut or mis-framed HTTP, bad JSON,
//!   unknown fields, wrong methods, clients that vanish) and checks that the chains and
//!   their enabled flags are unchanged and the server still answers.
//! - `toggle:ID,ID[:SECS]` sets each instance enabled or disabled at random every 100 ms for
//!   SECS seconds (20), then enables them all; every answer must be 204.
//! - `load:ID:PATH` loads the plugin at PATH as instance ID at the bottom of `data0`'s chain
//!   (declared fresh: the guest's data there is scratch), then reads its counters twice.
//! - `sigterm` sends SIGTERM to the vmm serving the socket (its pid from the socket's peer
//!   credentials) and reports the data disk's request count just before.
//! - `enable:ID:SECS` waits until the API answers, then SECS seconds, then enables instance
//!   ID (a network card's, say) and reports the devices as they are then.
//!
//! Every step starts once the guest has sent `data0` 200 requests (its task is running),
//! except in a run of `enable` steps only, which starts as soon as the API answers.

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use vmm_api::client::request;

const DEVICE: &str = "data0";

/// Runs `steps` against the API at `sock`; returns the report and the problems found.
/// `vmm_gone` is set once the VMM has exited: waiting for the guest's I/O then stops.
pub fn run(steps: &str, sock: &Path, vmm_gone: &AtomicBool) -> (Value, Vec<String>) {
    let mut report = Vec::new();
    let mut problems = Vec::new();
    let io_free = steps
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .all(|s| s.starts_with("enable:"));
    let ready = if io_free {
        wait_for_api(sock, vmm_gone)
    } else {
        wait_for_guest_io(sock, vmm_gone)
    };
    if let Err(e) = ready {
        problems.push(format!("control: {e}"));
        return (Value::Array(report), problems);
    }
    for step in steps.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        let started = Instant::now();
        let outcome = match step.split_once(':') {
            Some(("garbage", n)) => garbage(sock, n.parse().unwrap_or(1000)),
            Some(("toggle", rest)) => {
                let (ids, secs) = rest.split_once(':').unwrap_or((rest, "20"));
                toggle(sock, ids, secs.parse().unwrap_or(20))
            }
            _ if step == "sigterm" => sigterm(sock),
            Some(("enable", rest)) => {
                let (id, secs) = rest.split_once(':').unwrap_or((rest, "0"));
                std::thread::sleep(Duration::from_secs(secs.parse().unwrap_or(0)));
                patch(sock, id, true).and_then(|()| get(sock, "/devices"))
            }
            Some(("load", rest)) => match rest.split_once(':') {
                Some((id, path)) => load(sock, id, Path::new(path)),
                None => Err(format!("load needs ID:PATH, got {rest}")),
            },
            _ => Err(format!("unknown control step `{step}`")),
        };
        let mut entry = json!({ "step": step, "seconds": started.elapsed().as_secs_f64() });
        match outcome {
            Ok(v) => entry["result"] = v,
            Err(e) => {
                problems.push(format!("control step `{step}`: {e}"));
                entry["error"] = json!(e);
            }
        }
        report.push(entry);
    }
    (Value::Array(report), problems)
}

/// `GET path` on vmm's API: the JSON answer, or what went wrong.
pub fn get(sock: &Path, path: &str) -> Result<Value, String> {
    let a = request(sock, "GET", path, None).map_err(|e| format!("GET {path}: {e}"))?;
    if a.status != 200 {
        return Err(format!("GET {path}: {} {}", a.status, a.body));
    }
    Ok(a.json())
}

/// Every device as `GET /devices` shows it (a hung guest's diagnosis reads its queues).
pub fn devices(sock: &Path) -> Result<Value, String> {
    get(sock, "/devices")
}

fn device(sock: &Path) -> Result<Value, String> {
    let all = get(sock, "/devices")?;
    all.as_array()
        .and_then(|d| d.iter().find(|d| d["id"] == DEVICE))
        .cloned()
        .ok_or_else(|| format!("no device {DEVICE} in {all}"))
}

fn wait_for_api(sock: &Path, vmm_gone: &AtomicBool) -> Result<(), String> {
    let start = Instant::now();
    while get(sock, "/vm").is_err() {
        if vmm_gone.load(Ordering::SeqCst) {
            return Err("the vmm exited before its API answered".into());
        }
        if start.elapsed() > Duration::from_secs(120) {
            return Err("the API did not answer within 120 s".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn wait_for_guest_io(sock: &Path, vmm_gone: &AtomicBool) -> Result<(), String> {
    let start = Instant::now();
    let limit = Duration::from_secs(240);
    loop {
        if let Ok(d) = device(sock) {
            if d["requests"].as_u64().unwrap_or(0) >= 200 {
                return Ok(());
            }
        }
        if vmm_gone.load(Ordering::SeqCst) {
            return Err(format!(
                "the vmm exited before the guest sent {DEVICE} 200 requests"
            ));
        }
        if start.elapsed() > limit {
            return Err(format!(
                "the guest sent {DEVICE} no I/O within {} s",
                limit.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Chains and enabled flags: what malformed requests must not change.
fn chains(sock: &Path) -> Result<Value, String> {
    let devices = get(sock, "/devices")?;
    Ok(Value::Array(
        devices
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| json!({ "id": d["id"], "chain": d["chain"] }))
            .collect(),
    ))
}

/// A deterministic pseudo-random step (xorshift64): runs repeat exactly.
fn xorshift(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// One malformed request from `n` (deterministic): never a well-formed state change.
pub fn malformed(n: u64) -> Vec<u8> {
    let mut seed = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || xorshift(&mut seed);
    let pick = |v: u64, len: usize| (v % len as u64) as usize;
    let methods = ["GET", "PUT", "PATCH", "POST", "BREW", "get", ""];
    let paths = [
        "/vm",
        "/devices",
        "/interceptors",
        "/interceptors/enc",
        "/interceptors/cache",
        "/actions",
        "/metrics",
        "/interceptors/",
        "//",
        "/interceptors/enc/x",
        "*",
        "/%ff",
    ];
    let bodies = [
        "",
        "{",
        "}",
        "null",
        "[]",
        "{\"enabled\":1}",
        "{\"enabled\":null}",
        "{\"enabled\":true,\"extra\":0}",
        "{\"action_type\":\"Shutdown\",\"x\":1}",
        "{\"action_type\":7}",
        "\u{0}\u{1}",
        "{\"path\":\"/x\",\"device\":\"data0\",\"position\":-1}",
        "{\"path\":\"/x\",\"device\":\"data0\",\"position\":99999999999999999999}",
    ];
    match next() % 4 {
        0 => (0..next() % 300).map(|_| next() as u8).collect(),
        kind @ (1 | 2) => {
            let body = bodies[pick(next(), bodies.len())];
            let len = body.len() + if kind == 2 { pick(next(), 50) } else { 0 };
            let mut r = format!(
                "{} {} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {len}\r\n\r\n{body}",
                methods[pick(next(), methods.len())],
                paths[pick(next(), paths.len())],
            )
            .into_bytes();
            if kind == 2 {
                let cut = pick(next(), r.len() + 1);
                r.truncate(cut);
            }
            r
        }
        _ => format!(
            "GET /vm HTTP/1.1\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            next() % 10
        )
        .into_bytes(),
    }
}

fn garbage(sock: &Path, n: u64) -> Result<Value, String> {
    let before = chains(sock)?;
    let (mut answered, mut server_errors) = (0u64, Vec::new());
    for i in 0..n {
        let bytes = malformed(i);
        if i % 10 == 0 {
            // A client that vanishes half-way.
            if let Ok(mut s) = std::os::unix::net::UnixStream::connect(sock) {
                let _ = std::io::Write::write_all(&mut s, &bytes[..bytes.len() / 2]);
            }
            continue;
        }
        let out = exchange_closing(sock, &bytes).map_err(|e| format!("request {i}: {e}"))?;
        if out.starts_with(b"HTTP/1.1 ") && out.len() >= 12 {
            answered += 1;
            let code: u16 = String::from_utf8_lossy(&out[9..12]).parse().unwrap_or(0);
            if code >= 500 || code == 0 {
                server_errors.push(format!("request {i}: {code}"));
            }
        }
    }
    let after = chains(sock)?;
    let vm = get(sock, "/vm")?;
    if before != after {
        return Err(format!("the chains changed: {before} -> {after}"));
    }
    if !server_errors.is_empty() {
        return Err(format!("server errors: {server_errors:?}"));
    }
    if vm["state"] != "Running" {
        return Err(format!("the VM is {}", vm["state"]));
    }
    Ok(json!({ "sent": n, "answered": answered, "unchanged": true, "state": vm["state"] }))
}

/// Sends `bytes`, shuts the write side (a cut request must not wait for more) and reads the
/// answer, if any, for up to 10 s.
pub fn exchange_closing(sock: &Path, bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = std::os::unix::net::UnixStream::connect(sock)?;
    let _ = std::io::Write::write_all(&mut s, bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut out = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut out);
    Ok(out)
}

fn patch(sock: &Path, id: &str, on: bool) -> Result<(), String> {
    let body = json!({ "enabled": on }).to_string();
    let a = request(sock, "PATCH", &format!("/interceptors/{id}"), Some(&body))
        .map_err(|e| format!("PATCH {id}: {e}"))?;
    if a.status == 204 {
        Ok(())
    } else {
        Err(format!("PATCH {id} enabled={on}: {} {}", a.status, a.body))
    }
}

fn toggle(sock: &Path, ids: &str, secs: u64) -> Result<Value, String> {
    let ids: Vec<&str> = ids.split(',').collect();
    let before = device(sock)?;
    let start = Instant::now();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let (mut toggles, mut flips) = (0u64, 0u64);
    let mut state: Vec<bool> = vec![true; ids.len()];
    while start.elapsed() < Duration::from_secs(secs) {
        let tick = Instant::now();
        for (k, id) in ids.iter().enumerate() {
            let on = xorshift(&mut seed) & 1 == 1;
            patch(sock, id, on)?;
            toggles += 1;
            flips += u64::from(on != state[k]);
            state[k] = on;
        }
        std::thread::sleep(Duration::from_millis(100).saturating_sub(tick.elapsed()));
    }
    for id in &ids {
        patch(sock, id, true)?;
    }
    let after = device(sock)?;
    let served = after["requests"]
        .as_u64()
        .unwrap_or(0)
        .saturating_sub(before["requests"].as_u64().unwrap_or(0));
    Ok(json!({
        "patches": toggles,
        "flips": flips,
        "guest_requests_meanwhile": served,
        "device_errors": after["errors"],
    }))
}

fn load(sock: &Path, id: &str, path: &Path) -> Result<Value, String> {
    let position = device(sock)?["chain"].as_array().map_or(0, Vec::len);
    let body = json!({ "path": path, "device": DEVICE, "position": position, "fresh": true });
    let a = request(
        sock,
        "PUT",
        &format!("/interceptors/{id}"),
        Some(&body.to_string()),
    )
    .map_err(|e| format!("PUT {id}: {e}"))?;
    if a.status != 204 {
        return Err(format!("PUT {id}: {} {}", a.status, a.body));
    }
    let count = || -> Result<u64, String> {
        let v = get(sock, &format!("/interceptors/{id}"))?;
        Ok(v["devices"][0]["counters"]["requests"]
            .as_u64()
            .unwrap_or(0))
    };
    std::thread::sleep(Duration::from_secs(1));
    let first = count()?;
    std::thread::sleep(Duration::from_secs(2));
    let second = count()?;
    Ok(json!({ "position": position, "requests": [first, second] }))
}

/// SIGTERM to the process serving `sock`.
fn sigterm(sock: &Path) -> Result<Value, String> {
    use std::os::fd::AsRawFd;
    let requests = device(sock)?["requests"].as_u64().unwrap_or(0);
    let conn = std::os::unix::net::UnixStream::connect(sock)
        .map_err(|e| format!("connecting to {}: {e}", sock.display()))?;
    // SAFETY: getsockopt into a local ucred of the size passed.
    let pid = unsafe {
        let mut cred: libc::ucred = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        let rc = libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        );
        if rc != 0 {
            return Err(format!("SO_PEERCRED: {}", std::io::Error::last_os_error()));
        }
        cred.pid
    };
    drop(conn);
    // SAFETY: a plain kill(2) to the vmm's pid.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        return Err(format!("kill {pid}: {}", std::io::Error::last_os_error()));
    }
    Ok(json!({ "pid": pid, "requests_before": requests }))
}

/// Where the vmm's API socket goes for a run.
pub fn socket_path() -> PathBuf {
    std::env::temp_dir().join(format!("vmm-lab-{}.sock", std::process::id()))
}
