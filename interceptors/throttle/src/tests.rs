//! The throttle through the shim, driven as a queue drives it (an executor, its timers,
//! the backend as the engine): requests over the limit wait, none is lost, a group shares
//! its buckets, a drain lets everything go, and bad configs are refused.

use super::*;
use compat::{
    BlockBackend, BlockRequestKind, BlockStack, Exec, InstanceSpec, IoRequest, Owner, Plugin,
    RequestStatus, Segment, Started,
};

struct Ram(Mutex<Vec<u8>>);

impl BlockBackend for Ram {
    fn capacity(&self) -> u64 {
        lock(&self.0).len() as u64
    }
    unsafe fn execute(&self, req: &IoRequest<'_>) -> RequestStatus {
        let mut d = lock(&self.0);
        let mut at = req.offset as usize;
        for s in req.segments {
            match req.kind {
                BlockRequestKind::Read => {
                    std::ptr::copy_nonoverlapping(d[at..].as_ptr(), s.base, s.len)
                }
                BlockRequestKind::Write => {
                    std::ptr::copy_nonoverlapping(s.base, d[at..].as_mut_ptr(), s.len)
                }
                _ => {}
            }
            at += s.len;
        }
        RequestStatus::Ok
    }
}

/// A disk in memory under one throttle instance.
struct Disk {
    stack: Arc<BlockStack>,
    ram: Arc<dyn BlockBackend>,
}

fn disk(config: serde_json::Value) -> Result<Disk, String> {
    let spec = InstanceSpec {
        id: "limit".into(),
        plugin: Plugin::from_static("throttle", interceptor_sdk::static_table!(Instance)).unwrap(),
        config_json: config.to_string(),
        enabled: true,
    };
    let ram: Arc<dyn BlockBackend> = Arc::new(Ram(Mutex::new(vec![0; 1 << 20])));
    let stack = BlockStack::build("d", ram.clone(), &[spec]).map_err(|e| e.to_string())?;
    Ok(Disk { stack, ram })
}

/// Starts `n` 4 KiB writes (each its own block, filled with its number) on `stack` and
/// drives them to their end; returns how long that took and each one's status.
fn write_all(d: &Disk, exec: &Exec, n: usize) -> (Duration, Vec<RequestStatus>) {
    let stack = &d.stack;
    let mut bufs: Vec<Vec<u8>> = (0..n).map(|i| vec![i as u8; 4096]).collect();
    let mut done: Vec<Option<RequestStatus>> = vec![None; n];
    let _on = exec.enter();
    let t = Instant::now();
    let mut at_backend = Vec::new();
    for (i, b) in bufs.iter_mut().enumerate() {
        let seg = vec![Segment {
            base: b.as_mut_ptr(),
            len: 4096,
        }];
        // SAFETY: `bufs` outlives every request (driven to the end below).
        match unsafe { stack.begin(BlockRequestKind::Write, (i * 4096) as u64, 4096, seg) } {
            Started::Done(s) => done[i] = Some(s),
            Started::Backend(f) => at_backend.push((i, f)),
            Started::Parked(p) => exec.park(p, Owner::Guest(i as u64)),
        }
    }
    let deadline = t + Duration::from_secs(20);
    loop {
        for (i, f) in at_backend.drain(..) {
            // SAFETY: as above.
            let s = unsafe { d.ram.execute(&f.io()) };
            done[i] = Some(f.finish(s));
        }
        exec.run();
        while let Some((i, s)) = exec.take_moved() {
            match s {
                Started::Done(s) => done[i as usize] = Some(s),
                Started::Backend(f) => at_backend.push((i as usize, f)),
                Started::Parked(p) => exec.park(p, Owner::Guest(i)),
            }
        }
        if at_backend.is_empty() && done.iter().all(Option::is_some) {
            break;
        }
        assert!(Instant::now() < deadline, "requests never ended");
        let now = Instant::now();
        match exec.next_timer() {
            Some(at) if at <= now => exec.fire_due(now),
            Some(at) => std::thread::sleep(at - now),
            None if at_backend.is_empty() => panic!("requests wait with no timer armed"),
            None => {}
        }
    }
    (t.elapsed(), done.into_iter().map(Option::unwrap).collect())
}

fn stat(d: &Disk, name: &str) -> u64 {
    d.stack.layers()[0].plugin_stats().unwrap()[name]
        .as_u64()
        .unwrap()
}

#[test]
fn requests_over_the_iops_limit_wait_and_none_is_lost() {
    // 200 a second with a burst of 10 (50 ms): 50 writes take at least (50 - 10) / 200 s.
    let d = disk(serde_json::json!({ "iops": 200, "burst_ms": 50 })).unwrap();
    let exec = Exec::new();
    let (took, statuses) = write_all(&d, &exec, 50);
    assert!(statuses.iter().all(|s| *s == RequestStatus::Ok));
    assert!(
        took >= Duration::from_millis(195),
        "50 writes at 200/s took {took:?}"
    );
    assert_eq!(stat(&d, "passed"), 50);
    assert!(stat(&d, "held") >= 39, "held {}", stat(&d, "held"));
    assert_eq!(stat(&d, "held_now"), 0);
    assert!(exec.idle());
}

