//! The plugin's cipher beside OpenSSL in one run: rounds alternate `openssl speed -evp
//! aes-256-gcm` (encrypt, then `-decrypt`) with the same amount of the plugin's own seal and
//! open (4 KiB blocks, as the plugin stores them), so both see the same machine load. Prints
//! each round and the median ratio per size and direction. Timings on shared machines swing
//! by tens of percent between seconds; alternating and taking the median is what makes the
//! ratio mean something.
//!
//! `cargo bench -p interceptor-encrypt --bench vs_openssl [-- ROUNDS]` (default 7 rounds)

use interceptor_encrypt::seal::Sealer;
use interceptor_encrypt::Mode;
use std::hint::black_box;
use std::process::Command;
use std::time::{Duration, Instant};

const SLICE: Duration = Duration::from_secs(1);
const GIB: f64 = (1u64 << 30) as f64;

/// OpenSSL's bytes per second for `size`-byte operations, or why not.
fn openssl(size: usize, decrypt: bool) -> Result<f64, String> {
    let mut cmd = Command::new("openssl");
    cmd.args(["speed", "-evp", "aes-256-gcm", "-seconds", "1", "-bytes"])
        .arg(size.to_string());
    if decrypt {
        cmd.arg("-decrypt");
    }
    let out = cmd.output().map_err(|e| format!("openssl: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // The last line is "AES-256-GCM  <thousands of bytes per second>k".
    text.lines()
        .last()
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.strip_suffix('k'))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|k| k * 1000.0)
        .ok_or_else(|| format!("cannot read openssl's output: {text:?}"))
}

/// The plugin's bytes per second sealing (or opening) `size` bytes as 4 KiB blocks.
fn plugin(sealer: &Sealer, size: usize, decrypt: bool) -> f64 {
    let mut buf = vec![0x5au8; size];
    let versions: Vec<_> = buf
        .chunks_mut(4096)
        .enumerate()
        .filter_map(|(i, b)| sealer.seal(i as u64, Mode::Encrypted, 0, b).ok())
        .collect();
    let sealed = buf.clone();
    let start = Instant::now();
    let mut ops = 0u64;
    while start.elapsed() < SLICE {
        for _ in 0..16 {
            if decrypt {
                // Opening decrypts in place: start each pass from the sealed bytes.
                buf.copy_from_slice(&sealed);
                for ((i, b), v) in buf.chunks_mut(4096).enumerate().zip(&versions) {
                    black_box(sealer.open(i as u64, v, b));
                }
            } else {
                for (i, b) in buf.chunks_mut(4096).enumerate() {
                    black_box(sealer.seal(i as u64, Mode::Encrypted, 0, b).ok());
                }
            }
        }
        ops += 16;
    }
    ops as f64 * size as f64 / start.elapsed().as_secs_f64()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    // cargo bench passes "--bench"; a number is the round count.
    let rounds = std::env::args()
        .skip(1)
        .find_map(|a| a.parse::<usize>().ok())
        .unwrap_or(7)
        .max(1);
    let sealer = Sealer::new(&[7u8; 32], [1; 16], [2; 16]);
    for size in [4096usize, 65536] {
        for decrypt in [false, true] {
            let what = if decrypt { "decrypt" } else { "encrypt" };
            let (mut ratios, mut per_block) = (Vec::new(), Vec::new());
            for round in 1..=rounds {
                // OpenSSL sealing `size` as one message, and as 4 KiB messages (what the
                // plugin's format does: one tag per block); the same for 4 KiB.
                let peers = openssl(size, decrypt).and_then(|whole| {
                    let blocks = if size == 4096 {
                        whole
                    } else {
                        openssl(4096, decrypt)?
                    };
                    Ok((whole, blocks))
                });
                let (whole, blocks) = match peers {
                    Ok(v) => v,
                    Err(e) => {
                        println!("SKIPPED: {e}");
                        return;
                    }
                };
                let ours = plugin(&sealer, size, decrypt);
                println!(
                    "{:>2} KiB {what} round {round}: openssl {:.2} GiB/s (4 KiB messages {:.2}), plugin {:.2} GiB/s, {:.0}% ({:.0}%)",
                    size / 1024,
                    whole / GIB,
                    blocks / GIB,
                    ours / GIB,
                    100.0 * ours / whole,
                    100.0 * ours / blocks
                );
                ratios.push(ours / whole);
                per_block.push(ours / blocks);
            }
            println!(
                "{:>2} KiB {what}: median plugin/openssl {:.0}%, against OpenSSL in 4 KiB messages {:.0}%, over {rounds} rounds",
                size / 1024,
                100.0 * median(&mut ratios),
                100.0 * median(&mut per_block)
            );
        }
    }
}
