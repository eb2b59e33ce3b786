//! The plugin's compressor beside `zstd -b` in one run, on the same data at the same level
//! and the same independent block size (the extent, `-B`): rounds alternate one run of
//! `zstd -b<level> -B<extent> -i1` with one second of the plugin's own extent encoding
//! (`compress_extent`, the 1/8 rule included; and again with the per-block checks the
//! plugin also computes), then the median ratio is printed. Decompression is compared the
//! same way (`zstd -b` reports both).
//!
//! `cargo bench -p interceptor-compress --bench vs_zstd [-- ROUNDS LEVEL EXTENT_KIB [FILE]]`
//! (default 7 rounds, level 3, 64 KiB extents, the first 64 MiB of a tar of /usr)

#[path = "../../../benches/corpus.rs"]
mod corpus;

use std::hint::black_box;
use std::process::Command;
use std::time::{Duration, Instant};

const SLICE: Duration = Duration::from_secs(1);
const MB: f64 = 1e6;

struct Peer {
    compress_mb_s: f64,
    decompress_mb_s: f64,
    ratio: f64,
}

/// `zstd -b`'s figures, from its last progress line:
/// `3#file : 67108864 -> 38251793 (x1.754), 339.6 MB/s, 1441.7 MB/s`.
fn zstd_bench(file: &std::path::Path, level: i32, extent: usize) -> Result<Peer, String> {
    let out = Command::new("zstd")
        .arg(format!("-b{level}"))
        .arg(format!("-B{extent}"))
        .args(["-i1", "-T1"])
        .arg(file)
        .output()
        .map_err(|e| format!("zstd: {e} (apt-get install zstd)"))?;
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let line = text
        .split(['\r', '\n'])
        .rfind(|l| l.matches("MB/s").count() == 2)
        .ok_or_else(|| format!("cannot read zstd's output: {text:?}"))?;
    let num = |s: &str| {
        s.trim()
            .trim_start_matches("(x")
            .trim_end_matches(')')
            .parse::<f64>()
    };
    let after = line.split("->").nth(1).unwrap_or_default();
    let parts: Vec<&str> = after.split(',').collect();
    let ratio = parts
        .first()
        .and_then(|p| p.split_whitespace().nth(1))
        .and_then(|r| num(r).ok());
    let speed = |i: usize| {
        parts
            .get(i)
            .and_then(|p| p.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    match (ratio, speed(1), speed(2)) {
        (Some(ratio), Some(c), Some(d)) => Ok(Peer {
            compress_mb_s: c,
            decompress_mb_s: d,
            ratio,
        }),
        _ => Err(format!("cannot read zstd's line: {line:?}")),
    }
}

/// Guest bytes per second the plugin encodes, and the bytes it stores for all of `data`.
fn plugin_encode(data: &[u8], level: i32, extent: usize, with_checks: bool) -> (f64, u64) {
    let mut c = zstd::bulk::Compressor::new(level).expect("a zstd context");
    let key = [7u8; 32];
    let mut stored = 0u64;
    let mut bytes = 0u64;
    let mut first_pass = true;
    let start = Instant::now();
    'outer: loop {
        for raw in data.chunks(extent) {
            if with_checks {
                for b in raw.chunks(4096) {
                    black_box(extent_store::block_check(&key, b));
                }
            }
            let n = interceptor_compress::compress_extent(&mut c, raw)
                .map_or(raw.len(), |z| z.len()) as u64;
            if first_pass {
                stored += n;
            }
            bytes += raw.len() as u64;
            if start.elapsed() >= SLICE && bytes >= data.len() as u64 {
                break 'outer;
            }
        }
        first_pass = false;
    }
    (bytes as f64 / start.elapsed().as_secs_f64(), stored)
}

/// Guest bytes per second the plugin decodes (the compressed extents of `data`).
fn plugin_decode(data: &[u8], level: i32, extent: usize) -> f64 {
    let mut c = zstd::bulk::Compressor::new(level).expect("a zstd context");
    let frames: Vec<(Vec<u8>, usize)> = data
        .chunks(extent)
        .filter_map(|raw| {
            interceptor_compress::compress_extent(&mut c, raw).map(|z| (z, raw.len()))
        })
        .collect();
    let mut d = zstd::bulk::Decompressor::new().expect("a zstd context");
    let mut bytes = 0u64;
    let start = Instant::now();
    while start.elapsed() < SLICE {
        for (z, n) in &frames {
            black_box(d.decompress(z, *n).ok());
            bytes += *n as u64;
        }
    }
    bytes as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let rounds: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(7);
    let level: i32 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(3);
    let extent = args
        .get(2)
        .and_then(|a| a.parse::<usize>().ok())
        .unwrap_or(64)
        << 10;
    let (path, data) = match corpus::corpus(args.get(3).map(String::as_str)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vs_zstd: {e}");
            std::process::exit(2);
        }
    };
    println!(
        "{} ({} MiB), level {level}, {} KiB extents, {rounds} rounds",
        path.display(),
        data.len() >> 20,
        extent >> 10
    );
    let (mut comp, mut with_checks, mut decomp) = (Vec::new(), Vec::new(), Vec::new());
    let mut last = None;
    for r in 0..rounds {
        let peer = match zstd_bench(&path, level, extent) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("vs_zstd: {e}");
                std::process::exit(2);
            }
        };
        let (ours, stored) = plugin_encode(&data, level, extent, false);
        let (ours_checked, _) = plugin_encode(&data, level, extent, true);
        let ours_d = plugin_decode(&data, level, extent);
        println!(
            "round {}: compress zstd {:.1} MB/s, plugin {:.1} MB/s ({:.1} with checks); \
             decompress zstd {:.1} MB/s, plugin {:.1} MB/s",
            r + 1,
            peer.compress_mb_s,
            ours / MB,
            ours_checked / MB,
            peer.decompress_mb_s,
            ours_d / MB
        );
        comp.push(ours / MB / peer.compress_mb_s);
        with_checks.push(ours_checked / MB / peer.compress_mb_s);
        decomp.push(ours_d / MB / peer.decompress_mb_s);
        last = Some((peer.ratio, data.len() as f64 / stored as f64));
    }
    if let Some((zr, pr)) = last {
        println!(
            "stored ratio: zstd x{zr:.3}, plugin x{pr:.3} (extents that save < 1/8 stored raw)"
        );
    }
    println!(
        "median plugin/zstd decompress speed: {:.2}",
        corpus::median(decomp)
    );
    println!(
        "median plugin/zstd compress speed with per-block checks: {:.2}",
        corpus::median(with_checks)
    );
    println!(
        "median plugin/zstd compress speed level {level}: {:.2}",
        corpus::median(comp)
    );
}
