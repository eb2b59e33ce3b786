//! ABI version 2 through the queue's executor (`exec.rs`): a pre hook that leaves its
//! request pending and resumes it from a timer or from its own lower request's completion,
//! driven here as a queue drives it (the engine played by the backend, synchronously).

use super::*;
use std::ffi::{c_char, c_void};

/// A version-2 plugin written against the raw ABI (as a C plugin would be): every read
/// waits. `mode` 0: a timer of 1 ms resumes it CONTINUE (the layers below serve it);
/// `mode` 1: it reads the range itself with a lower request into the request's own
/// buffers and resumes COMPLETE; `mode` 2: it never resumes.
struct Waiter {
    lower: *const abi::Lower,
    mode: u8,
    pended: AtomicU64,
}

struct Pending {
    lower: *const abi::Lower,
    handle: *mut c_void,
}

unsafe extern "C" fn w_create(
    args: *const abi::CreateArgs,
    _err: *mut c_char,
    _len: usize,
) -> *mut c_void {
    let args = &*args;
    let config = std::ffi::CStr::from_ptr(args.config_json).to_string_lossy();
    let mode = config
        .split("\"mode\":")
        .nth(1)
        .and_then(|r| r.trim_start().chars().next())
        .and_then(|c| c.to_digit(10))
        .unwrap_or(0) as u8;
    assert_ne!(args.lower_features & abi::LOWER_F_ASYNC, 0);
    Box::into_raw(Box::new(Waiter {
        lower: args.lower,
        mode,
        pended: AtomicU64::new(0),
    }))
    .cast()
}

unsafe extern "C" fn w_fire(arg: *mut c_void, _cancelled: u32) {
    let p = Box::from_raw(arg.cast::<Pending>());
    let l = &*p.lower;
    assert_eq!((l.resume)(l.ctx, p.handle, abi::CONTINUE), abi::STATUS_OK);
}

unsafe extern "C" fn w_done(arg: *mut c_void, status: u32) {
    let p = Box::from_raw(arg.cast::<Pending>());
    let l = &*p.lower;
    let decision = if status == abi::STATUS_OK {
        abi::COMPLETE
    } else {
        abi::FAIL
    };
    assert_eq!((l.resume)(l.ctx, p.handle, decision), abi::STATUS_OK);
}

unsafe extern "C" fn w_pre(
    i: *mut c_void,
    req: *const abi::Request,
    _slot: *mut *mut c_void,
) -> u32 {
    let w = &*i.cast::<Waiter>();
    let req = &*req;
    if req.kind != abi::REQ_READ || req.handle.is_null() {
        return abi::CONTINUE;
    }
    w.pended.fetch_add(1, Ordering::SeqCst);
    let l = &*w.lower;
    let p = Box::into_raw(Box::new(Pending {
        lower: w.lower,
        handle: req.handle,
    }))
    .cast();
    let status = match w.mode {
        0 => (l.timer)(l.ctx, 1_000_000, Some(w_fire), p),
        1 => {
            let io = abi::LowerIo {
                kind: abi::REQ_READ,
                flags: 0,
                offset: req.offset,
                len: req.len,
                segments: req.segments,
                nsegments: req.nsegments,
                done: Some(w_done),
                arg: p,
            };
            (l.submit)(l.ctx, req.handle, &io)
        }
        _ => abi::STATUS_OK,
    };
    assert_eq!(status, abi::STATUS_OK);
    abi::PENDING
}

unsafe extern "C" fn w_post(_: *mut c_void, _: *const abi::Request, _: *mut c_void, s: u32) -> u32 {
    s
}

unsafe extern "C" fn w_destroy(i: *mut c_void) {
    drop(Box::from_raw(i.cast::<Waiter>()));
}

static WAITER: abi::InterceptorTable = abi::InterceptorTable {
    abi_version: 2,
    flags: 0,
    supported_devices: abi::DeviceKind::Block.mask(),
    table_size: std::mem::size_of::<abi::InterceptorTable>() as u32,
    name: c"waiter".as_ptr(),
    create: Some(w_create),
    pre: Some(w_pre),
    post: Some(w_post),
    stats: None,
    destroy: Some(w_destroy),
    capacity: None,
    check: None,
    net_headroom: 0,
    reconfigure: None,
};

