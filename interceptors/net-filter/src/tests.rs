//! The filter through the shim, as a card runs it: rules in order, both directions,
//! anti-spoofing, counters per rule, and configs it must refuse.

use super::*;
use compat::{Direction as Dir, FrameBuf, InstanceSpec, NetChain, Plugin, Verdict};

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

fn chain(config: serde_json::Value) -> Result<NetChain, String> {
    let plugin = Plugin::from_static("net-filter", interceptor_sdk::static_table!(NetFilter))
        .map_err(|e| e.to_string())?;
    let spec = InstanceSpec {
        id: "filter".into(),
        plugin,
        config_json: config.to_string(),
        enabled: true,
    };
    NetChain::build("net0", &[spec]).map_err(|e| e.to_string())
}

/// An IPv4 TCP frame from `src_mac`/`src_ip` to port `dport`.
fn tcp(src_mac: [u8; 6], src_ip: [u8; 4], dport: u16) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1];
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&headers::ETH_IPV4.to_be_bytes());
    let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, headers::IP_TCP, 0, 0];
    ip.extend_from_slice(&src_ip);
    ip.extend_from_slice(&[10, 0, 0, 1]);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&[0; 16]);
    f
}

fn run(c: &NetChain, dir: Dir, frame: &[u8]) -> Verdict {
    let mut f = FrameBuf::with_capacity(2048);
    f.buffer_mut()[..frame.len()].copy_from_slice(frame);
    f.set_len(frame.len());
    c.run(dir, &mut f, &mut Vec::new())
}

fn stats(c: &NetChain) -> serde_json::Value {
    c.layers()[0].plugin_stats().unwrap()
}

#[test]
fn a_blocked_port_is_dropped_and_the_rest_passes() {
    let c = chain(serde_json::json!({
        "rules": [{ "name": "no-5001", "ip_protocol": 6, "dst_port": 5001 }],
    }))
    .unwrap();
    let me = [10, 0, 0, 2];
    assert_eq!(
        run(&c, Dir::Transmit, &tcp(GUEST_MAC, me, 5001)),
        Verdict::Taken
    );
    assert_eq!(
        run(&c, Dir::Transmit, &tcp(GUEST_MAC, me, 5002)),
        Verdict::Pass
    );
    // Both directions by default: the same frame on its way in is dropped too.
    assert_eq!(
        run(&c, Dir::Receive, &tcp(GUEST_MAC, me, 5001)),
        Verdict::Taken
    );
    let s = stats(&c);
    assert_eq!(s["rules"][0]["name"], "no-5001");
    assert_eq!(s["rules"][0]["matched"], 2, "{s}");
    assert_eq!(s["dropped"], 2);
    assert_eq!(s["passed"], 1);
}

#[test]
fn the_first_matching_rule_decides_and_the_default_the_rest() {
    let c = chain(serde_json::json!({
        "rules": [
            { "action": "pass", "direction": "rx", "port": 22 },
            { "ethertype": 2048 },
        ],
        "default": "pass",
    }))
    .unwrap();
    let f22 = tcp(GUEST_MAC, [10, 0, 0, 2], 22);
    assert_eq!(
        run(&c, Dir::Receive, &f22),
        Verdict::Pass,
        "rule 0 passes it in"
    );
    assert_eq!(
        run(&c, Dir::Transmit, &f22),
        Verdict::Taken,
        "rule 1 drops IPv4 out"
    );
    let mut arp = f22.clone();
    arp[12..14].copy_from_slice(&headers::ETH_ARP.to_be_bytes());
    assert_eq!(run(&c, Dir::Transmit, &arp), Verdict::Pass, "the default");
}

#[test]
fn anti_spoofing_drops_what_the_guest_sends_from_other_addresses() {
    let c = chain(serde_json::json!({
        "anti_spoof": { "mac": "52:54:00:12:34:56", "ipv4": "10.0.0.2" },
    }))
    .unwrap();
    assert_eq!(
        run(&c, Dir::Transmit, &tcp(GUEST_MAC, [10, 0, 0, 2], 80)),
        Verdict::Pass
    );
    let other_mac = [0x52, 0x54, 0, 0, 0, 9];
    assert_eq!(
        run(&c, Dir::Transmit, &tcp(other_mac, [10, 0, 0, 2], 80)),
        Verdict::Taken
    );
    assert_eq!(
        run(&c, Dir::Transmit, &tcp(GUEST_MAC, [10, 0, 0, 3], 80)),
        Verdict::Taken
    );
    // IPv6 with no ipv6 configured: dropped.
    let mut v6 = tcp(GUEST_MAC, [10, 0, 0, 2], 80);
    v6[12..14].copy_from_slice(&headers::ETH_IPV6.to_be_bytes());
    assert_eq!(run(&c, Dir::Transmit, &v6), Verdict::Taken);
    // What comes in is not the guest's doing: not checked.
    assert_eq!(
        run(&c, Dir::Receive, &tcp(other_mac, [10, 0, 0, 3], 80)),
        Verdict::Pass
    );
    assert_eq!(stats(&c)["spoofed"], 3);
}

#[test]
fn short_and_odd_frames_get_the_default() {
    let c = chain(serde_json::json!({ "rules": [{ "port": 80 }], "default": "drop" })).unwrap();
    let mut short = tcp(GUEST_MAC, [10, 0, 0, 2], 80);
    short.truncate(20); // an IPv4 header cut short: no ports, so the rule cannot match
    assert_eq!(run(&c, Dir::Transmit, &short), Verdict::Taken);
}

#[test]
fn bad_configs_are_refused_with_the_reason() {
    for (config, says) in [
        (serde_json::json!({ "rulez": [] }), "unknown field"),
        // Each names the field (issue 29, item 7: type errors named nothing).
        (
            serde_json::json!({ "rules": [{ "port": 70000 }] }),
            "config: rules[0].port: invalid value: integer `70000`, expected u16",
        ),
        (
            serde_json::json!({ "rules": [{}, { "action": "reject" }] }),
            "config: rules[1].action: unknown variant",
        ),
        (
            serde_json::json!({ "rules": [{ "ethertype": "ipv4" }] }),
            "config: rules[0].ethertype: invalid type",
        ),
        (
            serde_json::json!({ "rules": [{ "src_ip": "10.0.0.300" }] }),
            "config: rules[0].src_ip: invalid IP address",
        ),
        (
            serde_json::json!({ "anti_spoof": { "mac": "zz" } }),
            "not a MAC",
        ),
        (
            serde_json::json!({ "rules": vec![serde_json::json!({}); MAX_RULES + 1] }),
            "at most",
        ),
    ] {
        let e = chain(config.clone()).unwrap_err();
        assert!(e.contains(says), "{config}: {e}");
    }
}
