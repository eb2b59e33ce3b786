//! The plugin boundary: a plugin whose every answer is fuzz input, in a chain of one to
//! three instances over a RAM disk. `create` returns a handle or NULL with any error text
//! (terminated or not) and does its own I/O through the layers below; `pre` and `post`
//! return any decision or status, fill the buffers they may fill, keep per-request state
//! in the slot and do their own I/O too; `capacity` answers anything; `stats` writes any
//! bytes and claims any length. A few tables are broken (wrong ABI version, no name, a
//! missing hook, unknown flags, another device kind).
//!
//! The plugin checks what the shim promises it: each request lies within the layers below
//! and its segments add up; `pre` and `post` pair up exactly, each `post` getting its own
//! `pre`'s slot and a valid status; nothing is called on a destroyed instance, and each
//! instance is destroyed once, after its last request. The harness checks that a refused
//! bottom instance changed no byte of the disk. Under the fuzzer ASan checks every buffer
//! the shim hands over (segments, error text, stats) for its length.

use crate::disk::MemDisk;
use crate::input::Input;
use compat::{BlockRequestKind, BlockStack, InstanceSpec, Plugin, RequestStatus, Segment};
use interceptor_abi::{self as abi, CreateArgs, InterceptorTable, Lower, Request};
use std::cell::{Cell, RefCell};
use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::Arc;

const DEVICE_ID: &str = "fz";
const MAX_REQUESTS: usize = 8;
const MAX_OWN_IO: usize = 8192;

thread_local! {
    /// The input, read by the harness and by the plugin's answers in the order they are
    /// asked for.
    static FEED: RefCell<(Vec<u8>, usize)> = const { RefCell::new((Vec::new(), 0)) };
    /// Instances created and not yet destroyed.
    static LIVE: RefCell<Vec<*const Fz>> = const { RefCell::new(Vec::new()) };
    /// Slots a `pre` filled whose `post` has not run yet.
    static SLOTS: Cell<usize> = const { Cell::new(0) };
}

