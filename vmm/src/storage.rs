//! Opening the disks: each `[[block]]` becomes a backend driver under its chain of
//! interceptor instances. Plugins are loaded here, before the VM exists, so every refusal
//! is a config error (exit 2) naming the file and the entry.

use crate::config::{ConfigError, InterceptorConfig, VmConfig};
use compat::{BlockStack, InstanceSpec, LiveStack, PluginRegistry};
use devices::virtio::block::RawFile;
use std::collections::HashMap;
use std::sync::Arc;

/// A disk ready for its device model.
pub struct Disk {
    pub id: String,
    pub read_only: bool,
    pub stack: Arc<LiveStack>,
}

fn instance_spec(
    registry: &PluginRegistry,
    ic: &InterceptorConfig,
) -> Result<InstanceSpec, String> {
    let plugin = registry
        .load(&ic.path, ic.blake3.as_deref())
        .map_err(|e| e.to_string())?;
    let config_json = serde_json::to_string(&ic.config).map_err(|e| format!("config: {e}"))?;
    Ok(InstanceSpec {
        id: ic.id.clone(),
        plugin,
        config_json,
        enabled: ic.enabled,
    })
}

/// Opens every disk of a validated config and builds its stack.
pub fn open_disks(
    cfg: &VmConfig,
    file: &str,
    registry: &PluginRegistry,
) -> Result<Vec<Disk>, ConfigError> {
    let invalid = |field: String, message: String| ConfigError::Invalid {
        file: file.to_string(),
        field,
        message,
    };
    let mut specs = HashMap::new();
    for (i, ic) in cfg.interceptor.iter().enumerate() {
        let spec = instance_spec(registry, ic)
            .map_err(|m| invalid(format!("interceptor[{i}] ({})", ic.id), m))?;
        specs.insert(ic.id.as_str(), (i, spec));
    }
    let mut disks = Vec::new();
    for (i, b) in cfg.block.iter().enumerate() {
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .write(!b.read_only)
            .open(&b.path)
            .and_then(|f| RawFile::new(f, b.read_only, &b.id))
            .map_err(|e| {
                invalid(
                    format!("block[{i}].path"),
                    format!("{}: {e}", b.path.display()),
                )
            })?;
        let mut chain = Vec::new();
        for id in &b.interceptors {
            // validate() guarantees every id names an [[interceptor]].
            if let Some((_, spec)) = specs.get(id.as_str()) {
                chain.push(spec.clone());
            }
        }
        let stack = BlockStack::build(&b.id, Arc::new(opened), &chain).map_err(|e| {
            let at = e
                .instance
                .as_deref()
                .and_then(|id| specs.get(id))
                .map_or(format!("block[{i}].interceptors"), |(n, s)| {
                    format!("interceptor[{n}] ({})", s.id)
                });
            invalid(at, e.to_string())
        })?;
        disks.push(Disk {
            id: b.id.clone(),
            read_only: b.read_only,
            stack: Arc::new(LiveStack::new(stack)),
        });
    }
    Ok(disks)
}

/// One line per instance: its counters and the plugin's own stats.
pub fn report(disks: &[Disk]) -> Vec<String> {
    let mut lines = Vec::new();
    for d in disks {
        for layer in d.stack.snapshot().layers() {
            let c = layer.counters();
            let ld =
                |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            let stats = layer
                .plugin_stats()
                .unwrap_or_else(|e| serde_json::json!({ "error": e }));
            lines.push(format!(
                "interceptor {} on {}: requests={} bytes={} errors={} completed={} stats={stats}",
                layer.id(),
                d.id,
                ld(&c.requests),
                ld(&c.bytes),
                ld(&c.errors),
                ld(&c.completed),
            ));
        }
    }
    lines
}
