//! What each interceptor of a run did, as the vmm reported it when it exited (one
//! `vmm: interceptor ID on DISK: ... stats={...}` line per instance), and what `vmm-img
//! info` says of the disk afterwards: the bench prints both after its tables.

use std::path::Path;

/// One instance's stats at the vmm's exit.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LayerStats {
    pub id: String,
    pub disk: String,
    pub stats: serde_json::Value,
}

/// Every instance's line in a run's output, in the order the vmm printed them (top first).
pub fn from_transcript(transcript: &str) -> Vec<LayerStats> {
    transcript
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find("vmm: interceptor ")? + "vmm: interceptor ".len()..];
            let (id, rest) = rest.split_once(" on ")?;
            let (disk, rest) = rest.split_once(": ")?;
            let json = &rest[rest.find("stats=")? + "stats=".len()..];
            let stats = serde_json::from_str(json.trim()).ok()?;
            Some(LayerStats {
                id: id.to_string(),
                disk: disk.to_string(),
                stats,
            })
        })
        .collect()
}

/// The figures that say what a layer did, where its stats have them, in this order.
const SHOWN: &[(&str, &str)] = &[
    ("hit_ratio", "cache hit ratio"),
    ("hits", "hits"),
    ("write_back_requests", "write-back requests"),
    ("dedup_hits", "dedup hits"),
    ("logical_bytes", "logical bytes"),
    ("physical_bytes", "stored bytes"),
    ("ratio", "ratio"),
    ("zstd_ratio", "zstd ratio"),
    ("free_bytes", "free bytes"),
    ("reclaimed_bytes", "reclaimed bytes"),
    ("blocks_encrypted", "blocks encrypted"),
    ("auth_failures", "auth failures"),
    ("check_failures", "check failures"),
    ("errors", "errors"),
];

/// One line for a layer: `id: cache hit ratio 0.42, hits 1234, ...`.
pub fn summary(l: &LayerStats) -> String {
    let figures: Vec<String> = SHOWN
        .iter()
        .filter_map(|(k, name)| l.stats.get(*k).map(|v| format!("{name} {v}")))
        .collect();
    format!("{}: {}", l.id, figures.join(", "))
}

/// `vmm-img info DISK --interceptors CHAIN` (the binary beside this one), or why not.
pub fn image_info(disk: &Path, chain: &Path) -> String {
    let bin = std::env::current_exe()
        .map(|e| e.with_file_name("vmm-img"))
        .unwrap_or_else(|_| "vmm-img".into());
    match std::process::Command::new(&bin)
        .arg("info")
        .arg(disk)
        .arg("--interceptors")
        .arg(chain)
        .output()
    {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        Ok(o) => format!(
            "vmm-img info failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => format!("{}: {e}", bin.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_lines_are_read_from_the_vmm_output() {
        let t = "guest| x\nvmm: interceptor dedup on data0: requests=3 bytes=8 errors=0 \
                 completed=3 stats={\"dedup_hits\":7,\"ratio\":2.5}\nother\n";
        let v = from_transcript(t);
        assert_eq!(v.len(), 1);
        assert_eq!((v[0].id.as_str(), v[0].disk.as_str()), ("dedup", "data0"));
        assert_eq!(summary(&v[0]), "dedup: dedup hits 7, ratio 2.5");
    }
}
