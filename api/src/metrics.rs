//! `GET /metrics`: the same counters in Prometheus' text format (version 0.0.4). Each
//! family's HELP and TYPE lines come first, then its samples.

use crate::ApiState;
use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;

/// A label value with `\`, `"` and newlines escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A network card's counters as families: `vmm_net_<counter>_total`.
const NET_COUNTERS: [(&str, &str); 10] = [
    (
        "vmm_net_rx_frames_total",
        "Frames the card delivered to the guest.",
    ),
    (
        "vmm_net_rx_bytes_total",
        "Bytes of those frames (without the virtio header).",
    ),
    (
        "vmm_net_rx_dropped_total",
        "Frames for the guest dropped (its buffers, the chain, too many answers).",
    ),
    (
        "vmm_net_rx_taken_total",
        "Frames for the guest an interceptor took.",
    ),
    (
        "vmm_net_rx_bad_buffers_total",
        "RX buffers of the guest refused as malformed.",
    ),
    (
        "vmm_net_tx_frames_total",
        "Frames the card wrote to its tap.",
    ),
    ("vmm_net_tx_bytes_total", "Bytes of those frames."),
    (
        "vmm_net_tx_dropped_total",
        "Frames from the guest dropped (a full tap, the chain).",
    ),
    (
        "vmm_net_tx_taken_total",
        "Frames from the guest an interceptor took.",
    ),
    (
        "vmm_net_tx_bad_chains_total",
        "TX chains of the guest refused as malformed.",
    ),
];

/// The family name of card counter `k`.
fn net_name(k: &str) -> String {
    format!("vmm_net_{k}_total")
}

struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    samples: Vec<String>,
}

fn family(name: &'static str, kind: &'static str, help: &'static str) -> Family {
    Family {
        name,
        kind,
        help,
        samples: Vec::new(),
    }
}

pub(crate) fn render(state: &ApiState) -> String {
    let info = state.vm.info();
    let mut uptime = family(
        "vmm_uptime_seconds",
        "gauge",
        "Seconds since the guest started.",
    );
    uptime
        .samples
        .push(format!("{}", info.uptime.as_secs_f64()));
    let mut vcpus = family("vmm_vcpus", "gauge", "vCPUs of the guest.");
    vcpus.samples.push(format!("{}", info.vcpus));
    let mut dev_requests = family(
        "vmm_block_requests_total",
        "counter",
        "Requests a device sent into its chain.",
    );
    let mut dev_errors = family(
        "vmm_block_errors_total",
        "counter",
        "Requests the guest saw fail.",
    );
    let mut dev_answered = family(
        "vmm_block_completed_without_driver_total",
        "counter",
        "Requests an interceptor answered without the backend.",
    );
    let mut dev_pooled = family(
        "vmm_block_started_on_pool_total",
        "counter",
        "Requests whose pre hooks ran on the disk's hook pool.",
    );
    let mut dev_refused = family(
        "vmm_block_refused_total",
        "counter",
        "Requests the device refused as malformed before its chain, and queues the guest broke.",
    );
    let requests = family(
        "vmm_interceptor_requests_total",
        "counter",
        "Requests through the instance.",
    );
    let bytes = family(
        "vmm_interceptor_bytes_total",
        "counter",
        "Data bytes of those requests.",
    );
    let errors = family(
        "vmm_interceptor_errors_total",
        "counter",
        "Requests the instance failed.",
    );
    let completed = family(
        "vmm_interceptor_completed_total",
        "counter",
        "Requests the instance answered without the layers below.",
    );
    let enabled = family(
        "vmm_interceptor_enabled",
        "gauge",
        "1 if the instance is enabled.",
    );
    let latency = family(
        "vmm_interceptor_latency_seconds",
        "summary",
        "Time from the instance's pre hook to its post hook, the layers below included.",
    );
    let plugin = family(
        "vmm_interceptor_stat",
        "gauge",
        "A number the instance's plugin reports in its stats (GET /interceptors/{id}), named \
         by its JSON path with `_` between keys.",
    );
    let mut per_layer = PerLayer {
        requests,
        bytes,
        errors,
        completed,
        enabled,
        latency,
        plugin,
    };
    for d in &state.disks {
        let snapshot = d.stack.snapshot();
        let c = snapshot.counters();
        let dev = format!("{{device=\"{}\"}}", label(&d.id));
        dev_requests
            .samples
            .push(format!("{dev} {}", c.requests.load(Relaxed)));
        dev_errors
            .samples
            .push(format!("{dev} {}", c.errors.load(Relaxed)));
        dev_answered.samples.push(format!(
            "{dev} {}",
            c.completed_without_driver.load(Relaxed)
        ));
        dev_pooled
            .samples
            .push(format!("{dev} {}", c.started_on_pool.load(Relaxed)));
        dev_refused
            .samples
            .push(format!("{dev} {}", c.refused.load(Relaxed)));
        for l in snapshot.layers() {
            layer_samples(&mut per_layer, &d.id, l);
        }
    }
    let mut net = NET_COUNTERS.map(|(name, help)| family(name, "counter", help));
    for n in &state.nets {
        let dev = format!("{{device=\"{}\"}}", label(&n.id));
        for (k, v) in (n.counters)() {
            if let Some(i) = NET_COUNTERS
                .iter()
                .position(|(name, _)| net_name(k) == *name)
            {
                net[i].samples.push(format!("{dev} {v}"));
            }
        }
        for l in n.chain.layers().iter() {
            layer_samples(&mut per_layer, &n.id, l);
        }
    }
    let PerLayer {
        requests,
        bytes,
        errors,
        completed,
        enabled,
        latency,
        plugin,
    } = per_layer;
    let mut text = String::new();
    for f in [
        uptime,
        vcpus,
        dev_requests,
        dev_errors,
        dev_answered,
        dev_pooled,
        dev_refused,
        requests,
        bytes,
        errors,
        completed,
        enabled,
        latency,
        plugin,
    ]
    .into_iter()
    .chain(net)
    {
        let _ = writeln!(
            text,
            "# HELP {} {}\n# TYPE {} {}",
            f.name, f.help, f.name, f.kind
        );
        for s in &f.samples {
            // A sample is the family's name, then labels (or a suffix such as `_count`).
            let sep = if s.starts_with(['{', '_']) { "" } else { " " };
            let _ = writeln!(text, "{}{sep}{s}", f.name);
        }
    }
    text
}

