//! Chains edited while requests run (`LiveStack`): loads and removals take effect for the
//! next request, plugins' own I/O follows the new chain, and the data safety refusals.

use super::plugins::{Gate, OwnedXor, Paired, Shift, Threads, Xor, GATE, THREADS};
use super::*;

fn live(disk: &Arc<MemDisk>, chain: &[InstanceSpec]) -> Arc<LiveStack> {
    Arc::new(LiveStack::start("vdb", disk.clone(), chain, None).unwrap())
}

/// One guest request, served on the device's I/O thread as the device serves it.
fn live_io(
    stack: &Arc<LiveStack>,
    kind: BlockRequestKind,
    offset: u64,
    buf: &mut [u8],
) -> RequestStatus {
    let (on_io, mut data) = (stack.clone(), buf.to_vec());
    let (status, data) = stack
        .io_thread()
        .run(move || {
            let seg = [Segment {
                base: data.as_mut_ptr(),
                len: data.len(),
            }];
            // SAFETY: `data` is valid for its length during the call.
            let status = unsafe { on_io.submit(kind, offset, &seg) };
            (status, data)
        })
        .unwrap();
    buf.copy_from_slice(&data);
    status
}

fn ids(stack: &LiveStack) -> Vec<String> {
    stack
        .snapshot()
        .layers()
        .iter()
        .map(|l| l.id().to_string())
        .collect()
}

#[test]
fn a_loaded_instance_sees_the_next_request_and_a_removed_one_does_not() {
    let disk = MemDisk::new(1 << 20);
    let stack = live(&disk, &[]);
    live_io(&stack, BlockRequestKind::Write, 0, &mut [1u8; 512]);
    stack
        .insert(
            &spec("x", static_table!(Xor), serde_json::json!({})),
            0,
            false,
        )
        .unwrap();
    assert_eq!(ids(&stack), ["x"]);
    live_io(&stack, BlockRequestKind::Write, 512, &mut [1u8; 512]);
    assert_eq!(
        disk.data.lock().unwrap()[512],
        0xfe,
        "the write after the load is transformed"
    );
    assert_eq!(disk.data.lock().unwrap()[0], 1, "the one before it is not");
    let x = stack.snapshot().layers()[0].clone();
    assert_eq!(x.counters().requests.load(Ordering::SeqCst), 1);
    stack.remove("x").unwrap();
    assert!(ids(&stack).is_empty());
    live_io(&stack, BlockRequestKind::Write, 1024, &mut [1u8; 512]);
    assert_eq!(
        disk.data.lock().unwrap()[1024],
        1,
        "after removal the chain is empty again"
    );
    assert_eq!(x.counters().requests.load(Ordering::SeqCst), 1);
    assert!(matches!(
        stack.remove("x"),
        Err(ChainError::NotFound { .. })
    ));
}

#[test]
fn the_plugins_above_do_their_own_io_through_an_instance_loaded_below_them() {
    let disk = MemDisk::new(1 << 20);
    let stack = live(
        &disk,
        &[spec("shift", static_table!(Shift), serde_json::json!({}))],
    );
    let capacity = stack.capacity();
    stack
        .insert(
            &spec("x", static_table!(Xor), serde_json::json!({})),
            1,
            false,
        )
        .unwrap();
    assert_eq!(ids(&stack), ["shift", "x"]);
    assert_eq!(stack.capacity(), capacity);
    let mut data = [7u8; 512];
    assert_eq!(
        live_io(&stack, BlockRequestKind::Write, 0, &mut data),
        RequestStatus::Ok
    );
    assert_eq!(
        disk.data.lock().unwrap()[4096],
        7 ^ 0xff,
        "shift's write went through x"
    );
    let mut back = [0u8; 512];
    assert_eq!(
        live_io(&stack, BlockRequestKind::Read, 0, &mut back),
        RequestStatus::Ok
    );
    assert_eq!(back, data);
}

