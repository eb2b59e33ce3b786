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

/// An IPv6 frame from `src_mac` carrying `exts` (extension headers, each `(type, bytes)`
/// with its next-header byte filled in here) and then TCP to port `dport`.
fn tcp6(src_mac: [u8; 6], exts: &[(u8, Vec<u8>)], dport: u16) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1];
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&headers::ETH_IPV6.to_be_bytes());
    let first = exts.first().map_or(headers::IP_TCP, |e| e.0);
    let mut body = Vec::new();
    for (i, (_, bytes)) in exts.iter().enumerate() {
        let mut e = bytes.clone();
        e[0] = exts.get(i + 1).map_or(headers::IP_TCP, |n| n.0);
        body.extend_from_slice(&e);
    }
    body.extend_from_slice(&40000u16.to_be_bytes());
    body.extend_from_slice(&dport.to_be_bytes());
    body.extend_from_slice(&[0; 16]);
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&(body.len() as u16).to_be_bytes());
    ip.extend_from_slice(&[first, 64]);
    ip.extend_from_slice(&"fd00::2".parse::<Ipv6Addr>().unwrap().octets());
    ip.extend_from_slice(&"fd00::1".parse::<Ipv6Addr>().unwrap().octets());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&body);
    f
}

/// `frame` with VLAN tags of these types (VLAN 0) after its MAC addresses.
fn tagged(frame: &[u8], tags: &[u16]) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    for t in tags {
        f.extend_from_slice(&t.to_be_bytes());
        f.extend_from_slice(&[0, 0]);
    }
    f.extend_from_slice(&frame[12..]);
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
    let v6 = tcp6(GUEST_MAC, &[], 80);
    assert_eq!(run(&c, Dir::Transmit, &v6), Verdict::Taken);
    // What comes in is not the guest's doing: not checked.
    assert_eq!(
        run(&c, Dir::Receive, &tcp(other_mac, [10, 0, 0, 3], 80)),
        Verdict::Pass
    );
    assert_eq!(stats(&c)["spoofed"], 3);
}

/// A frame cut short or malformed is dropped whatever the rules and the default say: with
/// `default = "pass"` and a rule dropping port 80, an IPv4 header cut short used to pass
/// (no ports, so the rule could not match).
#[test]
fn short_and_malformed_frames_are_dropped_and_counted() {
    let c = chain(serde_json::json!({ "rules": [{ "port": 80 }], "default": "pass" })).unwrap();
    let full = tcp(GUEST_MAC, [10, 0, 0, 2], 80);
    let mut bad_version = full.clone();
    bad_version[14] = 0x65;
    let mut bad_ihl = full.clone();
    bad_ihl[14] = 0x44;
    for (what, frame) in [
        ("an IPv4 header cut short", full[..20].to_vec()),
        ("no room for the ports", full[..14 + 20 + 2].to_vec()),
        ("IPv4 of version 6", bad_version),
        ("an IPv4 header of 16 bytes", bad_ihl),
        ("ARP cut short", {
            let mut a = full[..20].to_vec();
            a[12..14].copy_from_slice(&headers::ETH_ARP.to_be_bytes());
            a
        }),
        ("five VLAN tags", tagged(&full, &[0x8100; 5])),
    ] {
        for dir in [Dir::Transmit, Dir::Receive] {
            assert_eq!(run(&c, dir, &frame), Verdict::Taken, "{what}, {dir:?}");
        }
    }
    assert_eq!(stats(&c)["unparsed"], 12);
    assert_eq!(
        run(&c, Dir::Transmit, &tcp(GUEST_MAC, [10, 0, 0, 2], 81)),
        Verdict::Pass
    );
}