fn waiter(id: &str, mode: u8) -> InstanceSpec {
    InstanceSpec {
        id: id.into(),
        plugin: Plugin::from_static("waiter", &WAITER).unwrap(),
        config_json: format!("{{\"mode\": {mode}}}"),
        enabled: true,
    }
}

/// Runs `started` (guest token 1) to its end as a queue would: the executor's events, its
/// timers, its lower requests on the "engine" (the backend, synchronously), and the guest
/// request at the backend. Returns its status, or `None` if it is still waiting after a
/// second.
fn drive(exec: &Exec, backend: &Arc<dyn BlockBackend>, started: Started) -> Option<RequestStatus> {
    let _on = exec.enter();
    let mut started = Some(started);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        match started.take() {
            Some(Started::Done(s)) => return Some(s),
            Some(Started::Backend(f)) => {
                // SAFETY: the test's buffers outlive the call.
                let s = unsafe { backend.execute(&f.io()) };
                return Some(f.finish(s));
            }
            Some(Started::Parked(p)) => exec.park(p, Owner::Guest(1)),
            None => {}
        }
        exec.run();
        while let Some((id, f)) = exec.take_for_engine() {
            // SAFETY: as above.
            let s = unsafe { backend.execute(&f.io()) };
            exec.completed(id, f, s);
            exec.run();
        }
        if let Some((token, s)) = exec.take_moved() {
            assert_eq!(token, 1);
            started = Some(s);
            continue;
        }
        let now = std::time::Instant::now();
        if now > deadline {
            return None;
        }
        match exec.next_timer() {
            Some(at) if at <= now => exec.fire_due(now),
            Some(at) => std::thread::sleep(at - now),
            None => std::thread::sleep(std::time::Duration::from_millis(1)),
        }
    }
}

fn read_through(
    stack: &Arc<BlockStack>,
    exec: &Exec,
    backend: &Arc<dyn BlockBackend>,
) -> (Option<RequestStatus>, Vec<u8>) {
    let mut buf = vec![0u8; 4096];
    let seg = vec![Segment {
        base: buf.as_mut_ptr(),
        len: buf.len(),
    }];
    let started = {
        let _on = exec.enter();
        // SAFETY: `buf` outlives the request (driven to its end below).
        unsafe { stack.begin(BlockRequestKind::Read, 4096, 4096, seg) }
    };
    let status = drive(exec, backend, started);
    (status, buf)
}

fn disk_with_pattern() -> (Arc<MemDisk>, Arc<dyn BlockBackend>) {
    let disk = MemDisk::new(1 << 20);
    for (i, b) in disk.data.lock().unwrap().iter_mut().enumerate() {
        *b = (i / 4096) as u8 ^ 0x5a;
    }
    let backend: Arc<dyn BlockBackend> = disk.clone();
    (disk, backend)
}

#[test]
fn a_request_left_pending_goes_on_when_its_timer_resumes_it() {
    let (_disk, backend) = disk_with_pattern();
    let stack = BlockStack::build("d", backend.clone(), &[waiter("w", 0)]).unwrap();
    let exec = Exec::new();
    let t = std::time::Instant::now();
    let (status, buf) = read_through(&stack, &exec, &backend);
    assert_eq!(status, Some(RequestStatus::Ok));
    assert!(
        t.elapsed() >= std::time::Duration::from_millis(1),
        "it waited"
    );
    assert!(
        buf.iter().all(|&b| b == 1 ^ 0x5a),
        "the layers below served it"
    );
    assert!(exec.idle());
    assert_eq!(
        stack.layers()[0].counters().requests.load(Ordering::SeqCst),
        1
    );
}

#[test]
fn a_plugin_reads_below_without_waiting_and_completes_from_the_callback() {
    // Two of them stacked: the top one's lower read is itself left pending by the one
    // below, which reads further down: nested lower requests.
    let (disk, backend) = disk_with_pattern();
    let stack = BlockStack::build(
        "d",
        backend.clone(),
        &[waiter("top", 1), waiter("bottom", 1)],
    )
    .unwrap();
    let exec = Exec::new();
    let calls = disk.calls.load(Ordering::SeqCst);
    let (status, buf) = read_through(&stack, &exec, &backend);
    assert_eq!(status, Some(RequestStatus::Ok));
    assert!(buf.iter().all(|&b| b == 1 ^ 0x5a));
    assert_eq!(
        disk.calls.load(Ordering::SeqCst),
        calls + 1,
        "one read reached the disk"
    );
    assert!(exec.idle());
}