#[test]
fn refusals_leave_the_chain_as_it_was() {
    let disk = MemDisk::new(1 << 20);
    let stack = live(
        &disk,
        &[spec("p", static_table!(Paired), serde_json::json!({}))],
    );
    let conflict = |r: Result<Arc<Instance>, ChainError>| match r {
        Err(ChainError::Conflict(m)) => m,
        other => panic!("expected a conflict, got {other:?}"),
    };
    let m = conflict(stack.insert(
        &spec("s", static_table!(Shift), serde_json::json!({})),
        0,
        true,
    ));
    assert!(m.contains("cannot change size"), "{m}");
    let m = conflict(stack.insert(
        &spec("o", static_table!(OwnedXor), serde_json::json!({})),
        0,
        false,
    ));
    assert!(m.contains("owns the format"), "{m}");
    let m = conflict(stack.insert(
        &spec("p", static_table!(Paired), serde_json::json!({})),
        0,
        false,
    ));
    assert!(m.contains("already has"), "{m}");
    assert!(matches!(
        stack.insert(
            &spec("q", static_table!(Paired), serde_json::json!({})),
            5,
            false
        ),
        Err(ChainError::Invalid(_))
    ));
    assert_eq!(ids(&stack), ["p"]);
}

#[test]
fn an_instance_that_owns_its_format_stays_once_it_has_written() {
    let disk = MemDisk::new(1 << 20);
    let stack = live(&disk, &[]);
    let owned = || spec("o", static_table!(OwnedXor), serde_json::json!({}));
    stack.insert(&owned(), 0, true).unwrap();
    stack.remove("o").unwrap(); // nothing written yet: nothing to lose
    stack.insert(&owned(), 0, true).unwrap();
    live_io(&stack, BlockRequestKind::Write, 0, &mut [3u8; 512]);
    match stack.remove("o") {
        Err(ChainError::Conflict(m)) => assert!(m.contains("garbage"), "{m}"),
        other => panic!("expected a conflict, got {other:?}"),
    }
    let mut back = [0u8; 512];
    live_io(&stack, BlockRequestKind::Read, 0, &mut back);
    assert_eq!(back, [3u8; 512]);
    // Booted with it (not fresh): never removable.
    let stack = live(&disk, &[owned()]);
    assert!(matches!(stack.remove("o"), Err(ChainError::Conflict(_))));
}

#[test]
fn no_request_is_torn_while_the_chain_changes_under_it() {
    let disk = MemDisk::new(1 << 20);
    let stack = live(
        &disk,
        &[spec("base", static_table!(Paired), serde_json::json!({}))],
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let guest = {
        let (stack, stop) = (stack.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) || n < 1000 {
                let at = (n % 2048) * 512;
                let mut w = [(n % 251) as u8; 512];
                assert_eq!(
                    live_io(&stack, BlockRequestKind::Write, at, &mut w),
                    RequestStatus::Ok
                );
                let mut r = [0u8; 512];
                assert_eq!(
                    live_io(&stack, BlockRequestKind::Read, at, &mut r),
                    RequestStatus::Ok
                );
                assert_eq!(r, w, "request {n}");
                n += 1;
            }
            n
        })
    };
    for round in 0..300usize {
        let id = format!("p{round}");
        let at = round % (ids(&stack).len() + 1);
        stack
            .insert(
                &spec(&id, static_table!(Paired), serde_json::json!({})),
                at,
                false,
            )
            .unwrap();
        stack.remove(&id).unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let requests = guest.join().unwrap();
    assert!(requests >= 1000);
    assert_eq!(ids(&stack), ["base"]);
    let base = stack.snapshot().layers()[0].clone();
    assert_eq!(base.counters().errors.load(Ordering::SeqCst), 0);
    assert_eq!(stack.counters().errors.load(Ordering::SeqCst), 0);
    assert_eq!(base.counters().latency.count(), 2 * requests);
}

