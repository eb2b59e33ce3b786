//! Interceptors written for the shim's tests.

use super::log;
use super::TOGGLERS;
use crate::*;
use interceptor_sdk::{
    abi, CreateContext, Decision, Interceptor, Lower, Request, RequestKind, Slot, Status,
};
use std::sync::atomic::{AtomicU64, Ordering};

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
pub(super) struct Recorder {
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
pub(super) struct Xor;

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
pub(super) struct Shift {
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
pub(super) struct NetOnly;

impl Interceptor for NetOnly {
    const NAME: &'static std::ffi::CStr = c"net-only";
    const DEVICES: u32 = DeviceKind::Net.mask();
    fn create(_: CreateContext<'_>) -> Result<Self, String> {
        Ok(NetOnly)
    }
}

/// Shrinks the disk without declaring that it stays in the path.
pub(super) struct BadShrink;

impl Interceptor for BadShrink {
    const NAME: &'static std::ffi::CStr = c"bad-shrink";
    fn create(_: CreateContext<'_>) -> Result<Self, String> {
        Ok(BadShrink)
    }
    fn capacity(&self) -> Option<u64> {
        Some(512)
    }
}

/// Xor that owns its format (like the C example): it may only be loaded at run time onto
/// fresh layers and never removed once it has written.
pub(super) struct OwnedXor;

impl Interceptor for OwnedXor {
    const NAME: &'static std::ffi::CStr = c"owned-xor";
    const FLAGS: u32 = abi::F_MODIFIES_DATA | abi::F_KEEP_WHEN_DISABLED | abi::F_OWNS_FORMAT;

    fn create(_: CreateContext<'_>) -> Result<Self, String> {
        Ok(OwnedXor)
    }

    fn pre(&self, req: &mut Request<'_>, s: &mut Slot) -> Decision {
        Xor.pre(req, s)
    }

    fn post(&self, req: &mut Request<'_>, s: Slot, status: Status) -> Status {
        Xor.post(req, s, status)
    }
}

/// Fails any request whose post hook does not get the slot its pre hook set: a request
/// split across a chain edit would show here.
pub(super) struct Paired;

impl Interceptor for Paired {
    const NAME: &'static std::ffi::CStr = c"paired";

    fn create(_: CreateContext<'_>) -> Result<Self, String> {
        Ok(Paired)
    }

    fn pre(&self, _: &mut Request<'_>, slot: &mut Slot) -> Decision {
        *slot = Some(Box::new(0x5eed_u32));
        Decision::Continue
    }

    fn post(&self, _: &mut Request<'_>, slot: Slot, status: Status) -> Status {
        match slot.and_then(|s| s.downcast::<u32>().ok()) {
            Some(v) if *v == 0x5eed => status,
            _ => Status::IoError,
        }
    }
}

/// Which thread ran each hook, by instance id: `(hook, thread name)` in call order.
pub(super) static THREADS: std::sync::Mutex<Vec<(String, String, String)>> =
    std::sync::Mutex::new(Vec::new());

fn record_thread(id: &str, hook: &str) {
    let name = std::thread::current().name().unwrap_or("?").to_string();
    THREADS
        .lock()
        .unwrap()
        .push((id.to_string(), hook.to_string(), name));
}

/// Records the calling thread of every hook; does its own I/O in create, pre and destroy
/// (so the layers below it record theirs too), and holds data (stays when disabled).
pub(super) struct Threads {
    id: String,
    lower: Lower,
}

impl Interceptor for Threads {
    const NAME: &'static std::ffi::CStr = c"threads";
    const FLAGS: u32 = abi::F_KEEP_WHEN_DISABLED;

    fn create(ctx: CreateContext<'_>) -> Result<Self, String> {
        let id = ctx.instance_id.to_string();
        record_thread(&id, "create");
        let mut block = [0u8; 512];
        ctx.lower.read(0, &mut block).map_err(|e| e.to_string())?;
        Ok(Threads {
            id,
            lower: ctx.lower,
        })
    }

    fn pre(&self, req: &mut Request<'_>, _: &mut Slot) -> Decision {
        record_thread(&self.id, "pre");
        if req.kind() == RequestKind::Flush && self.lower.flush().is_err() {
            return Decision::Fail;
        }
        Decision::Continue
    }

