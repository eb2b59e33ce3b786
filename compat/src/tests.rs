//! The shim's rules, checked with interceptors linked into the test (the SDK's tables
//! without a shared object): ordering, continue/complete/fail, pre/post pairing under
//! toggles, panics and bad return values, bounce buffers, the layers below.

use crate::*;
use interceptor_sdk::{
    abi, static_table, CreateContext, Decision, Interceptor, Lower, Request, RequestKind, Slot,
    Status,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A RAM disk that remembers where its last buffer lived (to see copies).
struct MemDisk {
    data: Mutex<Vec<u8>>,
    calls: AtomicU64,
    last_base: AtomicUsize,
}

impl MemDisk {
    fn new(bytes: usize) -> Arc<MemDisk> {
        Arc::new(MemDisk {
            data: Mutex::new(vec![0; bytes]),
            calls: AtomicU64::new(0),
            last_base: AtomicUsize::new(0),
        })
    }
}

impl BlockDriver for MemDisk {
    fn capacity(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }

    unsafe fn execute(&self, req: &IoRequest<'_>) -> RequestStatus {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if let Some(s) = req.segments.first() {
            self.last_base.store(s.base as usize, Ordering::SeqCst);
        }
        let mut data = self.data.lock().unwrap();
        let mut at = req.offset as usize;
        for s in req.segments {
            let disk = &mut data[at..at + s.len];
            match req.kind {
                BlockRequestKind::Read => {
                    std::ptr::copy_nonoverlapping(disk.as_ptr(), s.base, s.len)
                }
                BlockRequestKind::Write => {
                    std::ptr::copy_nonoverlapping(s.base, disk.as_mut_ptr(), s.len)
                }
                _ => {}
            }
            at += s.len;
        }
        RequestStatus::Ok
    }
}

/// Call logs, one per test (tests run in parallel).
static LOGS: Mutex<Option<HashMap<String, Vec<String>>>> = Mutex::new(None);
/// Called by a recorder's pre hook when its config says `toggle`.
#[allow(clippy::type_complexity)]
static TOGGLERS: Mutex<Option<HashMap<String, Box<dyn Fn() + Send>>>> = Mutex::new(None);

fn log(key: &str, line: String) {
    let mut logs = LOGS.lock().unwrap();
    logs.get_or_insert_with(HashMap::new)
        .entry(key.into())
        .or_default()
        .push(line);
}

fn take_log(key: &str) -> Vec<String> {
    let mut logs = LOGS.lock().unwrap();
    logs.get_or_insert_with(HashMap::new)
        .remove(key)
        .unwrap_or_default()
}

#[derive(serde::Deserialize)]
struct RecorderConfig {
    log: String,
    name: String,
    #[serde(default)]
    pre: String,
    #[serde(default)]
    post: String,
    #[serde(default)]
    toggle: bool,
}

/// Logs its hooks; `pre`/`post` in its config pick what it returns.
struct Recorder {
    cfg: RecorderConfig,
    seen: AtomicU64,
}

impl Interceptor for Recorder {
    const NAME: &'static std::ffi::CStr = c"recorder";

    fn create(ctx: CreateContext<'_>) -> Result<Self, String> {
        let cfg: RecorderConfig = ctx.config_as()?;
        if cfg.pre == "refuse" {
            return Err("recorder: refused on purpose".into());
        }
        if cfg.pre == "panic-create" {
            panic!("boom in create");
        }
        Ok(Recorder {
            cfg,
            seen: AtomicU64::new(0),
        })
    }

    fn pre(&self, req: &mut Request<'_>, slot: &mut Slot) -> Decision {
        let c = &self.cfg;
        self.seen.fetch_add(1, Ordering::SeqCst);
        log(
            &c.log,
            format!(
                "pre {} {}@{}{}",
                c.name,
                kind(req),
                req.offset(),
                if req.disabled() { " disabled" } else { "" }
            ),
        );
        *slot = Some(Box::new(c.name.clone()));
        if c.toggle {
            if let Some(f) = TOGGLERS
                .lock()
                .unwrap()
                .as_ref()
                .and_then(|m| m.get(&c.log))
            {
                f();
            }
        }
        match c.pre.as_str() {
            "complete" => {
                let n = req.len() as usize;
                req.write_data(0, &vec![0x5a; n]).unwrap();
                Decision::Complete
            }
            "fail" => Decision::Fail,
            "panic" => panic!("boom in pre"),
            _ => Decision::Continue,
        }
    }

