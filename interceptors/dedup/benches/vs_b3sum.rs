//! The plugin's block hashing beside `b3sum` in one run, on the same data: rounds
//! alternate `b3sum --num-threads 1 FILE` (repeated for about a second, timed whole: start,
//! mapping and all) with one second of the plugin addressing every 4 KiB block of the same
//! bytes (`addresses_of`: keyed BLAKE3-256, one thread, as the plugin hashes a write), in
//! 64 KiB writes (16 blocks side by side, the headline) and in 4 KiB writes (one block
//! alone, four SIMD lanes), and the median ratios are printed. Each round also hashes the
//! whole corpus as one message with the same crate, which is what b3sum does.
//!
//! `cargo bench -p interceptor-dedup --bench vs_b3sum [-- ROUNDS [FILE]]` (default 7 rounds,
//! the first 64 MiB of a tar of /usr)

#[path = "../../../benches/corpus.rs"]
mod corpus;

use std::hint::black_box;
use std::process::Command;
use std::time::{Duration, Instant};

const SLICE: Duration = Duration::from_secs(1);
const GB: f64 = 1e9;
/// Blocks per write in the headline figure: a 64 KiB write, which fills every SIMD lane
/// (`interceptor_dedup::addresses_of` hashes up to 16 blocks side by side).
const REQUEST_BLOCKS: usize = 16;

/// b3sum's bytes per second over `file` (`len` bytes), one thread.
fn b3sum(file: &std::path::Path, len: usize) -> Result<f64, String> {
    let start = Instant::now();
    let mut runs = 0u64;
    while start.elapsed() < SLICE {
        let out = Command::new("b3sum")
            .args(["--num-threads", "1"])
            .arg(file)
            .output()
            .map_err(|e| format!("b3sum: {e} (apt-get install b3sum)"))?;
        if !out.status.success() {
            return Err(format!("b3sum: {}", String::from_utf8_lossy(&out.stderr)));
        }
        runs += 1;
    }
    Ok((runs * len as u64) as f64 / start.elapsed().as_secs_f64())
}

/// The blake3 crate's bytes per second over all of `data` as one message (what b3sum
/// does): the same code as the plugin's, with every chunk of the input available for SIMD.
fn one_message(data: &[u8]) -> f64 {
    let key = [9u8; 32];
    let mut bytes = 0u64;
    let start = Instant::now();
    while start.elapsed() < SLICE {
        black_box(blake3::keyed_hash(&key, data));
        bytes += data.len() as u64;
    }
    bytes as f64 / start.elapsed().as_secs_f64()
}

/// The plugin's bytes per second addressing every block of `data`, `per_request` blocks
/// at a time (as it hashes a write of that many blocks).
fn plugin(data: &[u8], per_request: usize) -> f64 {
    let key = [9u8; 32];
    let blocks: Vec<&[u8]> = data.chunks(4096).collect();
    let mut bytes = 0u64;
    let start = Instant::now();
    while start.elapsed() < SLICE {
        for request in blocks.chunks(per_request) {
            black_box(interceptor_dedup::addresses_of(&key, request));
        }
        bytes += data.len() as u64;
    }
    bytes as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let rounds: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(7);
    let (path, data) = match corpus::corpus(args.get(1).map(String::as_str)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vs_b3sum: {e}");
            std::process::exit(2);
        }
    };
    println!(
        "{} ({} MiB), 4 KiB blocks, {rounds} rounds",
        path.display(),
        data.len() >> 20
    );
    let mut ratios = Vec::new();
    let mut single_ratios = Vec::new();
    for r in 0..rounds {
        let peer = match b3sum(&path, data.len()) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("vs_b3sum: {e}");
                std::process::exit(2);
            }
        };
        let batched = plugin(&data, REQUEST_BLOCKS);
        let single = plugin(&data, 1);
        let whole = one_message(&data);
        println!(
            "round {}: b3sum {:.2} GB/s, plugin ({REQUEST_BLOCKS}-block writes) {:.2} GB/s, \
             plugin (4 KiB writes) {:.2} GB/s, blake3 crate (one message) {:.2} GB/s",
            r + 1,
            peer / GB,
            batched / GB,
            single / GB,
            whole / GB
        );
        ratios.push(batched / peer);
        single_ratios.push(single / peer);
    }
    println!(
        "median plugin/b3sum hashing speed, 4 KiB writes: {:.2}",
        corpus::median(single_ratios)
    );
    println!(
        "median plugin/b3sum hashing speed: {:.2}",
        corpus::median(ratios)
    );
}