/// The threading contract (docs/plugins.md): every hook of an instance, create and destroy
/// and its own I/O included, runs on its device's I/O thread, whoever asked for it: a load
/// or removal from another thread, a toggle, the requests, the shutdown.
#[test]
fn every_hook_runs_on_the_devices_io_thread() {
    let disk = MemDisk::new(1 << 20);
    let threads = |id: &str| spec(id, static_table!(Threads), serde_json::json!({}));
    let stack = live(&disk, &[threads("t-boot")]);
    live_io(&stack, BlockRequestKind::Write, 0, &mut [7u8; 512]);
    // Loaded and removed from other threads (as the API thread does).
    let api = stack.clone();
    std::thread::spawn(move || {
        api.insert(&threads("t-run"), 0, false).unwrap();
        api.snapshot().layers()[0].set_enabled(false);
    })
    .join()
    .unwrap();
    live_io(&stack, BlockRequestKind::Read, 0, &mut [0u8; 512]);
    stack.snapshot().layers()[0].set_enabled(true);
    live_io(&stack, BlockRequestKind::Write, 512, &mut [8u8; 512]);
    // A snapshot held elsewhere while the instance is removed (as an API view does): its
    // destroy still waits for the I/O thread.
    let view = stack.snapshot();
    let api = stack.clone();
    std::thread::spawn(move || api.remove("t-run").unwrap())
        .join()
        .unwrap();
    drop(view);
    live_io(&stack, BlockRequestKind::Read, 512, &mut [0u8; 512]);
    assert_eq!(stack.flush(), RequestStatus::Ok);
    assert_eq!(stack.close(), RequestStatus::Ok);
    let calls: Vec<_> = THREADS
        .lock()
        .unwrap()
        .iter()
        .filter(|(id, ..)| id.starts_with("t-"))
        .cloned()
        .collect();
    for id in ["t-boot", "t-run"] {
        let hooks: Vec<&str> = calls
            .iter()
            .filter(|c| c.0 == id)
            .map(|c| c.1.as_str())
            .collect();
        assert_eq!(hooks.first(), Some(&"create"), "{id}: {hooks:?}");
        assert_eq!(hooks.last(), Some(&"destroy"), "{id}: {hooks:?}");
        assert!(
            hooks.contains(&"pre") && hooks.contains(&"post"),
            "{id}: {hooks:?}"
        );
    }
    let elsewhere: Vec<_> = calls.iter().filter(|c| c.2 != "io-vdb").collect();
    assert!(
        elsewhere.is_empty(),
        "hooks off the I/O thread: {elsewhere:?}"
    );
}

/// A refused load changes no byte of the disk: what the plugin wrote in create is held back
/// until every check passed (here the capacity check, which needs the created instance).
#[test]
fn a_refused_load_writes_nothing() {
    let disk = MemDisk::new(1 << 20);
    live_io(
        &live(&disk, &[]),
        BlockRequestKind::Write,
        0,
        &mut [0u8; 512],
    );
    let stack = live(&disk, &[]);
    let before = disk.data.lock().unwrap().clone();
    // Shift writes its header in create, then exposes 4 KiB less: refused under a guest.
    let e = stack
        .insert(
            &spec("shift", static_table!(Shift), serde_json::json!({})),
            0,
            true,
        )
        .unwrap_err();
    assert!(matches!(e, ChainError::Conflict(_)), "{e}");
    assert!(e.to_string().contains("cannot change size"), "{e}");
    assert!(
        *disk.data.lock().unwrap() == before,
        "the refused load wrote to the disk"
    );
    assert!(ids(&stack).is_empty());
    // Accepted at boot, the same writes reach the disk, in create's order.
    let booted = live(
        &disk,
        &[spec("shift", static_table!(Shift), serde_json::json!({}))],
    );
    assert_eq!(&disk.data.lock().unwrap()[..12], b"SHIFT-HEADER");
    drop(booted);
}

/// Removing a plugin that owns its format is allowed only while it has written nothing. The
/// check used to run before the requests in flight had drained: a write on its way down
/// (here held above it) was not counted yet, the removal went ahead after it, and what the
/// plugin had just written became unreadable. Now the check runs on the I/O thread after
/// the request, and refuses.
#[test]
fn a_write_in_flight_counts_before_a_removal_decides() {
    let disk = MemDisk::new(1 << 20);
    let stack = live(
        &disk,
        &[spec("gate", static_table!(Gate), serde_json::json!({}))],
    );
    stack
        .insert(
            &spec("o", static_table!(OwnedXor), serde_json::json!({})),
            1,
            true,
        )
        .unwrap();
    let guest = {
        let stack = stack.clone();
        std::thread::spawn(move || live_io(&stack, BlockRequestKind::Write, 0, &mut [9u8; 512]))
    };
    std::thread::sleep(std::time::Duration::from_millis(100));
    let removal = {
        let stack = stack.clone();
        std::thread::spawn(move || stack.remove("o"))
    };
    std::thread::sleep(std::time::Duration::from_millis(100));
    *GATE.0.lock().unwrap() = true;
    GATE.1.notify_all();
    assert_eq!(guest.join().unwrap(), RequestStatus::Ok);
    let removed = removal.join().unwrap();
    assert!(
        matches!(removed, Err(ChainError::Conflict(_))),
        "removed after it wrote: {removed:?}"
    );
    assert_eq!(ids(&stack), ["gate", "o"]);
    let mut back = [0u8; 512];
    live_io(&stack, BlockRequestKind::Read, 0, &mut back);
    assert_eq!(back, [9u8; 512]);
}

