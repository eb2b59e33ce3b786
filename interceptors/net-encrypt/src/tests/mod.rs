//! Sealing and opening through the shim, as cards run it: what one sends another opens
//! unchanged once they have shaken hands, and nothing else gets through. A "wire" here
//! carries each handshake message back to the card it is for until none is left.

use super::*;
use compat::{Direction as Dir, FrameBuf, InstanceSpec, NetChain, Plugin, Verdict};
use std::collections::VecDeque;

mod handshake;
mod replay;

fn key_file(name: &str, byte: u8) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("net-encrypt-{name}-{}.key", std::process::id()));
    std::fs::write(&p, [byte; 32]).unwrap();
    p
}

fn plugin() -> std::sync::Arc<Plugin> {
    Plugin::from_static("net-encrypt", interceptor_sdk::static_table!(NetEncrypt)).unwrap()
}

fn card_with(config: serde_json::Value) -> NetChain {
    let spec = InstanceSpec {
        id: "seal".into(),
        plugin: plugin(),
        config_json: config.to_string(),
        enabled: true,
    };
    NetChain::build("net0", &[spec]).unwrap()
}

/// A card under `key` (a new instance: a new epoch, as a restart makes).
fn card(key: &std::path::Path) -> NetChain {
    card_with(serde_json::json!({ "key_file": key }))
}

/// A frame from the card with MAC ..:01 to ..:02.
fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x52, 0x54, 0, 0, 0, 2, 0x52, 0x54, 0, 0, 0, 1, 0x08, 0x00];
    f.extend_from_slice(payload);
    f
}

fn buf(bytes: &[u8]) -> FrameBuf {
    let mut f = FrameBuf::with_capacity(compat::MAX_FRAME + 64);
    f.buffer_mut()[..bytes.len()].copy_from_slice(bytes);
    f.set_len(bytes.len());
    f
}

/// What a card puts on the wire for `bytes` from its guest.
fn send(c: &NetChain, bytes: &[u8]) -> Vec<u8> {
    let mut f = buf(bytes);
    assert_eq!(c.run(Dir::Transmit, &mut f, &mut Vec::new()), Verdict::Pass);
    f.bytes().to_vec()
}

/// What a card makes of `bytes` off the wire: the frame for its guest, if any, and the
/// frames it sent back onto the wire.
fn receive_raw(c: &NetChain, bytes: &[u8]) -> (Option<Vec<u8>>, Vec<Vec<u8>>) {
    let mut f = buf(bytes);
    let mut answers = Vec::new();
    let passed = c.run(Dir::Receive, &mut f, &mut answers) == Verdict::Pass;
    (passed.then(|| f.bytes().to_vec()), answers)
}

/// `bytes` from `from` reaches `to`; the handshake messages either sends go to the other
/// until there are none. Returns what `to`'s guest got.
fn deliver(from: &NetChain, to: &NetChain, bytes: &[u8]) -> Option<Vec<u8>> {
    let (got, answers) = receive_raw(to, bytes);
    let mut wire: VecDeque<(bool, Vec<u8>)> = answers.into_iter().map(|a| (true, a)).collect();
    let mut hops = 0;
    while let Some((to_from, f)) = wire.pop_front() {
        hops += 1;
        assert!(hops < 16, "the handshake does not end");
        assert_eq!(
            f.len(),
            wire::CONTROL_FRAME,
            "only handshake messages go back"
        );
        let (g, more) = receive_raw(if to_from { from } else { to }, &f);
        assert!(g.is_none(), "a handshake message reached a guest");
        wire.extend(more.into_iter().map(|a| (!to_from, a)));
    }
    got
}

/// Has `a` and `b` shake hands (the frame that starts it is dropped).
fn connect(a: &NetChain, b: &NetChain) {
    let first = send(a, &frame(b"hello"));
    assert_eq!(
        deliver(a, b, &first),
        None,
        "dropped while the handshake runs"
    );
}