/// Issue 30, item 1: what the filter decides is what the stack behind it will see. Frame
/// shapes x rules: tags of every kind and depth the host accepts, IPv6 extension headers
/// and fragments; every one of them was a bypass (a tag other than one 802.1Q, or an IPv6
/// extension header, hid the addresses and ports).
#[test]
fn tags_and_extension_headers_do_not_hide_addresses_or_ports() {
    let c = chain(serde_json::json!({
        "rules": [{ "ip_protocol": 6, "port": 5001 }],
        "default": "pass",
        "anti_spoof": { "mac": "52:54:00:12:34:56", "ipv4": "10.0.0.2", "ipv6": "fd00::2" },
    }))
    .unwrap();
    let me = [10, 0, 0, 2];
    let forged = [10, 0, 0, 66];
    let dest_opts = (60u8, vec![0, 0, 1, 4, 0, 0, 0, 0]);
    let hop_by_hop = (0u8, vec![0, 0, 1, 4, 0, 0, 0, 0]);
    let routing = (43u8, vec![0, 0, 0, 0, 0, 0, 0, 0]);
    let first_fragment = (44u8, vec![0, 0, 0, 1, 0, 0, 0, 7]);
    let tag_stacks: [&[u16]; 5] = [
        &[],
        &[0x8100],
        &[0x88a8],
        &[0x8100, 0x8100],
        &[0x88a8, 0x8100],
    ];
    for tags in tag_stacks {
        let shape = |f: &[u8]| tagged(f, tags);
        let cases: Vec<(&str, Vec<u8>, Verdict)> = vec![
            (
                "IPv4 to 5001",
                shape(&tcp(GUEST_MAC, me, 5001)),
                Verdict::Taken,
            ),
            (
                "IPv4 to 5002",
                shape(&tcp(GUEST_MAC, me, 5002)),
                Verdict::Pass,
            ),
            (
                "IPv4 from a forged address",
                shape(&tcp(GUEST_MAC, forged, 80)),
                Verdict::Taken,
            ),
            (
                "IPv6 to 5001",
                shape(&tcp6(GUEST_MAC, &[], 5001)),
                Verdict::Taken,
            ),
            (
                "IPv6 to 5002",
                shape(&tcp6(GUEST_MAC, &[], 5002)),
                Verdict::Pass,
            ),
            (
                "IPv6 + destination options to 5001",
                shape(&tcp6(GUEST_MAC, std::slice::from_ref(&dest_opts), 5001)),
                Verdict::Taken,
            ),
            (
                "IPv6 + first fragment to 5001",
                shape(&tcp6(
                    GUEST_MAC,
                    std::slice::from_ref(&first_fragment),
                    5001,
                )),
                Verdict::Taken,
            ),
            (
                "IPv6 + hop-by-hop + routing + destination options to 5001",
                shape(&tcp6(
                    GUEST_MAC,
                    &[hop_by_hop.clone(), routing.clone(), dest_opts.clone()],
                    5001,
                )),
                Verdict::Taken,
            ),
            (
                "IPv6 + destination options to 5002",
                shape(&tcp6(GUEST_MAC, std::slice::from_ref(&dest_opts), 5002)),
                Verdict::Pass,
            ),
            (
                "IPv6 + nine destination options (a chain too long to follow)",
                shape(&tcp6(GUEST_MAC, &vec![dest_opts.clone(); 9], 5002)),
                Verdict::Taken,
            ),
        ];
        for (what, frame, want) in cases {
            assert_eq!(
                run(&c, Dir::Transmit, &frame),
                want,
                "{what}, tags {tags:x?}"
            );
        }
    }
    // A later IPv6 fragment has no ports: a port rule cannot match it, the first fragment
    // (dropped above) decides whether the datagram can be put together.
    let later = (44u8, vec![0, 0, 0x05, 0xa9, 0, 0, 0, 7]);
    let f = tcp6(GUEST_MAC, &[later], 5001);
    assert_eq!(run(&c, Dir::Transmit, &f), Verdict::Pass);
    let h = parse(&f).unwrap();
    assert!(h.complete && h.dst_port.is_none(), "{h:?}");
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
