//! `vmm-img`: inspect a disk image without booting it, like `qemu-img info` and
//! `qemu-img check`. The image is opened read-only (and locked shared, so never while a
//! `vmm` serves it) and the disk's chain of interceptors is built over it as `vmm` builds
//! it; whatever the layers write while they open is kept in memory, never written back.
//!
//! ```text
//! vmm-img info  IMAGE [--interceptors FILE] [--json]
//! vmm-img check IMAGE [--interceptors FILE] [--json]
//! vmm-img check --config guest.toml --disk data
//! ```
//!
//! Exit status: 0 clean (or `info` done), 1 damaged (a layer's check found problems, or a
//! layer refused to open the image: the reason says which), 2 an error (no such image, a
//! bad config, a plugin that does not load), 3 damage found and worked around (a layer
//! reports it under `recovered`: nothing is lost, and a writable open rewrites it).

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use vmm::image::{self, OpenFailure, Target};

#[derive(Parser)]
#[command(
    name = "vmm-img",
    about = "Inspect and check vmm disk images without booting them"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args)]
struct Which {
    /// The image file (with --config: taken from the disk's [[block]] unless given).
    image: Option<PathBuf>,
    /// A file of [[interceptor]] entries: the image's chain, top (nearest the guest) first.
    #[arg(long, conflicts_with = "config")]
    interceptors: Option<PathBuf>,
    /// A vmm config: the chain (and image) of the disk named by --disk.
    #[arg(long, requires = "disk")]
    config: Option<PathBuf>,
    /// The [[block]] id in --config.
    #[arg(long)]
    disk: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Which layers the image holds, their formats, sizes, ratios and free space.
    Info(Which),
    /// Verify every invariant of every layer (map, refcounts, allocator, tags).
    Check(Which),
}

fn target(w: &Which) -> Result<Target, String> {
    if let Some(cfg) = &w.config {
        let disk = w.disk.as_deref().unwrap_or_default();
        let mut t = image::from_vm_config(cfg, disk)?;
        if let Some(i) = &w.image {
            t.image = i.clone();
        }
        return Ok(t);
    }
    let image = w
        .image
        .clone()
        .ok_or("name the image (or --config FILE --disk ID)")?;
    let chain = match &w.interceptors {
        Some(f) => image::chain_file(f)?,
        None => Vec::new(),
    };
    Ok(Target { image, chain })
}

/// The stats worth a line of text, in this order, where a layer reports them.
const SHOWN: &[&str] = &[
    "logical_bytes",
    "physical_bytes",
    "ratio",
    "free_bytes",
    "held_bytes",
    "unique_extents",
    "zstd_ratio",
    "raw_blocks",
    "index_entries",
    "commits",
    "generation",
    "dirty_blocks",
];

fn layers_json(opened: &image::Opened) -> Vec<serde_json::Value> {
    let layers = opened.stack.layers();
    layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let below = layers
                .get(i + 1)
                .map_or(compat::BlockBackend::capacity(&*opened.overlay), |b| b.capacity());
            let stats = l
                .plugin_stats()
                .unwrap_or_else(|e| serde_json::json!({ "error": e }));
            serde_json::json!({
                "id": l.id(),
                "plugin": l.plugin().name(),
                "format": stats.get("format").cloned().unwrap_or(serde_json::Value::Null),
                "format_version": stats.get("format_version").cloned().unwrap_or(serde_json::Value::Null),
                "capacity_bytes": l.capacity(),
                "below_bytes": below,
                "stats": stats,
            })
        })
        .collect()
}

fn print_layers(layers: &[serde_json::Value]) {
    for (i, l) in layers.iter().enumerate() {
        let format = match (l["format"].as_str(), l["format_version"].as_u64()) {
            (Some(f), Some(v)) => format!("{f} v{v}"),
            (Some(f), None) => f.to_string(),
            _ => "keeps no format of its own".into(),
        };
        println!(
            "layer {}: {} (plugin {}, {format}): {} bytes over {}",
            i + 1,
            l["id"].as_str().unwrap_or("?"),
            l["plugin"].as_str().unwrap_or("?"),
            l["capacity_bytes"],
            l["below_bytes"],
        );
        let shown: Vec<String> = SHOWN
            .iter()
            .filter_map(|k| l["stats"].get(*k).map(|v| format!("{k} {v}")))
            .collect();
        if !shown.is_empty() {
            println!("    {}", shown.join(", "));
        }
    }
}

fn image_json(t: &Target, opened: Option<&image::Opened>) -> serde_json::Value {
    let size = std::fs::metadata(&t.image).map(|m| m.len()).unwrap_or(0);
    let mut v = serde_json::json!({
        "path": t.image.display().to_string(),
        "size_bytes": size,
    });
    if let Some(o) = opened {
        v["allocated_bytes"] = o.allocated.into();
    }
    v
}

