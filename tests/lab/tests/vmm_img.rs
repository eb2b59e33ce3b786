//! `vmm-img` on images written through the real plugins (dedup over compress over
//! encryption, and compression alone): `info` names every layer and its sizes, `check`
//! finds a clean image clean and a tampered one damaged, naming what, with the documented
//! exit statuses; and neither ever changes the image.

mod common;

use common::{out_file, stack::io};
use compat::{BlockRequestKind, BlockStack, InstanceSpec, PluginRegistry, RequestStatus};
use devices::virtio::block::RawFile;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use vmm_lab::plugins::plugins;

fn vmm_img() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_lab")).with_file_name("vmm-img")
}

fn run(args: &[&str]) -> (i32, String, String) {
    let out: Output = Command::new(vmm_img()).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes a chain file for the full store stack (or compression alone) and its key.
fn chain_file(name: &str, full: bool) -> PathBuf {
    let p = plugins().unwrap();
    let key = out_file(&format!("{name}.key"));
    std::fs::write(&key, [0x42u8; 32]).unwrap();
    let mut text = String::new();
    if full {
        text += &format!(
            "[[interceptor]]\nid = \"dedup\"\npath = \"{}\"\nconfig = {{ index_mib = 1 }}\n\n",
            p.dedup.display()
        );
    }
    text += &format!(
        "[[interceptor]]\nid = \"zstd\"\npath = \"{}\"\nconfig = {{ extent_kib = 32 }}\n\n",
        p.compress.display()
    );
    if full {
        // Relative: taken from the chain file's directory.
        text += &format!(
            "[[interceptor]]\nid = \"enc\"\npath = \"{}\"\nconfig = {{ key_file = \"{name}.key\" }}\n",
            p.encrypt.display()
        );
    }
    let f = out_file(&format!("{name}.toml"));
    std::fs::write(&f, text).unwrap();
    f
}

fn build(image: &Path, chain: &Path) -> Arc<BlockStack> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .unwrap();
    let disk = Arc::new(RawFile::new(file, false, "img").unwrap());
    let registry = PluginRegistry::new();
    let specs: Vec<InstanceSpec> = vmm::image::chain_file(chain)
        .unwrap()
        .iter()
        .map(|ic| InstanceSpec {
            id: ic.id.clone(),
            plugin: registry.load(&ic.path, None).unwrap(),
            config_json: serde_json::to_string(&ic.config).unwrap(),
            enabled: true,
        })
        .collect();
    BlockStack::build("img", disk, &specs).unwrap()
}

/// Text that compresses, and the same 64 KiB written at two offsets (dedup's business).
fn fill(stack: &BlockStack) {
    let mut text: Vec<u8> = (0..64 * 1024u32)
        .map(|i| {
            b"the quick brown fox jumps over the lazy dog "[(i % 44) as usize] ^ (i / 4096) as u8
        })
        .collect();
    for at in [0usize, 1 << 20] {
        assert_eq!(
            io(stack, BlockRequestKind::Write, at, &mut text),
            RequestStatus::Ok
        );
    }
    assert_eq!(
        io(stack, BlockRequestKind::Flush, 0, &mut []),
        RequestStatus::Ok
    );
}

/// An image of `bytes` written once through the chain `chain_file(name, full)` writes
/// (`fill`), closed; the image and the chain file.
fn filled_image(name: &str, bytes: usize, full: bool) -> (PathBuf, PathBuf) {
    let image = blank(&format!("{name}.img"), bytes);
    let chain = chain_file(name, full);
    drop({
        let s = build(&image, &chain);
        fill(&s);
        s
    });
    (image, chain)
}

fn blank(name: &str, bytes: usize) -> PathBuf {
    let image = out_file(name);
    std::fs::write(&image, vec![0u8; bytes]).unwrap();
    image
}