#[test]
fn a_group_shares_its_buckets_across_disks() {
    let cfg = serde_json::json!({ "iops": 100, "burst_ms": 100, "group": "tenant-test" });
    let (a, b) = (disk(cfg.clone()).unwrap(), disk(cfg).unwrap());
    let exec = Exec::new();
    // Disk a takes the group's burst (10) and more; disk b then waits too.
    let (_, sa) = write_all(&a, &exec, 15);
    let (took_b, sb) = write_all(&b, &exec, 5);
    assert!(sa.iter().chain(&sb).all(|s| *s == RequestStatus::Ok));
    assert!(
        took_b >= Duration::from_millis(45),
        "b waited for the group: {took_b:?}"
    );
    let other = disk(serde_json::json!({ "iops": 5, "group": "tenant-test" }));
    assert!(
        other.err().is_some_and(|e| e.contains("same limits")),
        "a member with other limits is refused"
    );
}

#[test]
fn a_drain_lets_every_held_request_go_at_once() {
    let d = disk(serde_json::json!({ "iops": 1, "burst_ms": 1000 })).unwrap();
    let stack = &d.stack;
    let exec = Exec::new();
    let _on = exec.enter();
    let mut bufs = vec![vec![7u8; 4096]; 3];
    for (i, b) in bufs.iter_mut().enumerate() {
        let seg = vec![Segment {
            base: b.as_mut_ptr(),
            len: 4096,
        }];
        // SAFETY: `bufs` outlives the requests (ended below).
        match unsafe { stack.begin(BlockRequestKind::Write, (i * 4096) as u64, 4096, seg) } {
            Started::Parked(p) => exec.park(p, Owner::Guest(i as u64)),
            Started::Backend(f) => drop(f.finish(RequestStatus::Ok)),
            Started::Done(_) => panic!("a write was answered by the throttle"),
        }
    }
    assert_eq!(
        stat(&d, "held_now"),
        2,
        "one a second: the 2nd and 3rd wait"
    );
    exec.cancel_timers();
    exec.run();
    let mut moved = 0;
    while let Some((_, s)) = exec.take_moved() {
        assert!(matches!(s, Started::Backend(_)));
        moved += 1;
    }
    assert_eq!(moved, 2);
    assert_eq!(stat(&d, "held_now"), 0);
}

#[test]
fn bad_configs_are_refused_naming_the_field() {
    for (cfg, says) in [
        (serde_json::json!({}), "nothing to throttle"),
        (serde_json::json!({ "iops": 0 }), "at least 1"),
        (serde_json::json!({ "iops": 10, "burst_ms": 0 }), "burst_ms"),
        (
            serde_json::json!({ "iops": 10, "burst_ms": 600000 }),
            "burst_ms",
        ),
        (serde_json::json!({ "iops": -1 }), "iops"),
        (serde_json::json!({ "iops": 10, "rate": 3 }), "rate"),
    ] {
        let e = disk(cfg.clone()).err().unwrap_or_default();
        assert!(e.contains(says), "{cfg}: {e}");
    }
}

#[test]
fn new_limits_apply_while_it_runs_and_bad_ones_keep_the_old() {
    let d = disk(serde_json::json!({ "iops": 100, "burst_ms": 100 })).unwrap();
    let exec = Exec::new();
    let (_, s) = write_all(&d, &exec, 20);
    assert!(s.iter().all(|s| *s == RequestStatus::Ok));
    let held = stat(&d, "held");
    assert!(
        held >= 9,
        "a burst of 10 at 100/s: the rest waited ({held})"
    );
    let instance = &d.stack.layers()[0];
    for (bad, says) in [
        (serde_json::json!({ "iops": 0 }), "at least 1"),
        (serde_json::json!({ "iops": 10, "group": "other" }), "group"),
        (serde_json::json!({ "iops": 10, "speed": 1 }), "speed"),
    ] {
        let e = instance.reconfigure(&bad.to_string()).unwrap_err();
        assert!(e.contains(says), "{bad}: {e}");
    }
    assert_eq!(stat(&d, "iops_limit"), 100, "refused: the old limits stay");
    instance
        .reconfigure(&serde_json::json!({ "iops": 100000, "burst_ms": 1000 }).to_string())
        .unwrap();
    assert_eq!(stat(&d, "iops_limit"), 100000);
    // The bucket keeps what it owed, at the new rate (microseconds), then a burst of
    // 100,000: 50 writes wait for nothing more than that debt.
    std::thread::sleep(Duration::from_millis(5));
    let (_, s) = write_all(&d, &exec, 50);
    assert!(s.iter().all(|s| *s == RequestStatus::Ok));
    assert_eq!(stat(&d, "held"), held, "none held under the new limits");
}
