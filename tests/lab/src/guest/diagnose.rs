//! What a VMM that ran past its limit was doing, read before it is killed: its threads, its
//! devices' queues from vmm's API, and reaping it without waiting forever.

use super::*;

/// How long a killed VMM may take to exit before the harness goes on without it.
pub(super) const REAP_LIMIT: Duration = Duration::from_secs(30);

/// Waits for a killed VMM; `None` if it is still there after [`REAP_LIMIT`] (stuck in the
/// kernel: the run is reported, not waited on forever).
pub(super) fn reap_killed(
    child: &mut std::process::Child,
) -> Result<Option<std::process::ExitStatus>> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().context("waiting for the VMM")? {
            return Ok(Some(status));
        }
        if start.elapsed() > REAP_LIMIT {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What a VMM that ran past its limit was doing: its threads, and (vmm, with its API at
/// `sock`) its disks' queues. Read on a thread of its own and given at most 20 s, so that a
/// process that does not answer cannot hold up the kill.
pub(super) fn diagnose(pid: u32, sock: Option<PathBuf>) -> (String, Option<String>) {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let threads = crate::threads::snapshot(pid);
        let _ = tx.send((threads, None));
        if let Some(sock) = sock {
            let _ = tx.send((String::new(), Some(queue_figures(&sock))));
        }
    });
    let limit = Instant::now() + Duration::from_secs(20);
    let mut threads = "(reading /proc took over 20 s)".to_string();
    let mut queues = None;
    while let Some(left) = limit.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok((t, None)) => threads = t,
            Ok((_, Some(q))) => {
                queues = Some(q);
                break;
            }
            Err(_) => break,
        }
    }
    (threads, queues)
}

/// Each disk's device counters and queues, one line per queue, and each card's counters,
/// from vmm's API.
pub(super) fn queue_figures(sock: &Path) -> String {
    let devices = match crate::control::devices(sock) {
        Ok(d) => d,
        Err(e) => return format!("(the API did not answer: {e})"),
    };
    let mut out = String::new();
    for d in devices.as_array().into_iter().flatten() {
        if d["kind"] == "net" {
            let counters: Vec<String> = d
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, v)| v.is_u64() && k.as_str() != "id")
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let id = d["id"].as_str().unwrap_or("?");
            out.push_str(&format!("{id} (net): {}\n", counters.join(" ")));
            continue;
        }
        out.push_str(&format!(
            "{}: requests={} errors={} refused={}\n",
            d["id"].as_str().unwrap_or("?"),
            d["requests"],
            d["errors"],
            d["refused"]
        ));
        for (i, q) in d["queues"].as_array().into_iter().flatten().enumerate() {
            let fields: Vec<String> = q
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            out.push_str(&format!("  queue {i}: {}\n", fields.join(" ")));
        }
    }
    out
}
