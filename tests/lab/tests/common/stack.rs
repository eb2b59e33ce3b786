//! A plugin stack over a real file, for host tests of one plugin.

use compat::{BlockRequestKind, BlockStack, InstanceSpec, PluginRegistry, RequestStatus, Segment};
use devices::virtio::block::RawFile;
use std::path::Path;
use std::sync::Arc;

/// Opens `image` read-write under one instance `id` of the plugin at `plugin` with
/// `config`; `Err` is the stack's refusal, in words.
pub fn file_stack(
    image: &Path,
    id: &str,
    plugin: &Path,
    config: serde_json::Value,
) -> Result<Arc<BlockStack>, String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .unwrap();
    let disk = Arc::new(RawFile::new(file, false, id).unwrap());
    let spec = InstanceSpec {
        id: id.into(),
        plugin: PluginRegistry::new().load(plugin, None).unwrap(),
        config_json: config.to_string(),
        enabled: true,
    };
    BlockStack::build(id, disk, &[spec]).map_err(|e| e.to_string())
}

/// One request on `buf` at byte `offset`; its status.
pub fn io(
    stack: &BlockStack,
    kind: BlockRequestKind,
    offset: usize,
    buf: &mut [u8],
) -> RequestStatus {
    let seg = [Segment {
        base: buf.as_mut_ptr(),
        len: buf.len(),
    }];
    // SAFETY: buf outlives the call.
    unsafe { stack.submit(kind, offset as u64, &seg) }
}

/// The plugin stats of instance `id`.
pub fn stats(stack: &BlockStack, id: &str) -> serde_json::Value {
    stack.instance(id).unwrap().plugin_stats().unwrap()
}
