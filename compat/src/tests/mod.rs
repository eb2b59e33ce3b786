//! The shim's rules, checked with interceptors linked into the test (the SDK's tables
//! without a shared object): ordering, continue/complete/fail and panics (`hooks.rs`),
//! enable/disable and pre/post pairing under toggles (`toggles.rs`), bounce buffers, the
//! layers below and per-instance state (`data.rs`), refusals (`refusals.rs`). The test
//! plugins are in `plugins.rs`; the helpers here.

mod data;
mod exec;
mod hooks;
mod live;
mod plugins;
mod refusals;
mod toggles;

use crate::*;
use interceptor_sdk::{abi, static_table};
use plugins::Recorder;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A RAM disk that remembers where its last buffer lived (to see copies).
pub(crate) struct MemDisk {
    pub(crate) data: Mutex<Vec<u8>>,
    pub(crate) calls: AtomicU64,
    pub(crate) last_base: AtomicUsize,
}

impl MemDisk {
    pub(crate) fn new(bytes: usize) -> Arc<MemDisk> {
        Arc::new(MemDisk {
            data: Mutex::new(vec![0; bytes]),
            calls: AtomicU64::new(0),
            last_base: AtomicUsize::new(0),
        })
    }
}

impl BlockBackend for MemDisk {
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