/// Reads from the input. `f` must not call into the shim (the plugin's hooks read too).
fn feed<R>(f: impl FnOnce(&mut Input<'_>) -> R) -> R {
    FEED.with(|c| {
        let mut st = c.borrow_mut();
        let (data, at) = &mut *st;
        let start = (*at).min(data.len());
        let mut inp = Input::new(&data[start..]);
        let r = f(&mut inp);
        *at = at.saturating_add(inp.consumed());
        r
    })
}

const MAGIC: u64 = 0xf00d_cafe_5a5a_0001;
const DEAD: u64 = 0xdead_dead_dead_dead;

/// One instance's state.
struct Fz {
    magic: Cell<u64>,
    lower: *const Lower,
    lower_capacity: u64,
    flags: u32,
    /// Slots of requests whose `pre` ran and `post` has not (NULL where `pre` left none).
    open: RefCell<Vec<*mut SlotMark>>,
}

struct SlotMark {
    magic: u64,
    owner: *const Fz,
}

const TABLES: usize = 38;

const fn table(i: usize) -> InterceptorTable {
    let mut t = InterceptorTable {
        abi_version: abi::ABI_VERSION,
        flags: (i & 7) as u32,
        supported_devices: abi::DeviceKind::Block.mask(),
        table_size: 0,
        name: c"fuzz".as_ptr(),
        create: Some(fz_create),
        pre: Some(fz_pre),
        post: Some(fz_post),
        stats: if i & 16 != 0 { Some(fz_stats) } else { None },
        destroy: Some(fz_destroy),
        capacity: if i & 8 != 0 { Some(fz_capacity) } else { None },
        check: None,
        net_headroom: 0,
        reconfigure: None,
    };
    // The broken ones.
    match i {
        32 => t.abi_version = abi::ABI_VERSION + 1,
        33 => t.name = std::ptr::null(),
        34 => t.pre = None,
        35 => t.destroy = None,
        36 => t.flags = 8,
        37 => t.supported_devices = abi::DeviceKind::Net.mask(),
        _ => {}
    }
    t
}

static TABLE: [InterceptorTable; TABLES] = {
    let mut all = [const { table(0) }; TABLES];
    let mut i = 0;
    while i < TABLES {
        all[i] = table(i);
        i += 1;
    }
    all
};

/// The instance behind a handle the shim passed; panics if it is not a live one.
unsafe fn instance<'a>(p: *mut c_void) -> &'a Fz {
    assert!(!p.is_null(), "the shim passed a NULL instance");
    let fz = p.cast::<Fz>().cast_const();
    let live = LIVE.with(|l| l.borrow().contains(&fz));
    assert!(
        live,
        "the shim called a hook on an instance that is not live"
    );
    // SAFETY: it is one of ours and live.
    let fz = unsafe { &*fz };
    assert_eq!(fz.magic.get(), MAGIC, "a destroyed instance");
    fz
}

unsafe fn c_str<'a>(p: *const c_char, what: &str) -> &'a str {
    assert!(!p.is_null(), "{what} is NULL");
    // SAFETY: the ABI promises a NUL-terminated string.
    unsafe { CStr::from_ptr(p) }.to_str().unwrap_or("")
}

/// What the shim promises about every request a hook sees.
unsafe fn check_request(fz: &Fz, req: *const Request) -> &Request {
    assert!(!req.is_null(), "a NULL request");
    // SAFETY: the shim passes a valid request for the call.
    let r = unsafe { &*req };
    assert!(
        matches!(
            r.kind,
            abi::REQ_READ | abi::REQ_WRITE | abi::REQ_FLUSH | abi::REQ_GET_ID
        ),
        "request kind {}",
        r.kind
    );
    assert_eq!(r.device_kind, abi::DeviceKind::Block as u32);
    // SAFETY: as above.
    assert_eq!(unsafe { c_str(r.device_id, "device_id") }, DEVICE_ID);
    // GET_ID's segments are the serial's buffer, not disk space.
    let end = r.offset.checked_add(r.len);
    assert!(
        r.kind == abi::REQ_GET_ID || end.is_some_and(|e| e <= fz.lower_capacity),
        "request {}+{} past the {} bytes below",
        r.offset,
        r.len,
        fz.lower_capacity
    );
    assert_eq!(
        r.flags & !(abi::REQ_F_DATA_PRIVATE | abi::REQ_F_DISABLED),
        0,
        "unknown request flags"
    );
    if fz.flags & abi::F_MODIFIES_DATA != 0 {
        assert!(
            r.flags & abi::REQ_F_DATA_PRIVATE != 0,
            "a transforming plugin sees guest memory"
        );
    }
    if r.flags & abi::REQ_F_DISABLED != 0 {
        assert!(
            fz.flags & abi::F_KEEP_WHEN_DISABLED != 0,
            "a disabled instance was called"
        );
    }
    let mut sum = 0u64;
    if r.nsegments > 0 {
        assert!(!r.segments.is_null(), "NULL segments");
        // SAFETY: the ABI promises nsegments valid segments.
        let segs = unsafe { std::slice::from_raw_parts(r.segments, r.nsegments as usize) };
        let writable = r.kind != abi::REQ_WRITE || r.flags & abi::REQ_F_DATA_PRIVATE != 0;
        let fill = feed(|i| (i.one_in(4)).then(|| i.u8()));
        for s in segs {
            sum += s.len as u64;
            if s.len == 0 {
                continue;
            }
            // SAFETY: each segment is valid for its length (ASan checks it under the fuzzer).
            let bytes = unsafe { std::slice::from_raw_parts(s.base, s.len) };
            std::hint::black_box(bytes.iter().fold(0u8, |a, &b| a ^ b));
            if let (true, Some(v)) = (writable, fill) {
                // SAFETY: a read's segments, or private ones, may be written by the hook.
                unsafe { std::ptr::write_bytes(s.base, v, s.len) };
            }
        }
    }
    assert_eq!(
        sum, r.len,
        "the segments do not add up to the request's length"
    );
    r
}

/// The plugin's own I/O through the layers below, with any offsets and lengths (buffers
/// are always as long as the length claimed, or NULL).
unsafe fn own_io(lower: *const Lower) {
    // SAFETY: the shim's table lives as long as the instance.
    let l = unsafe { &*lower };
    let ops = feed(|i| if i.u8() % 4 == 3 { 1 + i.below(3) } else { 0 });
    for _ in 0..ops {
        let (op, offset, len, null) = feed(|i| {
            let op = i.u8() % 4;
            let offset = i.interesting_u64(l.capacity);
            let len = match i.u8() % 6 {
                0 => 512,
                1 => 4096,
                2 => 0,
                3 => 1 + i.below(1024),
                _ => i.below(MAX_OWN_IO / 512 + 1) * 512,
            } as u64;
            (op, offset, len, i.one_in(16))
        });
        let mut buf = vec![0x77u8; len as usize];
        let (ptr, len) = if null {
            // NULL for no bytes is allowed; for more, the shim must refuse it.
            (std::ptr::null_mut(), feed(|i| i.u64()) % (1 << 20))
        } else {
            (buf.as_mut_ptr(), len)
        };
        // SAFETY: ptr is valid for len bytes, or NULL (which the shim must refuse).
        let status = unsafe {
            match op {
                0 => (l.read)(l.ctx, offset, ptr, len),
                1 => (l.write)(l.ctx, offset, ptr, len),
                2 => (l.flush)(l.ctx),
                _ => {
                    let level = feed(|i| i.u8() % 6) as u32;
                    let text = feed(|i| i.chunk(40).to_vec());
                    let msg =
                        CString::new(text.into_iter().filter(|&b| b != 0).collect::<Vec<_>>())
                            .unwrap_or_default();
                    (l.log)(l.ctx, level, msg.as_ptr());
                    abi::STATUS_OK
                }
            }
        };
        assert!(
            status <= abi::STATUS_UNSUPP,
            "own I/O returned status {status}"
        );
    }
}

unsafe extern "C" fn fz_create(
    args: *const CreateArgs,
    err: *mut c_char,
    err_len: usize,
) -> *mut c_void {
    assert!(!args.is_null());
    // SAFETY: the shim passes valid args for the call.
    let a = unsafe { &*args };
    // SAFETY: as above.
    unsafe {
        c_str(a.instance_id, "instance_id");
        c_str(a.config_json, "config_json");
        assert_eq!(c_str(a.device_id, "device_id"), DEVICE_ID);
    }
    assert_eq!(a.device_kind, abi::DeviceKind::Block as u32);
    assert!(!a.lower.is_null(), "no layers below");
    // SAFETY: as above; flags are the table's, which the shim checked.
    unsafe { own_io(a.lower) };
    let refuse = feed(|i| i.one_in(8));
    if refuse {
        assert!(
            !err.is_null() && err_len > 0,
            "no room for an error message"
        );
        let (text, fill) = feed(|i| (i.chunk(120).to_vec(), i.one_in(8)));
        if fill {
            // The whole buffer and no NUL.
            // SAFETY: err is writable for err_len bytes.
            unsafe { std::ptr::write_bytes(err.cast::<u8>(), b'x', err_len) };
        } else {
            let n = text.len().min(err_len);
            // SAFETY: as above; n <= err_len.
            unsafe { std::ptr::copy_nonoverlapping(text.as_ptr(), err.cast::<u8>(), n) };
        }
        return std::ptr::null_mut();
    }
    // SAFETY: checked non-NULL above.
    let lower_capacity = unsafe { (*a.lower).capacity };
    // SAFETY: checked above.
    let id = unsafe { c_str(a.instance_id, "instance_id") };
    let flags = IDS.with(|m| m.borrow().iter().find(|(i, _)| i == id).map(|x| x.1));
    let flags = flags.expect("create for an instance id the harness did not configure");
    let fz = Box::into_raw(Box::new(Fz {
        magic: Cell::new(MAGIC),
        lower: a.lower,
        lower_capacity,
        flags,
        open: RefCell::new(Vec::new()),
    }));
    LIVE.with(|l| l.borrow_mut().push(fz.cast_const()));
    fz.cast()
}

thread_local! {
    /// Each configured instance id and its table's flags (create is not told them).
    static IDS: RefCell<Vec<(String, u32)>> = const { RefCell::new(Vec::new()) };
}

unsafe extern "C" fn fz_pre(inst: *mut c_void, req: *const Request, slot: *mut *mut c_void) -> u32 {
    // SAFETY: checked by `instance` and `check_request`.
    let fz = unsafe { instance(inst) };
    // SAFETY: as above.
    unsafe { check_request(fz, req) };
    assert!(!slot.is_null(), "a NULL slot");
    // SAFETY: the slot is valid for the call.
    assert!(
        unsafe { (*slot).is_null() },
        "a slot that is not NULL before pre"
    );
    let mark = if feed(|i| i.bool()) {
        SLOTS.with(|s| s.set(s.get() + 1));
        Box::into_raw(Box::new(SlotMark {
            magic: MAGIC,
            owner: fz,
        }))
    } else {
        std::ptr::null_mut()
    };
    // SAFETY: as above.
    unsafe { *slot = mark.cast() };
    fz.open.borrow_mut().push(mark);
    // SAFETY: the table outlives the instance.
    unsafe { own_io(fz.lower) };
    feed(|i| match i.u8() % 8 {
        0 => abi::COMPLETE,
        1 => abi::FAIL,
        2 => i.u32(),
        _ => abi::CONTINUE,
    })
}

unsafe extern "C" fn fz_post(
    inst: *mut c_void,
    req: *const Request,
    slot: *mut c_void,
    status: u32,
) -> u32 {
    // SAFETY: checked by `instance` and `check_request`.
    let fz = unsafe { instance(inst) };
    // SAFETY: as above.
    unsafe { check_request(fz, req) };
    assert!(status <= abi::STATUS_UNSUPP, "post got status {status}");
    let expected = fz.open.borrow_mut().pop();
    assert!(expected.is_some(), "a post without its pre");
    assert_eq!(
        expected,
        Some(slot.cast::<SlotMark>()),
        "post got another request's slot"
    );
    if !slot.is_null() {
        // SAFETY: it is the mark this instance's pre made (checked above), freed once here.
        let mark = unsafe { Box::from_raw(slot.cast::<SlotMark>()) };
        assert!(mark.magic == MAGIC && std::ptr::eq(mark.owner, fz));
        SLOTS.with(|s| s.set(s.get() - 1));
    }
    // SAFETY: the table outlives the instance.
    unsafe { own_io(fz.lower) };
    feed(|i| match i.u8() % 8 {
        0 => abi::STATUS_OK,
        1 => abi::STATUS_IOERR,
        2 => abi::STATUS_UNSUPP,
        3 => i.u32(),
        _ => status,
    })
}

unsafe extern "C" fn fz_stats(inst: *mut c_void, buf: *mut c_char, len: usize) -> usize {
    // SAFETY: checked by `instance`.
    let _fz = unsafe { instance(inst) };
    assert!(len == 0 || !buf.is_null());
    let text: Vec<u8> = feed(|i| match i.u8() % 4 {
        0 => br#"{"requests": 1, "name": "fuzz"}"#.to_vec(),
        1 => b"[1, 2]".to_vec(),
        _ => i.chunk(200).to_vec(),
    });
    let n = text.len().min(len);
    // SAFETY: buf is writable for len bytes; n <= len.
    unsafe { std::ptr::copy_nonoverlapping(text.as_ptr(), buf.cast::<u8>(), n) };
    feed(|i| match i.u8() % 8 {
        0 => len,
        1 => len.wrapping_add(1),
        2 => usize::MAX,
        3 => 1 << 20,
        4 => i.u64() as usize,
        5 => text.len(),
        _ => n,
    })
}

unsafe extern "C" fn fz_capacity(inst: *mut c_void) -> u64 {
    // SAFETY: checked by `instance`.
    let fz = unsafe { instance(inst) };
    let below = fz.lower_capacity;
    feed(|i| match i.u8() % 10 {
        0 => u64::MAX,
        1 => below.saturating_sub(512),
        2 => below / 2 / 512 * 512,
        3 => 0,
        4 => 513,
        5 => below.saturating_add(512),
        6 => i.u64(),
        _ => below,
    })
}

unsafe extern "C" fn fz_destroy(inst: *mut c_void) {
    // SAFETY: checked by `instance`.
    let fz = unsafe { instance(inst) };
    assert!(
        fz.open.borrow().is_empty(),
        "destroyed with a request in flight"
    );
    // The plugin may use the layers below until destroy returns.
    // SAFETY: the table outlives this call.
    unsafe { own_io(fz.lower) };
    fz.magic.set(DEAD);
    let p = inst.cast::<Fz>().cast_const();
    LIVE.with(|l| l.borrow_mut().retain(|&x| x != p));
    // SAFETY: made by Box::into_raw in create, destroyed once (it is no longer live).
    drop(unsafe { Box::from_raw(inst.cast::<Fz>()) });
}

fn kind(inp: &mut Input<'_>) -> BlockRequestKind {
    inp.pick(&[
        BlockRequestKind::Read,
        BlockRequestKind::Write,
        BlockRequestKind::Read,
        BlockRequestKind::Write,
        BlockRequestKind::Flush,
        BlockRequestKind::GetId,
    ])
}

/// A request as the device makes one: sector-aligned, inside the capacity, its data in one
/// to four guest buffers cut anywhere.
fn request(stack: &BlockStack) {
    let sectors = stack.capacity() / 512;
    let (k, offset, cuts) = feed(|i| {
        let k = kind(i);
        match k {
            BlockRequestKind::Read | BlockRequestKind::Write if sectors > 0 => {
                let first = i.below(sectors.min(1 << 16) as usize) as u64;
                let n = i.below(sectors.saturating_sub(first).min(33) as usize + 1) as u64;
                let len = n * 512;
                let mut cuts = vec![0, len];
                for _ in 0..i.below(4) {
                    cuts.push(i.u32() as u64 % (len + 1));
                }
                cuts.sort_unstable();
                (k, first * 512, cuts)
            }
            BlockRequestKind::GetId => (k, 0, vec![0, 20]),
            _ => (BlockRequestKind::Flush, 0, vec![0, 0]),
        }
    });
    let len = *cuts.last().unwrap_or(&0) as usize;
    let mut buf = vec![0x33u8; len];
    let base = buf.as_mut_ptr();
    let segs: Vec<Segment> = cuts
        .windows(2)
        .filter(|w| w[1] > w[0])
        .map(|w| Segment {
            // SAFETY: w[0] < w[1] <= len: inside buf.
            base: unsafe { base.add(w[0] as usize) },
            len: (w[1] - w[0]) as usize,
        })
        .collect();
    // SAFETY: the segments lie in buf, which outlives the call; the request is inside the
    // stack's capacity.
    let status = unsafe { stack.submit(k, offset, &segs) };
    let _ = status == RequestStatus::Ok;
    let open: usize = LIVE.with(|l| {
        l.borrow()
            .iter()
            // SAFETY: live instances are valid.
            .map(|&p| unsafe { &*p }.open.borrow().len())
            .sum()
    });
    assert_eq!(
        open, 0,
        "a pre without its post after the request completed"
    );
    assert_eq!(SLOTS.with(|s| s.get()), 0, "a slot never handed back");
}

pub fn plugin_boundary(data: &[u8]) {
    FEED.with(|c| *c.borrow_mut() = (data.to_vec(), 0));
    let bytes = feed(|i| i.pick(&[64usize << 10, 4096, 512, 1000, 0, 1 << 20, 64 << 10]));
    let disk = Arc::new(MemDisk::new(bytes));
    let count = feed(|i| 1 + i.below(3));
    let mut specs = Vec::new();
    let mut flags = Vec::new();
    for n in 0..count {
        let (t, enabled, config) = feed(|i| {
            let t = if i.one_in(8) {
                32 + i.below(TABLES - 32)
            } else {
                i.below(32)
            };
            let config = if i.one_in(4) {
                String::from_utf8_lossy(i.chunk(40)).into_owned()
            } else {
                "{}".to_string()
            };
            (t, !i.one_in(4), config)
        });
        let plugin = match Plugin::from_static("fuzz", &TABLE[t]) {
            Ok(p) => p,
            // The broken tables, and flags the loader does not take together.
            Err(e) => {
                let msg = e.to_string();
                assert!(!msg.contains('\n'), "a refusal is one line: {msg:?}");
                continue;
            }
        };
        specs.push(InstanceSpec {
            id: format!("p{n}"),
            plugin,
            config_json: config,
            enabled,
        });
        flags.push(TABLE[t].flags);
    }
    IDS.with(|m| *m.borrow_mut() = specs.iter().map(|s| s.id.clone()).zip(flags).collect());
    let before = disk.image();
    match BlockStack::build(DEVICE_ID, disk.clone(), &specs) {
        Ok(stack) => {
            for _ in 0..feed(|i| i.below(MAX_REQUESTS + 1)) {
                let toggle = feed(|i| (i.one_in(4)).then(|| (usize::from(i.u8()), i.bool())));
                if let Some((n, on)) = toggle {
                    let layers = stack.layers();
                    if !layers.is_empty() {
                        layers[n % layers.len()].set_enabled(on);
                    }
                }
                request(&stack);
            }
            for layer in stack.layers() {
                if let Ok(v) = layer.plugin_stats() {
                    assert!(v.is_object(), "stats that are not an object passed: {v}");
                }
            }
            let _ = stack.flush();
            drop(stack);
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "a refusal is one line: {msg:?}");
            // The bottom instance is created first: if it is the one refused, nothing was
            // accepted, and a refused instance changes no byte of the disk.
            if e.instance.is_some() && e.instance == specs.last().map(|s| s.id.clone()) {
                assert!(
                    disk.image() == before,
                    "a refused instance changed the disk"
                );
            }
        }
    }
    let live = LIVE.with(|l| l.borrow().len());
    assert_eq!(live, 0, "instances left undestroyed");
    assert_eq!(SLOTS.with(|s| s.get()), 0, "a slot never handed back");
}
