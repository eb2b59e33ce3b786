//! The JSON answers, built from the live chains. Shapes are specified in `docs/api.yaml`.

use crate::{ApiState, Disk, NetCard};
use compat::Instance;
use serde::Serialize;
use serde_json::{json, Value};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

pub(crate) fn json_body(
    v: &impl Serialize,
) -> ([(axum::http::HeaderName, &'static str); 1], Vec<u8>) {
    let bytes = serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec());
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        bytes,
    )
}

pub(crate) fn vm(state: &ApiState) -> Value {
    let i = state.vm.info();
    json!({
        "state": i.state,
        "vcpus": i.vcpus,
        "memory_mib": i.memory_mib,
        "uptime_secs": i.uptime.as_secs_f64(),
    })
}

/// Each queue's figures as an object, queue 0 first.
fn queue_values(figures: &crate::QueueFigures) -> Vec<Value> {
    figures()
        .into_iter()
        .map(|q| Value::Object(q.into_iter().map(|(k, v)| (k.into(), json!(v))).collect()))
        .collect()
}

pub(crate) fn devices(state: &ApiState) -> Value {
    let list: Vec<Value> = state
        .disks
        .iter()
        .map(|d| {
            let snapshot = d.stack.snapshot();
            let chain: Vec<Value> = snapshot
                .layers()
                .iter()
                .map(|l| json!({ "id": l.id(), "plugin": l.plugin().name(), "enabled": l.enabled() }))
                .collect();
            let c = snapshot.counters();
            let queues = queue_values(&d.queues);
            json!({
                "id": d.id,
                "kind": "block",
                "read_only": d.read_only,
                "capacity_bytes": d.stack.capacity(),
                "requests": c.requests.load(Relaxed),
                "errors": c.errors.load(Relaxed),
                "completed_without_driver": c.completed_without_driver.load(Relaxed),
                "started_on_pool": c.started_on_pool.load(Relaxed),
                "refused": c.refused.load(Relaxed),
                "chain": chain,
                "queues": queues,
            })
        })
        .collect();
    let nets = state.nets.iter().map(|n| {
        let chain: Vec<Value> = n
            .chain
            .layers()
            .iter()
            .map(|l| json!({ "id": l.id(), "plugin": l.plugin().name(), "enabled": l.enabled() }))
            .collect();
        let queues = queue_values(&n.queues);
        let mut v = json!({
            "id": n.id,
            "kind": "net",
            "tap": n.tap,
            "mac": n.mac,
            "chain": chain,
            "queues": queues,
        });
        for (k, c) in (n.counters)() {
            v[k] = json!(c);
        }
        v
    });
    Value::Array(list.into_iter().chain(nets).collect())
}

/// A device an instance serves.
#[derive(Clone, Copy)]
pub(crate) enum Device<'a> {
    Disk(&'a Disk),
    Net(&'a NetCard),
}

impl Device<'_> {
    pub(crate) fn id(&self) -> &str {
        match self {
            Device::Disk(d) => &d.id,
            Device::Net(n) => &n.id,
        }
    }

    /// The chain, top to bottom.
    pub(crate) fn layers(&self) -> Vec<Arc<Instance>> {
        match self {
            Device::Disk(d) => d.stack.snapshot().layers().to_vec(),
            Device::Net(n) => n.chain.layers().as_ref().clone(),
        }
    }
}

/// Every device, disks first.
pub(crate) fn all_devices(state: &ApiState) -> impl Iterator<Item = Device<'_>> {
    state
        .disks
        .iter()
        .map(Device::Disk)
        .chain(state.nets.iter().map(Device::Net))
}

/// Every instance named `id`, with its device and position (an id may serve several
/// devices).
pub(crate) fn instances<'a>(
    state: &'a ApiState,
    id: &str,
) -> Vec<(Device<'a>, usize, Arc<Instance>)> {
    let mut found = Vec::new();
    for d in all_devices(state) {
        let layers = d.layers();
        if let Some(pos) = layers.iter().position(|l| l.id() == id) {
            found.push((d, pos, layers[pos].clone()));
        }
    }
    found
}

/// Instance ids in the order they first appear (device order, top to bottom).
pub(crate) fn ids(state: &ApiState) -> Vec<String> {
    let mut ids: Vec<String> = Vec::new();
    for d in all_devices(state) {
        for l in d.layers() {
            if !ids.iter().any(|i| i == l.id()) {
                ids.push(l.id().to_string());
            }
        }
    }
    ids
}

/// Every flag the plugin declares in its table, by name (the ABI's `F_*`, lower case).
fn flags(i: &Instance) -> Vec<&'static str> {
    use compat::abi;
    let declared = i.plugin().flags();
    [
        (abi::F_MODIFIES_DATA, "modifies_data"),
        (abi::F_KEEP_WHEN_DISABLED, "keep_when_disabled"),
        (abi::F_OWNS_FORMAT, "owns_format"),
        (abi::F_HANDLES_DISCARD, "handles_discard"),
        (abi::F_NET_PLAIN_FRAMES, "net_plain_frames"),
        (abi::F_CONCURRENT, "concurrent"),
    ]
    .into_iter()
    .filter(|(bit, _)| declared & bit != 0)
    .map(|(_, name)| name)
    .collect()
}

pub(crate) fn counters(i: &Instance) -> Value {
    let c = i.counters();
    let q = |p: f64| c.latency.quantile(p);
    json!({
        "requests": c.requests.load(Relaxed),
        "bytes": c.bytes.load(Relaxed),
        "writes": c.writes.load(Relaxed),
        "errors": c.errors.load(Relaxed),
        "completed_without_driver": c.completed.load(Relaxed),
        "latency_ns": {
            "count": c.latency.count(),
            "p50": q(0.5),
            "p90": q(0.9),
            "p99": q(0.99),
            "p999": q(0.999),
        },
    })
}

/// One interceptor, or `None` if no device has it.
pub(crate) fn interceptor(state: &ApiState, id: &str) -> Option<Value> {
    let found = instances(state, id);
    let (_, _, first) = found.first()?;
    let plugin = first.plugin();
    let devices: Vec<Value> = found
        .iter()
        .map(|(d, pos, i)| {
            json!({
                "device": d.id(),
                "position": pos,
                "enabled": i.enabled(),
                "counters": counters(i),
                "stats": i.plugin_stats().unwrap_or_else(|e| json!({ "error": e })),
            })
        })
        .collect();
    Some(json!({
        "id": id,
        "plugin": plugin.name(),
        "path": plugin.path().display().to_string(),
        "blake3": plugin.blake3(),
        "abi_version": plugin.abi_version(),
        "flags": flags(first),
        "enabled": found.iter().all(|(_, _, i)| i.enabled()),
        "devices": devices,
    }))
}

pub(crate) fn interceptors(state: &ApiState) -> Value {
    Value::Array(
        ids(state)
            .iter()
            .filter_map(|id| interceptor(state, id))
            .collect(),
    )
}