/// The families every instance has a sample in.
struct PerLayer {
    requests: Family,
    bytes: Family,
    errors: Family,
    completed: Family,
    enabled: Family,
    latency: Family,
    plugin: Family,
}

/// Instance `l`'s samples, on `device`.
fn layer_samples(f: &mut PerLayer, device: &str, l: &compat::Instance) {
    let at = format!(
        "device=\"{}\",interceptor=\"{}\"",
        label(device),
        label(l.id())
    );
    let k = l.counters();
    f.requests
        .samples
        .push(format!("{{{at}}} {}", k.requests.load(Relaxed)));
    f.bytes
        .samples
        .push(format!("{{{at}}} {}", k.bytes.load(Relaxed)));
    f.errors
        .samples
        .push(format!("{{{at}}} {}", k.errors.load(Relaxed)));
    f.completed
        .samples
        .push(format!("{{{at}}} {}", k.completed.load(Relaxed)));
    f.enabled
        .samples
        .push(format!("{{{at}}} {}", u8::from(l.enabled())));
    for q in [0.5, 0.9, 0.99] {
        if let Some(ns) = k.latency.quantile(q) {
            let secs = ns as f64 / 1e9;
            f.latency
                .samples
                .push(format!("{{{at},quantile=\"{q}\"}} {secs}"));
        }
    }
    let count = k.latency.count();
    f.latency.samples.push(format!("_count{{{at}}} {count}"));
    if let Ok(stats) = l.plugin_stats() {
        let mut leaves = Vec::new();
        numeric_leaves(&stats, String::new(), 0, &mut leaves);
        for (name, v) in leaves {
            f.plugin
                .samples
                .push(format!("{{{at},stat=\"{}\"}} {v}", label(&name)));
        }
    }
}

/// The numbers (and booleans, as 0 or 1) in a plugin's stats, each named by its path; text
/// and arrays are left out, and nesting stops at a depth no plugin needs.
fn numeric_leaves(v: &serde_json::Value, path: String, depth: u32, out: &mut Vec<(String, f64)>) {
    use serde_json::Value;
    match v {
        Value::Number(n) => {
            if let Some(f) = n.as_f64().filter(|f| f.is_finite()) {
                out.push((path, f));
            }
        }
        Value::Bool(b) => out.push((path, f64::from(u8::from(*b)))),
        Value::Object(m) if depth < 4 => {
            for (k, child) in m {
                let name = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}_{k}")
                };
                numeric_leaves(child, name, depth + 1, out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::numeric_leaves;

    #[test]
    fn plugin_stats_become_named_numbers() {
        let v = serde_json::json!({
            "logical_bytes": 8192,
            "ratio": 2.5,
            "read_only": true,
            "mode": "write-back",
            "by_class": { "zstd": { "blocks": 3 } },
            "list": [1, 2],
        });
        let mut out = Vec::new();
        numeric_leaves(&v, String::new(), 0, &mut out);
        out.sort_by(|a, b| a.0.cmp(&b.0));
        let names: Vec<(&str, f64)> = out.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(
            names,
            [
                ("by_class_zstd_blocks", 3.0),
                ("logical_bytes", 8192.0),
                ("ratio", 2.5),
                ("read_only", 1.0),
            ]
        );
    }
}