    fn post(&self, req: &mut Request<'_>, slot: Slot, status: Status) -> Status {
        let c = &self.cfg;
        let mine = slot.and_then(|s| s.downcast::<String>().ok()).map(|s| *s);
        assert_eq!(
            mine.as_deref(),
            Some(c.name.as_str()),
            "slot comes back to its owner"
        );
        log(
            &c.log,
            format!("post {} {}@{} {status:?}", c.name, kind(req), req.offset()),
        );
        match c.post.as_str() {
            "fail" => Status::IoError,
            "panic" => panic!("boom in post"),
            _ => status,
        }
    }

    fn stats(&self) -> serde_json::Value {
        serde_json::json!({ "name": self.cfg.name, "seen": self.seen.load(Ordering::SeqCst) })
    }
}

fn kind(req: &Request<'_>) -> &'static str {
    match req.kind() {
        RequestKind::Read => "R",
        RequestKind::Write => "W",
        RequestKind::Flush => "F",
        _ => "?",
    }
}

/// XORs data with 0xff: transforms, so it gets bounce buffers.
struct Xor;

impl Interceptor for Xor {
    const NAME: &'static std::ffi::CStr = c"xor";
    const FLAGS: u32 = abi::F_MODIFIES_DATA;

    fn create(_: CreateContext<'_>) -> Result<Self, String> {
        Ok(Xor)
    }

    fn pre(&self, req: &mut Request<'_>, _: &mut Slot) -> Decision {
        if req.kind() == RequestKind::Write {
            req.transform(|_, d| d.iter_mut().for_each(|b| *b ^= 0xff))
                .unwrap();
        }
        Decision::Continue
    }

    fn post(&self, req: &mut Request<'_>, _: Slot, status: Status) -> Status {
        if req.kind() == RequestKind::Read && status == Status::Ok {
            req.transform(|_, d| d.iter_mut().for_each(|b| *b ^= 0xff))
                .unwrap();
        }
        status
    }
}

/// Keeps its own first 4 KiB below and shifts everything else up by it: a layout change
/// done with its own I/O to the layers below.
struct Shift {
    lower: Lower,
}

impl Interceptor for Shift {
    const NAME: &'static std::ffi::CStr = c"shift";
    const FLAGS: u32 = abi::F_KEEP_WHEN_DISABLED;

    fn create(ctx: CreateContext<'_>) -> Result<Self, String> {
        ctx.lower
            .write(0, b"SHIFT-HEADER".repeat(50).get(..512).unwrap())
            .map_err(|e| e.to_string())?;
        Ok(Shift { lower: ctx.lower })
    }

    fn pre(&self, req: &mut Request<'_>, _: &mut Slot) -> Decision {
        let mut buf = vec![0u8; req.len() as usize];
        let at = req.offset() + 4096;
        let ok = match req.kind() {
            RequestKind::Read => {
                self.lower.read(at, &mut buf).is_ok() && req.write_data(0, &buf).is_ok()
            }
            RequestKind::Write => {
                req.read_data(0, &mut buf).is_ok() && self.lower.write(at, &buf).is_ok()
            }
            RequestKind::Flush => self.lower.flush().is_ok(),
            _ => return Decision::Continue,
        };
        if ok {
            Decision::Complete
        } else {
            Decision::Fail
        }
    }

    fn capacity(&self) -> Option<u64> {
        Some(self.lower.capacity() - 4096)
    }
}

/// Claims to serve net devices only.
struct NetOnly;

impl Interceptor for NetOnly {
    const NAME: &'static std::ffi::CStr = c"net-only";
    const DEVICES: u32 = DeviceKind::Net.mask();
    fn create(_: CreateContext<'_>) -> Result<Self, String> {
        Ok(NetOnly)
    }
}

/// Shrinks the disk without declaring that it stays in the path.
struct BadShrink;

impl Interceptor for BadShrink {
    const NAME: &'static std::ffi::CStr = c"bad-shrink";
    fn create(_: CreateContext<'_>) -> Result<Self, String> {
        Ok(BadShrink)
    }
    fn capacity(&self) -> Option<u64> {
        Some(512)
    }
}

fn spec(
    id: &str,
    table: &'static abi::InterceptorTable,
    config: serde_json::Value,
) -> InstanceSpec {
    InstanceSpec {
        id: id.into(),
        plugin: Plugin::from_static(id, table).unwrap(),
        config_json: config.to_string(),
        enabled: true,
    }
}

fn recorder(key: &str, name: &str, pre: &str, post: &str) -> InstanceSpec {
    spec(
        name,
        static_table!(Recorder),
        serde_json::json!({"log": key, "name": name, "pre": pre, "post": post}),
    )
}

/// One request on a buffer; returns the status.
fn io(stack: &BlockStack, kind: BlockRequestKind, offset: u64, buf: &mut [u8]) -> RequestStatus {
    let seg = [Segment {
        base: buf.as_mut_ptr(),
        len: buf.len(),
    }];
    let segs: &[Segment] = if buf.is_empty() { &[] } else { &seg };
    // SAFETY: `buf` is valid for its length during the call.
    unsafe { stack.submit(kind, offset, segs) }
}

fn abc(key: &str, b_pre: &str, b_post: &str) -> (Arc<MemDisk>, Arc<BlockStack>) {
    let disk = MemDisk::new(1 << 20);
    let chain = [
        recorder(key, "a", "", ""),
        recorder(key, "b", b_pre, b_post),
        recorder(key, "c", "", ""),
    ];
    let stack = BlockStack::build("vda", disk.clone(), &chain).unwrap();
    (disk, stack)
}

#[test]
fn without_interceptors_the_driver_gets_the_guest_buffer_itself() {
    let disk = MemDisk::new(1 << 20);
    let stack = BlockStack::build("vda", disk.clone(), &[]).unwrap();
    let mut buf = vec![7u8; 4096];
    assert_eq!(
        io(&stack, BlockRequestKind::Write, 8192, &mut buf),
        RequestStatus::Ok
    );
    assert_eq!(disk.last_base.load(Ordering::SeqCst), buf.as_ptr() as usize);
    assert_eq!(disk.data.lock().unwrap()[8192..12288], [7u8; 4096]);
    assert_eq!(stack.counters().requests.load(Ordering::SeqCst), 1);
}

#[test]
fn pre_hooks_run_top_down_and_post_hooks_bottom_up() {
    let (disk, stack) = abc("order", "", "");
    let mut buf = vec![0u8; 512];
    assert_eq!(
        io(&stack, BlockRequestKind::Read, 1024, &mut buf),
        RequestStatus::Ok
    );
    assert_eq!(
        take_log("order"),
        [
            "pre a R@1024",
            "pre b R@1024",
            "pre c R@1024",
            "post c R@1024 Ok",
            "post b R@1024 Ok",
            "post a R@1024 Ok"
        ]
    );
    assert_eq!(disk.calls.load(Ordering::SeqCst), 1);
}

#[test]
fn complete_skips_the_layers_below_and_still_gets_its_post_hook() {
    let (disk, stack) = abc("complete", "complete", "");
    let mut buf = vec![0u8; 1024];
    assert_eq!(
        io(&stack, BlockRequestKind::Read, 0, &mut buf),
        RequestStatus::Ok
    );
    assert_eq!(
        take_log("complete"),
        ["pre a R@0", "pre b R@0", "post b R@0 Ok", "post a R@0 Ok"]
    );
    assert_eq!(disk.calls.load(Ordering::SeqCst), 0, "the driver never ran");
    assert!(
        buf.iter().all(|&b| b == 0x5a),
        "the completing hook filled the read"
    );
    assert_eq!(
        stack
            .counters()
            .completed_without_driver
            .load(Ordering::SeqCst),
        1
    );
    assert_eq!(
        stack.layers()[1]
            .counters()
            .completed
            .load(Ordering::SeqCst),
        1
    );
}

#[test]
fn fail_in_pre_gives_ioerr_and_unwinds_through_the_hooks_that_ran() {
    let (disk, stack) = abc("fail", "fail", "");
    let mut buf = vec![1u8; 512];
    assert_eq!(
        io(&stack, BlockRequestKind::Write, 512, &mut buf),
        RequestStatus::IoError
    );
    assert_eq!(
        take_log("fail"),
        [
            "pre a W@512",
            "pre b W@512",
            "post b W@512 IoError",
            "post a W@512 IoError"
        ]
    );
    assert_eq!(disk.calls.load(Ordering::SeqCst), 0);
    assert_eq!(
        stack.layers()[1].counters().errors.load(Ordering::SeqCst),
        1
    );
    assert_eq!(stack.counters().errors.load(Ordering::SeqCst), 1);
    // The device goes on: the next request is served normally by the others.
    stack.layers()[1].set_enabled(false);
    assert_eq!(
        io(&stack, BlockRequestKind::Write, 512, &mut buf),
        RequestStatus::Ok
    );
}

#[test]
fn fail_in_post_reaches_the_guest() {
    let (disk, stack) = abc("postfail", "", "fail");
    let mut buf = vec![0u8; 512];
    assert_eq!(
        io(&stack, BlockRequestKind::Read, 0, &mut buf),
        RequestStatus::IoError
    );
    assert_eq!(disk.calls.load(Ordering::SeqCst), 1);
    assert_eq!(take_log("postfail").last().unwrap(), "post a R@0 IoError");
}

#[test]
fn a_panicking_plugin_fails_that_request_and_the_shim_goes_on() {
    for (key, pre, post) in [("panic-pre", "panic", ""), ("panic-post", "", "panic")] {
        let (_disk, stack) = abc(key, pre, post);
        let mut buf = vec![0u8; 512];
        assert_eq!(
            io(&stack, BlockRequestKind::Read, 0, &mut buf),
            RequestStatus::IoError,
            "{key}"
        );
        let log = take_log(key);
        assert_eq!(log.first().unwrap(), "pre a R@0");
        assert_eq!(
            log.last().unwrap(),
            "post a R@0 IoError",
            "{key}: a's post still ran"
        );
        // Again: still serving, still failing only through the broken plugin.
        assert_eq!(
            io(&stack, BlockRequestKind::Read, 0, &mut buf),
            RequestStatus::IoError
        );
        stack.layers()[1].set_enabled(false);
        assert_eq!(
            io(&stack, BlockRequestKind::Read, 0, &mut buf),
            RequestStatus::Ok
        );
    }
}

#[test]
fn a_disabled_interceptor_is_skipped_and_a_request_keeps_its_chain() {
    let (_disk, stack) = abc("toggle", "", "");
    let b = stack.layers()[1].clone();
    b.set_enabled(false);
    let mut buf = vec![0u8; 512];
    io(&stack, BlockRequestKind::Write, 0, &mut buf);
    assert_eq!(
        take_log("toggle"),
        ["pre a W@0", "pre c W@0", "post c W@0 Ok", "post a W@0 Ok"]
    );
    // Re-enabled from inside a's pre hook: this request started without b and keeps that.
    let target = b.clone();
    TOGGLERS
        .lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .insert(
            "toggle2".into(),
            Box::new(move || target.set_enabled(!target.enabled())),
        );
    let disk = MemDisk::new(1 << 20);
    let chain = [
        spec(
            "a",
            static_table!(Recorder),
            serde_json::json!({"log": "toggle2", "name": "a", "toggle": true}),
        ),
        recorder("toggle2", "b", "", ""),
    ];
    let stack = BlockStack::build("vda", disk, &chain).unwrap();
    let target = stack.layers()[1].clone();
    TOGGLERS.lock().unwrap().as_mut().unwrap().insert(
        "toggle2".into(),
        Box::new(move || target.set_enabled(!target.enabled())),
    );
    io(&stack, BlockRequestKind::Read, 0, &mut buf); // b on at start; a's pre turns it off
    io(&stack, BlockRequestKind::Read, 0, &mut buf); // b off at start; a's pre turns it on
    assert_eq!(
        take_log("toggle2"),
        [
            "pre a R@0",
            "pre b R@0",
            "post b R@0 Ok",
            "post a R@0 Ok",
            "pre a R@0",
            "post a R@0 Ok"
        ]
    );
}

#[test]
fn pre_and_post_stay_paired_while_another_thread_toggles() {
    let (_disk, stack) = abc("race", "", "");
    let b = stack.layers()[1].clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let toggler = {
        let (b, stop) = (b.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut flips = 0u64;
            while !stop.load(Ordering::SeqCst) {
                b.set_enabled(!b.enabled());
                flips += 1;
                std::thread::yield_now();
            }
            flips
        })
    };
    let mut buf = vec![0u8; 512];
    for _ in 0..5000 {
        assert_eq!(
            io(&stack, BlockRequestKind::Read, 0, &mut buf),
            RequestStatus::Ok
        );
    }
    stop.store(true, Ordering::SeqCst);
    let flips = toggler.join().unwrap();
    let log = take_log("race");
    // Each request's lines are a well-nested sequence: every "pre b" is followed by c and
    // then "post b" before a's post.
    let mut lines = log.iter().map(String::as_str).peekable();
    let (mut with_b, mut without_b) = (0, 0);
    while let Some(first) = lines.next() {
        assert_eq!(first, "pre a R@0");
        let rest: Vec<&str> = if lines.peek() == Some(&"pre b R@0") {
            with_b += 1;
            (0..5).map(|_| lines.next().unwrap()).collect()
        } else {
            without_b += 1;
            (0..3).map(|_| lines.next().unwrap()).collect()
        };
        let expected_with = [
            "pre b R@0",
            "pre c R@0",
            "post c R@0 Ok",
            "post b R@0 Ok",
            "post a R@0 Ok",
        ];
        let expected_without = ["pre c R@0", "post c R@0 Ok", "post a R@0 Ok"];
        assert!(
            rest == expected_with || rest == expected_without,
            "torn request: {rest:?}"
        );
    }
    assert_eq!(with_b + without_b, 5000);
    assert!(flips > 0);
    assert_eq!(b.counters().requests.load(Ordering::SeqCst), with_b);
}

