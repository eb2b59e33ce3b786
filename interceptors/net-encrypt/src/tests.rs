//! Sealing and opening through the shim, as two cards run it: what one sends the other
//! receives unchanged, and nothing else gets through.

use super::*;
use compat::{Direction as Dir, FrameBuf, InstanceSpec, NetChain, Plugin, Verdict};

fn key_file(name: &str, byte: u8) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("net-encrypt-{name}-{}.key", std::process::id()));
    std::fs::write(&p, [byte; 32]).unwrap();
    p
}

fn card(key: &std::path::Path) -> NetChain {
    let plugin =
        Plugin::from_static("net-encrypt", interceptor_sdk::static_table!(NetEncrypt)).unwrap();
    let spec = InstanceSpec {
        id: "seal".into(),
        plugin,
        config_json: serde_json::json!({ "key_file": key }).to_string(),
        enabled: true,
    };
    NetChain::build("net0", &[spec]).unwrap()
}

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

fn send(c: &NetChain, bytes: &[u8]) -> Vec<u8> {
    let mut f = buf(bytes);
    assert_eq!(c.run(Dir::Transmit, &mut f, &mut Vec::new()), Verdict::Pass);
    f.bytes().to_vec()
}

fn receive(c: &NetChain, bytes: &[u8]) -> Option<Vec<u8>> {
    let mut f = buf(bytes);
    (c.run(Dir::Receive, &mut f, &mut Vec::new()) == Verdict::Pass).then(|| f.bytes().to_vec())
}

fn stat(c: &NetChain, name: &str) -> u64 {
    c.layers()[0].plugin_stats().unwrap()[name]
        .as_u64()
        .unwrap()
}

#[test]
fn what_one_card_seals_the_other_opens_and_the_wire_never_sees() {
    let key = key_file("pair", 7);
    let (a, b) = (card(&key), card(&key));
    assert_eq!(a.headroom(), 32, "the card lowers the MTU by this");
    assert!(a.plain_frames(), "no offloads under encryption");
    let payload: Vec<u8> = (0..1400u32).map(|i| (i * 7) as u8).collect();
    let plain = frame(&payload);
    let wire = send(&a, &plain);
    assert_eq!(wire.len(), plain.len() + OVERHEAD);
    assert_eq!(&wire[..12], &plain[..12], "the MACs stay for the switch");
    assert_eq!(&wire[12..14], &ETHERTYPE.to_be_bytes());
    assert!(
        !wire
            .windows(32)
            .any(|w| payload.windows(32).any(|p| p == w)),
        "no 32 bytes of the payload on the wire"
    );
    assert_eq!(receive(&b, &wire).as_deref(), Some(&plain[..]));
    // The smallest frame too.
    let tiny = frame(&[]);
    assert_eq!(receive(&b, &send(&a, &tiny)).as_deref(), Some(&tiny[..]));
    assert_eq!(stat(&a, "sealed"), 2);
    assert_eq!(stat(&b, "opened"), 2);
}

#[test]
fn replays_forgeries_plain_frames_and_other_keys_are_dropped() {
    let key = key_file("hostile", 8);
    let (a, b) = (card(&key), card(&key));
    let wire = send(&a, &frame(b"hello over the wire"));
    assert!(receive(&b, &wire).is_some());
    assert!(receive(&b, &wire).is_none(), "the same frame again");
    assert_eq!(stat(&b, "replayed"), 1);
    for at in [0, 13, 14, 20, 30, usize::MAX] {
        let mut bad = send(&a, &frame(b"tamper with me"));
        let at = at.min(bad.len() - 1);
        bad[at] ^= 0x01;
        assert!(receive(&b, &bad).is_none(), "byte {at} changed");
    }
    // Bytes 13 and 14 (the ethertype, the version) make it not sealed at all; the others
    // fail the tag.
    assert_eq!(stat(&b, "forged"), 4);
    assert!(receive(&b, &frame(b"plain")).is_none(), "an unsealed frame");
    assert_eq!(
        stat(&b, "unsealed"),
        3,
        "bytes 13 and 14 flipped, and this one"
    );
    let other = card(&key_file("other", 9));
    assert!(
        receive(&other, &send(&a, &frame(b"x"))).is_none(),
        "another key"
    );
    // Cut short anywhere: dropped, no panic.
    let wire = send(&a, &frame(b"cut me short"));
    for n in 14..wire.len() {
        assert!(receive(&b, &wire[..n]).is_none(), "{n} bytes");
    }
}

#[test]
fn nonces_never_repeat_across_instances_of_one_key() {
    let key = key_file("nonces", 10);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        // A new instance is a new boot: a new salt, a counter from the clock.
        let a = card(&key);
        for _ in 0..100 {
            let wire = send(&a, &frame(b"n"));
            assert!(seen.insert(wire[16..28].to_vec()), "a nonce came twice");
        }
    }
}

#[test]
fn a_disabled_card_passes_frames_plain() {
    let key = key_file("disabled", 11);
    let a = card(&key);
    a.layers()[0].set_enabled(false);
    let plain = frame(b"in the clear");
    assert_eq!(send(&a, &plain), plain);
    assert_eq!(receive(&a, &plain).as_deref(), Some(&plain[..]));
}

#[test]
fn bad_configs_are_refused() {
    let plugin =
        Plugin::from_static("net-encrypt", interceptor_sdk::static_table!(NetEncrypt)).unwrap();
    for (config, says) in [
        (serde_json::json!({}), "key_file"),
        (
            serde_json::json!({ "key_file": "/nonexistent/k" }),
            "key file",
        ),
        (
            serde_json::json!({ "key_file": key_file("w", 1), "replay_window": 0 }),
            "replay_window",
        ),
    ] {
        let spec = InstanceSpec {
            id: "seal".into(),
            plugin: plugin.clone(),
            config_json: config.to_string(),
            enabled: true,
        };
        let e = NetChain::build("net0", &[spec]).unwrap_err().to_string();
        assert!(e.contains(says), "{config}: {e}");
    }
}