#[test]
fn info_names_every_layer_and_check_finds_a_clean_image_clean() {
    let (image, chain) = filled_image("vmm-img-full", 8 << 20, true);
    let before = std::fs::read(&image).unwrap();
    let (code, out, err) = run(&[
        "info",
        image.to_str().unwrap(),
        "--interceptors",
        chain.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["outermost_layer"], "encrypt layout v2");
    let layers = v["layers"].as_array().unwrap();
    let ids: Vec<&str> = layers.iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["dedup", "zstd", "enc"]);
    assert_eq!(layers[0]["format"], "extent-store");
    assert_eq!(layers[2]["format"], "encrypt");
    // Dedup holds both copies once: 32 logical blocks, 16 stored.
    let dedup = &layers[0]["stats"];
    assert_eq!(dedup["logical_bytes"], 128 << 10, "{dedup}");
    assert_eq!(dedup["unique_extents"], 16, "{dedup}");
    // Compression below it got the 16 blocks once (and dedup's own metadata blocks), and
    // made them smaller.
    let zstd = &layers[1]["stats"];
    let logical = zstd["logical_bytes"].as_u64().unwrap();
    assert!((64 << 10..128 << 10).contains(&logical), "{zstd}");
    assert!(
        zstd["physical_bytes"].as_u64().unwrap() < 64 << 10,
        "{zstd}"
    );

    let (code, out, err) = run(&[
        "check",
        image.to_str().unwrap(),
        "--interceptors",
        chain.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("dedup: clean"), "{out}");
    assert!(out.contains("enc: clean"), "{out}");
    assert!(out.trim_end().ends_with(": clean"), "{out}");
    // Opening replays and commits, into memory only: the image is as it was.
    assert!(
        std::fs::read(&image).unwrap() == before,
        "vmm-img changed the image"
    );

    // Without the chain: the outermost layer by its magic, and check refuses to guess.
    let (code, out, _) = run(&["info", image.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(out.contains("outermost layer: encrypt layout v2"), "{out}");
    let (code, _, err) = run(&["check", image.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("needs the image's chain"), "{err}");
    let (code, _, err) = run(&["info", "/nonexistent/x.img"]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/x.img"), "{err}");
}

#[test]
fn check_finds_a_tampered_extent_and_a_wrong_key_and_says_which() {
    // Compression alone, so the extents are on the file as zstd frames.
    let (image, chain) = filled_image("vmm-img-zstd", 4 << 20, false);
    let mut bytes = std::fs::read(&image).unwrap();
    let frame = bytes
        .windows(4)
        .position(|w| w == [0x28, 0xb5, 0x2f, 0xfd])
        .expect("a zstd frame on the image");
    bytes[frame + 64] ^= 0x10;
    std::fs::write(&image, &bytes).unwrap();
    let (code, out, err) = run(&[
        "check",
        image.to_str().unwrap(),
        "--interceptors",
        chain.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 1, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["clean"], false);
    let problems = v["layers"][0]["problems"].as_array().unwrap();
    assert!(!problems.is_empty(), "{v}");
    assert!(
        problems.iter().all(|p| {
            let p = p.as_str().unwrap();
            p.starts_with("block ") || p.starts_with("the extent at sector")
        }),
        "{v}"
    );

    // The full stack with another key: encryption refuses to open it, exit 1 with why.
    let (image, chain) = filled_image("vmm-img-key", 8 << 20, true);
    std::fs::write(out_file("vmm-img-key.key"), [0x43u8; 32]).unwrap();
    let (code, out, err) = run(&[
        "check",
        image.to_str().unwrap(),
        "--interceptors",
        chain.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("damaged: ") && out.contains("enc"), "{out}");
}

/// Issue 29, item 10: damage a store recovers from (one copy of a journal block, one
/// superblock copy) is reported (`recovered:` lines, exit 3), never "clean"; both copies of
/// a journal block that a later commit follows refuse the image, naming the block. The image
/// is never changed by the check.
#[test]
fn check_reports_recovered_damage_and_names_a_damaged_journal_block() {
    let image = blank("vmm-img-journal.img", 4 << 20);
    let chain = chain_file("vmm-img-journal", false);
    drop({
        let s = build(&image, &chain);
        fill(&s);
        fill(&s); // a second commit, after the first
        s
    });
    let good = std::fs::read(&image).unwrap();
    let journal: Vec<usize> = good
        .chunks(4096)
        .enumerate()
        .filter(|(_, b)| &b[..8] == b"VMMSTJN2")
        .map(|(i, _)| i * 4096)
        .collect();
    assert!(journal.len() >= 2, "journal blocks at {journal:?}");
    let check = |bytes: &[u8]| {
        std::fs::write(&image, bytes).unwrap();
        let r = run(&[
            "check",
            image.to_str().unwrap(),
            "--interceptors",
            chain.to_str().unwrap(),
        ]);
        assert!(
            std::fs::read(&image).unwrap() == bytes,
            "check changed the image"
        );
        r
    };
    let mut one = good.clone();
    one[journal[0] + 100] ^= 1;
    one[30] ^= 1; // superblock copy A
    let (code, out, err) = check(&one);
    assert_eq!(code, 3, "{out}{err}");
    assert!(
        out.contains("zstd: clean after recovering from damage"),
        "{out}"
    );
    assert!(out.contains("recovered: journal block"), "{out}");
    assert!(out.contains("recovered: superblock copy A"), "{out}");
    let mut both = good.clone();
    both[journal[0] + 100] ^= 1;
    both[journal[0] + 2048 + 100] ^= 1;
    let (code, out, err) = check(&both);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("a later commit"), "{out}");
    let (code, out, err) = check(&good);
    assert_eq!(code, 0, "{out}{err}");
}

/// Issue 29, item 7: log lines carry colour only on a terminal (a WARN about a damaged
/// encryption header copy came with ANSI escape codes into a log file), and the damaged copy
/// is reported by the check.
#[test]
fn a_log_into_a_file_has_no_colour_codes_and_a_damaged_header_copy_is_reported() {
    let (image, chain) = filled_image("vmm-img-hdr", 8 << 20, true);
    let mut bytes = std::fs::read(&image).unwrap();
    bytes[72] ^= 1; // encryption header copy A: its MAC fails
    std::fs::write(&image, &bytes).unwrap();
    let out = Command::new(vmm_img())
        .args(["check", image.to_str().unwrap(), "--interceptors"])
        .arg(&chain)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(stderr.contains("header copy A"), "{stderr}");
    assert!(
        !stderr.contains('\u{1b}'),
        "colour codes in a pipe: {stderr:?}"
    );
    assert_eq!(out.status.code(), Some(3), "{stdout}{stderr}");
    assert!(stdout.contains("recovered: header copy A"), "{stdout}");
}

/// This process's peak resident memory (VmHWM), in MiB.
fn peak_rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024)
}

/// Issue 29, item 2: a store of 1 TiB of guest space (thin, on a sparse file of 64 GiB)
/// with a block written in every 256 MiB of it (4,096 map pages) opens, takes writes,
/// checkpoints (a 64 KiB journal: several per round), flushes, closes, reopens and checks
/// clean, in memory that does not hold the map. Before format 3 the whole map was in memory
/// (16 bytes per guest block: 4 GiB here) and every checkpoint wrote all of it; before
/// that, every writable open checkpointed it, which the shim refused past about 64 GiB.
/// Prints the peak memory and the time of each open. (`format = true` skips the check that
/// a new device is blank, which reads all of it: 64 GiB of zeroes here.)
#[test]
fn a_store_of_1_tib_of_guest_space_reopens_and_checks_clean_in_bounded_memory() {
    const SPREAD: usize = 4096;
    let image = out_file("vmm-img-1t.img");
    let file = std::fs::File::create(&image).unwrap();
    file.set_len(64 << 30).unwrap();
    drop(file);
    let chain = out_file("vmm-img-1t.toml");
    std::fs::write(
        &chain,
        format!(
            "[[interceptor]]\nid = \"dedup\"\npath = {:?}\nconfig = {{ index_mib = 1, logical_mib = 1048576, journal_kib = 64, format = true }}\n",
            plugins().unwrap().dedup
        ),
    )
    .unwrap();
    let before = peak_rss_mib();
    let block = |i: usize| -> Vec<u8> { (0..4096).map(|k| (i * 7 + k / 3) as u8 ^ 0x5a).collect() };
    let timed_build = |what: &str| {
        let t = std::time::Instant::now();
        let s = build(&image, &chain);
        println!("1 TiB store, {what}: {} ms", t.elapsed().as_millis());
        s
    };
    for round in 0..2 {
        let s = timed_build(if round == 0 { "format" } else { "open" });
        assert_eq!(s.capacity(), 1 << 40);
        for i in 0..SPREAD {
            let at = i * (256 << 20) + round * 4096;
            let mut b = block(i + round);
            assert_eq!(
                io(&s, BlockRequestKind::Write, at, &mut b),
                RequestStatus::Ok,
                "block {i}"
            );
        }
        assert_eq!(
            io(&s, BlockRequestKind::Flush, 0, &mut []),
            RequestStatus::Ok
        );
    }
    // Reopened once more: everything of both rounds reads back.
    let s = timed_build("reopen");
    for i in (0..SPREAD).step_by(7) {
        for round in 0..2 {
            let mut b = vec![0u8; 4096];
            let at = i * (256 << 20) + round * 4096;
            assert_eq!(
                io(&s, BlockRequestKind::Read, at, &mut b),
                RequestStatus::Ok
            );
            assert!(b == block(i + round), "block {i}, round {round}");
        }
    }
    drop(s);
    let grew = peak_rss_mib().saturating_sub(before);
    println!("1 TiB of guest space: peak resident memory {grew} MiB more than before the opens");
    // The map alone would be 4 GiB in memory; what stays is the directory (8 bytes per
    // page), the space of the 64 GiB below, the page cache and the journal's changes.
    assert!(grew < 512, "{grew} MiB");
    let (code, out, err) = run(&[
        "check",
        image.to_str().unwrap(),
        "--interceptors",
        chain.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("clean"), "{out}");
    let _ = std::fs::remove_file(&image);
}