#[test]
fn a_transforming_plugin_works_on_a_bounce_buffer_never_on_guest_memory() {
    let disk = MemDisk::new(1 << 20);
    let stack = BlockStack::build(
        "vda",
        disk.clone(),
        &[spec("x", static_table!(Xor), serde_json::json!({}))],
    )
    .unwrap();
    let mut guest = vec![0x0fu8; 4096];
    assert_eq!(
        io(&stack, BlockRequestKind::Write, 4096, &mut guest),
        RequestStatus::Ok
    );
    assert!(
        guest.iter().all(|&b| b == 0x0f),
        "the guest's buffer is untouched"
    );
    assert_ne!(
        disk.last_base.load(Ordering::SeqCst),
        guest.as_ptr() as usize
    );
    assert!(
        disk.data.lock().unwrap()[4096..8192]
            .iter()
            .all(|&b| b == 0xf0),
        "the disk holds the transform"
    );
    let mut back = vec![0u8; 4096];
    assert_eq!(
        io(&stack, BlockRequestKind::Read, 4096, &mut back),
        RequestStatus::Ok
    );
    assert_eq!(back, guest);
    // Disabled, it is out of the path and the driver sees guest memory again (zero copy).
    stack.layers()[0].set_enabled(false);
    assert_eq!(
        io(&stack, BlockRequestKind::Read, 4096, &mut back),
        RequestStatus::Ok
    );
    assert_eq!(
        disk.last_base.load(Ordering::SeqCst),
        back.as_ptr() as usize
    );
    assert!(back.iter().all(|&b| b == 0xf0));
}