#[test]
fn a_request_never_resumed_is_abandoned_with_an_error() {
    let (_disk, backend) = disk_with_pattern();
    let stack = BlockStack::build("d", backend.clone(), &[waiter("stuck", 2)]).unwrap();
    let exec = Exec::new();
    let mut buf = vec![0u8; 4096];
    let seg = vec![Segment {
        base: buf.as_mut_ptr(),
        len: buf.len(),
    }];
    let _on = exec.enter();
    // SAFETY: `buf` outlives the request.
    let Started::Parked(p) = (unsafe { stack.begin(BlockRequestKind::Read, 0, 4096, seg) }) else {
        panic!("not left pending");
    };
    exec.park(p, Owner::Guest(7));
    exec.run();
    assert_eq!(exec.counts(), (1, 0));
    assert_eq!(exec.abandon(), vec!["stuck".to_string()]);
    match exec.take_moved() {
        Some((7, Started::Done(s))) => assert_eq!(s, RequestStatus::IoError),
        _ => panic!("the guest request did not end"),
    }
    // A resume that comes too late is ignored.
    exec.resume(1, abi::CONTINUE, 0);
    exec.run();
    assert!(exec.idle());
}

#[test]
fn outside_a_queue_a_request_cannot_wait_and_lower_requests_are_refused() {
    // The synchronous walk (a plugin's own I/O, a flush at shutdown) passes no handle: a
    // plugin that pends anyway has the request failed.
    let (_disk, backend) = disk_with_pattern();
    let stack = BlockStack::build("d", backend, &[waiter("w", 0)]).unwrap();
    let mut buf = vec![0u8; 4096];
    let seg = [Segment {
        base: buf.as_mut_ptr(),
        len: buf.len(),
    }];
    // SAFETY: `buf` outlives the call.
    let status = unsafe { stack.submit(BlockRequestKind::Read, 0, &seg) };
    assert_eq!(
        status,
        RequestStatus::Ok,
        "no handle: the waiter lets it through"
    );
}

/// A request pending in one layer is that layer's plugin's to resume: another plugin's
/// resume of the same handle (its own request's, resumed twice) is refused, so it cannot
/// move a request past a layer that holds it (an encryption that has not sealed it yet).
#[test]
fn only_the_instance_holding_a_request_may_resume_it() {
    let (disk, backend) = disk_with_pattern();
    // mode 2 holds for good: the top (a timer resumes it CONTINUE) passes it down to the
    // bottom, which holds it.
    let stack = BlockStack::build(
        "d",
        backend.clone(),
        &[waiter("top", 0), waiter("bottom", 2)],
    )
    .unwrap();
    let exec = Exec::new();
    let mut buf = vec![0u8; 4096];
    let seg = vec![Segment {
        base: buf.as_mut_ptr(),
        len: buf.len(),
    }];
    let _on = exec.enter();
    // SAFETY: `buf` outlives the request (abandoned below).
    let Started::Parked(p) = (unsafe { stack.begin(BlockRequestKind::Read, 0, 4096, seg) }) else {
        panic!("not left pending");
    };
    let handle = p.handle();
    let top = stack.layers()[0].lower_ctx();
    exec.park(p, Owner::Guest(1));
    std::thread::sleep(std::time::Duration::from_millis(2));
    exec.fire_due(std::time::Instant::now());
    exec.run();
    assert_eq!(exec.counts().0, 1, "held by the bottom now");
    let calls = disk.calls.load(Ordering::SeqCst);
    // The top resumes "its" request again: refused, nothing moves.
    exec.resume(handle, abi::CONTINUE, top);
    exec.run();
    assert_eq!(exec.counts().0, 1);
    assert!(exec.take_moved().is_none());
    assert_eq!(
        disk.calls.load(Ordering::SeqCst),
        calls,
        "nothing reached the disk"
    );
    exec.abandon();
}
