//! Opening the network cards: each `[[net]]` becomes a tap under its chain of interceptor
//! instances, built on the card's own thread (which calls every hook of the chain from
//! then on). Taps are opened here, before any seccomp filter and before the VM exists, so
//! every refusal is a config error (exit 2) naming the entry.

use crate::config::{ConfigError, VmConfig};
use compat::{IoThread, NetChain, PluginRegistry, ThreadStart};
use devices::virtio::net::{NetCounters, Tap};
use std::sync::{Arc, Mutex};

/// A network card ready for its device model.
pub struct Nic {
    pub id: String,
    pub mac: [u8; 6],
    /// As the config writes it.
    pub mac_text: String,
    pub mtu: u16,
    /// Until the device model takes it.
    pub tap: Mutex<Option<Tap>>,
    pub tap_name: String,
    pub chain: Arc<NetChain>,
    pub io: Arc<IoThread>,
    /// The device's counters.
    pub counters: Arc<NetCounters>,
    /// Its queues' ring positions and what it holds (receive, then transmit).
    pub queue_stats: Arc<devices::virtio::queue_stats::QueueStats>,
}

/// Opens every `[[net]]` of a validated config.
pub fn open_nets(
    cfg: &VmConfig,
    file: &str,
    registry: &PluginRegistry,
    on_start: Option<ThreadStart>,
) -> Result<Vec<Nic>, ConfigError> {
    let invalid = |field: String, message: String| ConfigError::Invalid {
        file: file.to_string(),
        field,
        message,
    };
    let mut nics = Vec::new();
    for (i, n) in cfg.net.iter().enumerate() {
        let mac = n
            .mac_bytes()
            .map_err(|m| invalid(format!("net[{i}].mac"), m))?;
        let tap = Tap::open(&n.tap).map_err(|e| invalid(format!("net[{i}].tap"), e.to_string()))?;
        let mut specs = Vec::new();
        for id in &n.interceptors {
            // validate() guarantees every id names an [[interceptor]].
            let Some((j, ic)) = cfg
                .interceptor
                .iter()
                .enumerate()
                .find(|(_, c)| &c.id == id)
            else {
                continue;
            };
            let spec = crate::storage::instance_spec(registry, ic)
                .map_err(|m| invalid(format!("interceptor[{j}] ({id})"), m))?;
            specs.push(spec);
        }
        let io = IoThread::spawn(&n.id, on_start.clone())
            .map_err(|e| invalid(format!("net[{i}]"), format!("cannot start its thread: {e}")))?;
        let (id, chain_specs) = (n.id.clone(), specs);
        let built = io
            .run(move || NetChain::build(&id, &chain_specs))
            .map_err(|e| invalid(format!("net[{i}]"), e.to_string()))?;
        let chain = built.map_err(|e| {
            let at = e
                .instance
                .as_deref()
                .map_or(format!("net[{i}].interceptors"), |id| {
                    let j = cfg.interceptor.iter().position(|c| c.id == id).unwrap_or(0);
                    format!("interceptor[{j}] ({id})")
                });
            invalid(at, e.to_string())
        })?;
        let headroom = chain.headroom();
        let mtu = n.link_mtu();
        if u32::from(mtu) < u32::from(devices::virtio::net::MIN_MTU) + headroom {
            return Err(invalid(
                format!("net[{i}].mtu"),
                format!(
                    "{mtu} less the interceptors' {headroom} bytes of headroom is under {}",
                    devices::virtio::net::MIN_MTU
                ),
            ));
        }
        nics.push(Nic {
            id: n.id.clone(),
            mac,
            mac_text: n.mac.to_ascii_lowercase(),
            mtu,
            tap: Mutex::new(Some(tap)),
            tap_name: n.tap.clone(),
            chain: Arc::new(chain),
            io: Arc::new(io),
            counters: Arc::default(),
            queue_stats: Arc::default(),
        });
    }
    Ok(nics)
}

/// One line per card (its counters) and per instance on it (the shim's counters and the
/// plugin's own stats), for the exit report.
pub fn report(nics: &[Nic]) -> Vec<String> {
    let mut lines = Vec::new();
    for n in nics {
        let fields: Vec<String> = n
            .counters
            .fields()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        lines.push(format!(
            "net {} (tap {}): {}",
            n.id,
            n.tap_name,
            fields.join(" ")
        ));
        for layer in n.chain.layers().iter() {
            lines.push(crate::storage::instance_line(layer, &n.id));
        }
    }
    lines
}