    fn post(&self, _: &mut Request<'_>, _: Slot, status: Status) -> Status {
        record_thread(&self.id, "post");
        status
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        record_thread(&self.id, "destroy");
        let _ = self.lower.flush();
    }
}

/// Owns its format yet would be skipped while disabled (no KEEP_WHEN_DISABLED).
pub(super) struct OwnsButSkips;

impl Interceptor for OwnsButSkips {
    const NAME: &'static std::ffi::CStr = c"owns-but-skips";
    const FLAGS: u32 = abi::F_MODIFIES_DATA | abi::F_OWNS_FORMAT;

    fn create(_: CreateContext<'_>) -> Result<Self, String> {
        Ok(OwnsButSkips)
    }
}

/// Holds each request in its pre hook until the test opens the gate (a request in flight
/// above the instances below it).
pub(super) static GATE: (std::sync::Mutex<bool>, std::sync::Condvar) =
    (std::sync::Mutex::new(false), std::sync::Condvar::new());

pub(super) struct Gate;

impl Interceptor for Gate {
    const NAME: &'static std::ffi::CStr = c"gate";

    fn create(_: CreateContext<'_>) -> Result<Self, String> {
        Ok(Gate)
    }

    fn pre(&self, _: &mut Request<'_>, _: &mut Slot) -> Decision {
        let (open, cv) = &GATE;
        let mut open = open.lock().unwrap();
        while !*open {
            open = cv.wait(open).unwrap();
        }
        Decision::Continue
    }
}

/// Owns its format and handles discard: answers a discard itself (`{"pass": false}`), or
/// wrongly passes it down (`{"pass": true}`).
pub(super) struct OwnedDiscard {
    pass: bool,
}

impl Interceptor for OwnedDiscard {
    const NAME: &'static std::ffi::CStr = c"owned-discard";
    const FLAGS: u32 = abi::F_KEEP_WHEN_DISABLED | abi::F_OWNS_FORMAT | abi::F_HANDLES_DISCARD;

    fn create(ctx: CreateContext<'_>) -> Result<Self, String> {
        Ok(OwnedDiscard {
            pass: ctx.config["pass"].as_bool().unwrap_or(false),
        })
    }

    fn pre(&self, req: &mut Request<'_>, _: &mut Slot) -> Decision {
        match req.kind() {
            RequestKind::Discard | RequestKind::WriteZeroes if !self.pass => Decision::Complete,
            _ => Decision::Continue,
        }
    }
}

/// Checks itself: clean unless its config says how many problems to report.
pub(super) struct SelfChecking {
    problems: u64,
}

impl Interceptor for SelfChecking {
    const NAME: &'static std::ffi::CStr = c"self-checking";

    fn create(ctx: CreateContext<'_>) -> Result<Self, String> {
        Ok(SelfChecking {
            problems: ctx.config["problems"].as_u64().unwrap_or(0),
        })
    }

    fn check(&self) -> Option<interceptor_sdk::CheckReport> {
        let mut r = interceptor_sdk::CheckReport::default();
        r.details.insert("blocks_checked".into(), 8.into());
        r.problems = (0..self.problems)
            .map(|i| format!("block {i} is bad"))
            .collect();
        Some(r)
    }
}

/// Declares `F_CONCURRENT` and passes everything through, recording each pre hook's
/// thread (its name) in the log its config names.
pub(super) struct Concurrent {
    log: String,
}

impl Interceptor for Concurrent {
    const NAME: &'static std::ffi::CStr = c"concurrent";
    const FLAGS: u32 = abi::F_CONCURRENT;

    fn create(ctx: CreateContext<'_>) -> Result<Self, String> {
        let log = ctx.config["log"].as_str().ok_or("no log")?.to_string();
        Ok(Concurrent { log })
    }

    fn pre(&self, _: &mut Request<'_>, _: &mut Slot) -> Decision {
        let name = std::thread::current().name().unwrap_or("").to_string();
        super::log(&self.log, name);
        Decision::Continue
    }
}