/// A device reset comes from a vCPU thread, whose seccomp filter allows none of the calls
/// a queue handler makes when it goes (its engine, its timer): the handler is dropped on
/// the I/O thread, before `remove` returns.
#[test]
fn a_removed_subscriber_is_dropped_on_the_io_thread() {
    struct Handler(Arc<std::sync::Mutex<Option<String>>>);
    impl crate::event_manager::MutEventSubscriber for Handler {
        fn process(
            &mut self,
            _: crate::event_manager::Events,
            _: &mut crate::event_manager::EventOps,
        ) {
        }
        fn init(&mut self, _: &mut crate::event_manager::EventOps) {}
    }
    impl crate::IoSubscriber for Handler {
        fn drain(&mut self) {}
        fn quiesce_step(&mut self) -> bool {
            true
        }
    }
    impl Drop for Handler {
        fn drop(&mut self) {
            let name = std::thread::current().name().map(str::to_string);
            *self.0.lock().unwrap() = name;
        }
    }
    let disk = MemDisk::new(1 << 20);
    let stack = live(&disk, &[]);
    let dropped_on = Arc::new(std::sync::Mutex::new(None));
    let io = stack.io_thread();
    let id = io.add(Box::new(Handler(dropped_on.clone()))).unwrap();
    io.remove(id).unwrap();
    assert_eq!(dropped_on.lock().unwrap().as_deref(), Some("io-vdb"));
}

/// A chain goes to the hook pool only when the disk has one and every instance declares
/// `F_CONCURRENT`; a request started there runs its pre hooks on a `hooks-` thread, comes
/// back through `done`, and finishes as any other.
#[test]
fn only_a_chain_of_concurrent_instances_starts_requests_on_the_hook_pool() {
    use super::plugins::Concurrent;
    let conc = |key: &str| {
        spec(
            "c",
            static_table!(Concurrent),
            serde_json::json!({ "log": key }),
        )
    };
    let disk = MemDisk::new(1 << 20);
    assert!(
        !live(&disk, &[]).concurrent(),
        "an empty chain: nothing to run there"
    );
    let mixed = live(
        &disk,
        &[
            conc("pool-mixed"),
            spec("x", static_table!(Xor), serde_json::json!({})),
        ],
    );
    assert!(!mixed.concurrent(), "xor does not declare it");
    let none = LiveStack::start_with_pool("vdb", disk.clone(), &[conc("pool-none")], None, 0);
    assert!(!none.unwrap().concurrent(), "a disk without a pool");

    let stack = live(&disk, &[conc("pool-on")]);
    assert!(stack.concurrent());
    let mut buf = vec![0x5au8; 4096];
    let segments = vec![Segment {
        base: buf.as_mut_ptr(),
        len: buf.len(),
    }];
    let (tx, rx) = std::sync::mpsc::channel();
    // SAFETY: `buf` outlives the request, which finishes below before it is dropped.
    let handed = unsafe {
        stack.begin_on_pool(BlockRequestKind::Write, 8192, 4096, segments, move |s| {
            tx.send(s).unwrap()
        })
    };
    assert!(handed);
    let started = rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
    let status = match started {
        Started::Backend(f) => {
            let io = f.io();
            // SAFETY: the request's buffer is valid (above).
            let backend = unsafe { disk.execute(&io) };
            stack.complete(f, backend)
        }
        Started::Done(s) => s,
        Started::Parked(_) => panic!("no plugin here waits"),
    };
    assert_eq!(status, RequestStatus::Ok);
    assert_eq!(disk.data.lock().unwrap()[8192..12288], [0x5au8; 4096]);
    let threads = take_log("pool-on");
    assert_eq!(threads.len(), 1);
    assert!(threads[0].starts_with("hooks-vdb-"), "{threads:?}");
    assert_eq!(stack.counters().started_on_pool.load(Ordering::SeqCst), 1);
}