#[test]
fn the_layers_below_carry_a_plugins_own_io_through_the_rest_of_the_chain() {
    let disk = MemDisk::new(1 << 20);
    let chain = [
        spec("shift", static_table!(Shift), serde_json::json!({})),
        recorder("lower", "r", "", ""),
    ];
    let stack = BlockStack::build("vda", disk.clone(), &chain).unwrap();
    assert_eq!(
        stack.capacity(),
        (1 << 20) - 4096,
        "the exposed capacity is the top's"
    );
    // create() already wrote its header through the recorder below it.
    assert_eq!(take_log("lower"), ["pre r W@0", "post r W@0 Ok"]);
    assert_eq!(&disk.data.lock().unwrap()[..12], b"SHIFT-HEADER");
    let mut buf = vec![9u8; 512];
    assert_eq!(
        io(&stack, BlockRequestKind::Write, 0, &mut buf),
        RequestStatus::Ok
    );
    assert_eq!(take_log("lower"), ["pre r W@4096", "post r W@4096 Ok"]);
    assert_eq!(disk.data.lock().unwrap()[4096..4608], [9u8; 512]);
    // Disabled, it stays in the path (it owns the layout) and is told so.
    stack.layers()[0].set_enabled(false);
    let mut back = vec![0u8; 512];
    assert_eq!(
        io(&stack, BlockRequestKind::Read, 0, &mut back),
        RequestStatus::Ok
    );
    assert_eq!(back, buf);
    // A request past the capacity below is refused, not run.
    let lower_past_end = stack.layers()[0].capacity() + 512;
    assert_eq!(
        io(&stack, BlockRequestKind::Read, lower_past_end, &mut back),
        RequestStatus::IoError
    );
}

#[test]
fn instances_of_one_plugin_keep_separate_state_and_report_it() {
    let (_disk, stack) = abc("stats", "", "");
    let mut buf = vec![0u8; 512];
    stack.layers()[2].set_enabled(false);
    io(&stack, BlockRequestKind::Read, 0, &mut buf);
    io(&stack, BlockRequestKind::Read, 0, &mut buf);
    let seen = |i: usize| stack.layers()[i].plugin_stats().unwrap()["seen"].as_u64();
    assert_eq!((seen(0), seen(1), seen(2)), (Some(2), Some(2), Some(0)));
    assert_eq!(stack.layers()[1].plugin_stats().unwrap()["name"], "b");
    take_log("stats");
}

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
    let long: Vec<_> = (0..=MAX_CHAIN)
        .map(|i| recorder("r", &format!("l{i}"), "", ""))
        .collect();
    assert_eq!(
        err(&long),
        "chain of device `vda` is longer than 16 interceptors"
    );
}