fn info(w: &Which) -> Result<u8, String> {
    let t = target(w)?;
    let outer = image::sniff(&t.image)?;
    if t.chain.is_empty() {
        let v = serde_json::json!({
            "image": image_json(&t, None),
            "outermost_layer": outer,
            "layers": [],
        });
        if w.json {
            println!("{v}");
        } else {
            println!(
                "image: {} ({} bytes)",
                t.image.display(),
                v["image"]["size_bytes"]
            );
            match &outer {
                Some(o) => println!("outermost layer: {o}"),
                None => println!("outermost layer: none vmm knows (raw data)"),
            }
            println!("(name the chain with --interceptors FILE or --config FILE --disk ID to open the layers)");
        }
        return Ok(0);
    }
    let opened = match image::open(&t) {
        Ok(o) => o,
        Err(OpenFailure::Error(e)) => return Err(e),
        Err(OpenFailure::Refused(e)) => {
            eprintln!("vmm-img: {}: {e}", t.image.display());
            return Ok(1);
        }
    };
    let layers = layers_json(&opened);
    if w.json {
        let v = serde_json::json!({
            "image": image_json(&t, Some(&opened)),
            "outermost_layer": outer,
            "layers": layers,
        });
        println!("{v}");
    } else {
        println!(
            "image: {} ({} bytes, {} allocated on the host)",
            t.image.display(),
            std::fs::metadata(&t.image).map(|m| m.len()).unwrap_or(0),
            opened.allocated
        );
        if let Some(o) = &outer {
            println!("outermost layer: {o}");
        }
        print_layers(&layers);
    }
    Ok(0)
}

fn check(w: &Which) -> Result<u8, String> {
    let t = target(w)?;
    if t.chain.is_empty() {
        return Err(
            "check needs the image's chain: --interceptors FILE or --config FILE --disk ID".into(),
        );
    }
    let opened = match image::open(&t) {
        Ok(o) => o,
        Err(OpenFailure::Error(e)) => return Err(e),
        Err(OpenFailure::Refused(e)) => {
            if w.json {
                println!("{}", serde_json::json!({ "clean": false, "refused": e }));
            } else {
                println!("{}: damaged: {e}", t.image.display());
            }
            return Ok(1);
        }
    };
    let mut clean = true;
    let mut recovered = false;
    let mut out = Vec::new();
    for l in opened.stack.layers() {
        let v = match l.check() {
            Ok(Some(c)) => {
                clean &= c.problems.is_empty();
                recovered |= c.details.contains_key("recovered");
                serde_json::json!({
                    "id": l.id(),
                    "checked": true,
                    "problems": c.problems,
                    "details": c.details,
                })
            }
            Ok(None) => serde_json::json!({ "id": l.id(), "checked": false }),
            Err(e) => {
                clean = false;
                serde_json::json!({ "id": l.id(), "checked": true, "problems": [e] })
            }
        };
        out.push(v);
    }
    if w.json {
        println!(
            "{}",
            serde_json::json!({ "clean": clean, "recovered": recovered, "layers": out, "image": image_json(&t, Some(&opened)) })
        );
    } else {
        for v in &out {
            let id = v["id"].as_str().unwrap_or("?");
            if v["checked"] != true {
                println!("{id}: keeps nothing on the disk to check");
                continue;
            }
            let problems = v["problems"].as_array().cloned().unwrap_or_default();
            let details: Vec<String> = v["details"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .filter(|(k, _)| *k != "recovered")
                        .map(|(k, x)| format!("{k} {x}"))
                        .collect()
                })
                .unwrap_or_default();
            let worked_around = v["details"]["recovered"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if problems.is_empty() && worked_around.is_empty() {
                println!("{id}: clean ({})", details.join(", "));
            } else if problems.is_empty() {
                println!(
                    "{id}: clean after recovering from damage ({})",
                    details.join(", ")
                );
            } else {
                println!("{id}: {} problems ({})", problems.len(), details.join(", "));
                for p in problems {
                    println!("    {}", p.as_str().unwrap_or_default());
                }
            }
            for r in worked_around {
                println!("    recovered: {}", r.as_str().unwrap_or_default());
            }
        }
        println!(
            "{}: {}",
            t.image.display(),
            match (clean, recovered) {
                (false, _) => "damaged",
                (true, true) => "damage recovered, nothing lost (a writable open rewrites it)",
                (true, false) => "clean",
            }
        );
    }
    Ok(match (clean, recovered) {
        (false, _) => 1,
        (true, true) => 3,
        (true, false) => 0,
    })
}

fn main() -> ExitCode {
    vmm::logging::init("error");
    let cli = Cli::parse();
    let done = match &cli.cmd {
        Cmd::Info(w) => info(w),
        Cmd::Check(w) => check(w),
    };
    match done {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("vmm-img: {e}");
            ExitCode::from(2)
        }
    }
}