fn stat(c: &NetChain, name: &str) -> u64 {
    c.layers()[0].plugin_stats().unwrap()[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no stat {name}"))
}

#[test]
fn what_one_card_seals_the_other_opens_and_the_wire_never_sees() {
    let key = key_file("pair", 7);
    let (a, b) = (card(&key), card(&key));
    assert_eq!(a.headroom(), 46, "the card lowers the MTU by this");
    assert!(a.plain_frames(), "no offloads under encryption");
    connect(&a, &b);
    let payload: Vec<u8> = (0..1400u32).map(|i| (i * 7) as u8).collect();
    let plain = frame(&payload);
    let wire = send(&a, &plain);
    assert_eq!(wire.len(), plain.len() + OVERHEAD);
    assert_eq!(&wire[..12], &plain[..12], "the MACs stay for the switch");
    assert_eq!(&wire[12..15], &[0x88, 0xb5, VERSION]);
    assert!(
        !wire
            .windows(32)
            .any(|w| payload.windows(32).any(|p| p == w)),
        "no 32 bytes of the payload on the wire"
    );
    assert_eq!(deliver(&a, &b, &wire).as_deref(), Some(&plain[..]));
    // The smallest frame too, and the other way.
    let tiny = frame(&[]);
    assert_eq!(
        deliver(&a, &b, &send(&a, &tiny)).as_deref(),
        Some(&tiny[..])
    );
    assert_eq!(
        deliver(&b, &a, &send(&b, &tiny)).as_deref(),
        Some(&tiny[..])
    );
    assert_eq!(stat(&a, "sealed"), 3);
    assert_eq!(stat(&b, "opened"), 2);
    assert_eq!(stat(&a, "opened"), 1);
}

#[test]
fn a_disabled_card_passes_frames_plain() {
    let key = key_file("disabled", 11);
    let a = card(&key);
    a.layers()[0].set_enabled(false);
    let plain = frame(b"in the clear");
    assert_eq!(send(&a, &plain), plain);
    assert_eq!(receive_raw(&a, &plain).0.as_deref(), Some(&plain[..]));
}

#[test]
fn bad_configs_are_refused() {
    let k = key_file("cfg", 1);
    for (config, says) in [
        (serde_json::json!({}), "key_file"),
        (
            serde_json::json!({ "key_file": "/nonexistent/k" }),
            "key file",
        ),
        (
            serde_json::json!({ "key_file": k, "replay_window": 0 }),
            "replay_window",
        ),
        (
            serde_json::json!({ "key_file": k, "max_peers": 0 }),
            "max_peers",
        ),
        (
            serde_json::json!({ "key_file": k, "max_peers": 5000 }),
            "max_peers",
        ),
        (
            serde_json::json!({ "key_file": k, "key_id": 256 }),
            "key_id",
        ),
        (
            serde_json::json!({ "key_file": k, "accept_key_id": 2 }),
            "accept_key_file",
        ),
        (
            serde_json::json!({ "key_file": k, "accept_key_file": k, "accept_key_id": 1 }),
            "its own id",
        ),
        (serde_json::json!({ "key_file": k, "salt": 1 }), "salt"),
    ] {
        let spec = InstanceSpec {
            id: "seal".into(),
            plugin: plugin(),
            config_json: config.to_string(),
            enabled: true,
        };
        let e = NetChain::build("net0", &[spec]).unwrap_err().to_string();
        assert!(e.contains(says), "{config}: {e}");
    }
}

#[test]
fn hostile_bytes_are_dropped_without_a_panic() {
    let key = key_file("fuzz", 12);
    let (a, b) = (card(&key), card(&key));
    connect(&a, &b);
    let good = send(&a, &frame(&[0xab; 200]));
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut f = if i % 2 == 0 {
            good.clone()
        } else {
            vec![(x >> 8) as u8; 14 + (x % 300) as usize]
        };
        let at = (x >> 16) as usize % f.len();
        f[at] ^= (x >> 32) as u8 | 1;
        f.truncate(14.max((x >> 40) as usize % (f.len() + 1)));
        if i % 3 == 0 && f.len() > 16 {
            f[12..15].copy_from_slice(&[0x88, 0xb5, VERSION]);
        }
        assert_eq!(receive_raw(&b, &f).0, None, "frame {i} passed");
    }
}
