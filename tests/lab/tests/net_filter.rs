//! net-filter against frames a hostile guest makes by hand (issue 30, item 1), in real
//! guests: VLAN tag stacks and IPv6 extension headers that once hid a port or a forged
//! address from the filter, sent from inside a guest through its virtio-net card with
//! `rawsend` (guest-kernel/rootfs/rawsend.c), and judged by what crossed the bridge.
//!
//! One `lab pair` boot. A's card has net-filter with `{ ip_protocol = 6, port = 5001 }` and
//! anti-spoofing; B's card has no filter. A sends every hostile shape to B, and beside each
//! one a control of the same shape that the rule lets through (port 5002, or A's own
//! address): none of the hostile frames may be on the bridge, every control must be, and B
//! (listening on 5001 and 5002) answers the controls' SYNs with SYN-ACKs, so B's kernel
//! takes each shape. B sends the same hostile frames to A: with no filter on B's card they
//! are on the bridge (the frames the tool makes do get out: the test can fail), and A's
//! filter drops them on the way in (its rule's count).

mod common;

use common::{images_or_skip, lab, lines_of, out_file, output};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use vmm_lab::plugins::plugins;

/// Frames of each shape a guest sends.
const COUNT: usize = 3;
const A_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x0a];
const B_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x0b];
const FORGED: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 66);
const QTAG: u16 = 0x8100;
const ADTAG: u16 = 0x88a8;
const DSTOPT: u8 = 60;
const FRAG: u8 = 44;

// ---- reading the capture ----

/// What the test reads of one frame on the bridge.
#[derive(Debug, Default)]
struct Frame {
    src_mac: [u8; 6],
    /// TPIDs of the VLAN tags, outermost first.
    tags: Vec<u16>,
    /// The type after the tags.
    ethertype: u16,
    src_ip: Option<IpAddr>,
    dst_ip: Option<IpAddr>,
    /// IPv6 extension headers, in order (their next-header values).
    ext: Vec<u8>,
    /// IPv4's protocol or IPv6's last next header.
    proto: Option<u8>,
    src_port: Option<u16>,
    dst_port: Option<u16>,
    tcp_flags: Option<u8>,
    /// ARP: (operation, target protocol address).
    arp: Option<(u16, Ipv4Addr)>,
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn v4(b: &[u8], at: usize) -> Option<Ipv4Addr> {
    let a: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
    Some(Ipv4Addr::from(a))
}

fn v6(b: &[u8], at: usize) -> Option<Ipv6Addr> {
    let a: [u8; 16] = b.get(at..at + 16)?.try_into().ok()?;
    Some(Ipv6Addr::from(a))
}

/// Reads an Ethernet frame as far as it goes (a frame cut short keeps what came before).
fn parse_frame(b: &[u8]) -> Frame {
    let mut f = Frame::default();
    let Some(mac) = b.get(6..12) else { return f };
    f.src_mac.copy_from_slice(mac);
    let mut at = 12;
    let Some(mut ty) = be16(b, at) else { return f };
    while matches!(ty, 0x8100 | 0x88a8 | 0x9100) {
        f.tags.push(ty);
        at += 4;
        let Some(t) = be16(b, at) else { return f };
        ty = t;
    }
    f.ethertype = ty;
    let l3 = at + 2;
    let l4 = match ty {
        0x0800 => {
            let Some(&vihl) = b.get(l3) else { return f };
            f.src_ip = v4(b, l3 + 12).map(IpAddr::V4);
            f.dst_ip = v4(b, l3 + 16).map(IpAddr::V4);
            f.proto = b.get(l3 + 9).copied();
            l3 + usize::from(vihl & 0x0f) * 4
        }
        0x86dd => {
            f.src_ip = v6(b, l3 + 8).map(IpAddr::V6);
            f.dst_ip = v6(b, l3 + 24).map(IpAddr::V6);
            let Some(&first) = b.get(l3 + 6) else {
                return f;
            };
            let (mut next, mut at) = (first, l3 + 40);
            while matches!(next, 0 | 43 | 60 | 44) {
                f.ext.push(next);
                let (Some(&n), Some(&len)) = (b.get(at), b.get(at + 1)) else {
                    return f;
                };
                at += if next == 44 {
                    8
                } else {
                    (usize::from(len) + 1) * 8
                };
                next = n;
            }
            f.proto = Some(next);
            at
        }
        0x0806 => {
            if let (Some(op), Some(tpa)) = (be16(b, l3 + 6), v4(b, l3 + 24)) {
                f.arp = Some((op, tpa));
            }
            return f;
        }
        _ => return f,
    };
    if matches!(f.proto, Some(6 | 17)) {
        f.src_port = be16(b, l4);
        f.dst_port = be16(b, l4 + 2);
    }
    if f.proto == Some(6) {
        f.tcp_flags = b.get(l4 + 13).copied();
    }
    f
}

/// The frames of a pcap file (either byte order, micro- or nanosecond stamps).
fn read_pcap(data: &[u8]) -> Vec<Frame> {
    let magic = data.get(..4).map(|m| [m[0], m[1], m[2], m[3]]);
    let le = match magic {
        Some([0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1]) => true,
        Some([0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d]) => false,
        _ => panic!("not a pcap file ({} bytes)", data.len()),
    };
    let u32_at = |at: usize| -> Option<usize> {
        let a: [u8; 4] = data.get(at..at + 4)?.try_into().ok()?;
        let v = if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        };
        usize::try_from(v).ok()
    };
    assert_eq!(u32_at(20), Some(1), "the capture is of Ethernet frames");
    let mut frames = Vec::new();
    let mut at = 24;
    while let Some(caplen) = u32_at(at + 8) {
        let Some(bytes) = data.get(at + 16..at + 16 + caplen) else {
            break;
        };
        frames.push(parse_frame(bytes));
        at += 16 + caplen;
    }
    frames
}

// ---- the frames each guest sends ----

/// One `rawsend=` task: COUNT frames of `shape` to `dst`:`port` (from `src`, or the
/// guest's own address).
struct Send {
    shape: &'static str,
    dst: &'static str,
    port: u16,
    src: Option<Ipv4Addr>,
    /// The filter must drop it (else it is a control the filter lets through).
    hostile: bool,
}

impl Send {
    fn task(&self) -> String {
        let mut t = format!("rawsend={},{},{},{COUNT}", self.shape, self.dst, self.port);
        if let Some(src) = self.src {
            t.push_str(&format!(",{src}"));
        }
        t
    }

    /// The tags, extension headers and protocol its shape name says.
    fn layout(&self) -> (Vec<u16>, Vec<u8>, u8) {
        let (mut tags, mut ext, mut proto) = (Vec::new(), Vec::new(), 0);
        for w in self.shape.split('-') {
            match w {
                "q" => tags.push(QTAG),
                "ad" => tags.push(ADTAG),
                "dstopt" => ext.push(DSTOPT),
                "frag" => ext.push(FRAG),
                "tcp" => proto = 6,
                "udp" => proto = 17,
                other => panic!("unknown word {other} in {}", self.shape),
            }
        }
        (tags, ext, proto)
    }

    /// Whether `f` is one of this send's frames, from `mac` with source ports from `sport`.
    fn is_mine(&self, f: &Frame, mac: [u8; 6], sport: u16) -> bool {
        let (tags, ext, proto) = self.layout();
        let ports = sport..sport + COUNT as u16;
        f.src_mac == mac
            && f.tags == tags
            && f.ext == ext
            && f.proto == Some(proto)
            && f.dst_ip.map(|a| a.to_string()).as_deref() == Some(self.dst)
            && f.dst_port == Some(self.port)
            && f.src_port.is_some_and(|p| ports.contains(&p))
            && self.src.is_none_or(|s| f.src_ip == Some(IpAddr::V4(s)))
    }
}

fn sends_of_a() -> Vec<Send> {
    let mut v = Vec::new();
    for (shape, dst) in [
        ("q-q-tcp", "10.0.0.3"),
        ("ad-tcp", "10.0.0.3"),
        ("dstopt-tcp", "fd00::3"),
        ("frag-tcp", "fd00::3"),
    ] {
        v.push(Send {
            shape,
            dst,
            port: 5001,
            src: None,
            hostile: true,
        });
        v.push(Send {
            shape,
            dst,
            port: 5002,
            src: None,
            hostile: false,
        });
    }
    v.push(Send {
        shape: "ad-udp",
        dst: "10.0.0.3",
        port: 5003,
        src: Some(FORGED),
        hostile: true,
    });
    v.push(Send {
        shape: "ad-udp",
        dst: "10.0.0.3",
        port: 5003,
        src: None,
        hostile: false,
    });
    v
}

/// B sends A's hostile frames to A: with no filter on B's card, they must reach the wire.
fn sends_of_b() -> Vec<Send> {
    sends_of_a()
        .into_iter()
        .filter(|s| s.hostile)
        .map(|s| Send {
            dst: match s.dst {
                "10.0.0.3" => "10.0.0.2",
                _ => "fd00::2",
            },
            ..s
        })
        .collect()
}

/// The first source port of each `rawsend` task, in order, from the guest's lines: every
/// send must have reported all its frames sent.
fn sports(lines: &str, sends: &[Send]) -> Vec<u16> {
    let reported: Vec<&str> = lines
        .lines()
        .filter(|l| l.contains("@@GUEST@@ rawsend"))
        .collect();
    assert_eq!(reported.len(), sends.len(), "one line per send: {lines}");
    sends
        .iter()
        .zip(reported)
        .map(|(s, l)| {
            assert!(
                l.contains(&format!("shape={} ", s.shape))
                    && l.contains(&format!("dst={} port={} ", s.dst, s.port))
                    && l.contains(&format!("sent={COUNT} ")),
                "{} to {}:{}: {l}",
                s.shape,
                s.dst,
                s.port
            );
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("sport="))
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("no sport= in {l}"))
        })
        .collect()
}

/// The plugin's stats from the exit report's `interceptor filter on net0: ... stats={..}`.
fn filter_stats(lines: &str) -> serde_json::Value {
    let line = lines
        .lines()
        .find(|l| l.contains("interceptor filter on net0"))
        .expect("the filter's exit report");
    let json = line.split_once("stats=").map(|(_, j)| j).unwrap_or("");
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {line}"))
}

#[test]
fn tagged_and_extension_header_frames_from_a_guest_do_not_pass_the_filter() {
    if images_or_skip().is_none() {
        return;
    }
    let p = plugins().unwrap();
    let chain = out_file("net-filter-shapes-a.toml");
    std::fs::write(
        &chain,
        format!(
            "[[interceptor]]\nid = \"filter\"\npath = {:?}\n[interceptor.config]\n\
             default = \"pass\"\n\
             rules = [{{ name = \"no-5001\", ip_protocol = 6, port = 5001 }}]\n\
             anti_spoof = {{ mac = \"52:54:00:00:00:0a\", ipv4 = \"10.0.0.2\", ipv6 = \"fd00::2\" }}\n",
            p.net_filter
        ),
    )
    .unwrap();
    let (a_sends, b_sends) = (sends_of_a(), sends_of_b());
    let words = |sends: &[Send]| sends.iter().map(Send::task).collect::<Vec<_>>().join(" ");
    // B waits at its end for A's word on 5009, sent once A has sent everything (B has less
    // to send, so it is there first): each guest is up while the other sends to it.
    let a_task = format!(
        "net.ip=10.0.0.2/24 net.ip6=fd00::2/64 {} netsend=10.0.0.3:5009,1",
        words(&a_sends)
    );
    let b_task = format!(
        "net.ip=10.0.0.3/24 net.ip6=fd00::3/64 iperfd=5001 iperfd=5002 {} netrecv=5009",
        words(&b_sends)
    );
    let capture = out_file("net-filter-shapes.pcap");
    let json = out_file("net-filter-shapes.json");
    let out = lab(&[
        "pair",
        "--backend",
        "vmm",
        "--timeout",
        "600",
        "--json",
        &json.to_string_lossy(),
        "--a-task",
        &a_task,
        "--b-task",
        &b_task,
        "--a-net-interceptors",
        &chain.to_string_lossy(),
        "--capture",
        &capture.to_string_lossy(),
    ]);
    let text = output(&out);
    assert!(out.status.success(), "the pair failed");
    let (a, b) = (lines_of(&text, "a"), lines_of(&text, "b"));
    for who in [&a, &b] {
        assert!(who.contains("@@GUEST@@ exit rc=0"), "{who}");
    }
    let (a_sports, b_sports) = (sports(&a, &a_sends), sports(&b, &b_sends));
    let frames = read_pcap(&std::fs::read(&capture).expect("the capture"));

    let on_wire = |s: &Send, mac, sport| frames.iter().filter(|f| s.is_mine(f, mac, sport)).count();
    // B's SYN-ACKs from `port` to one of the ports from `sport`.
    let syn_acks = |port: u16, sport: u16| {
        frames
            .iter()
            .filter(|f| {
                f.src_mac == B_MAC
                    && f.src_port == Some(port)
                    && f.dst_port
                        .is_some_and(|p| (sport..sport + COUNT as u16).contains(&p))
                    && f.tcp_flags.is_some_and(|t| t & (SYN | ACK) == SYN | ACK)
            })
            .count()
    };
    for (s, &sport) in a_sends.iter().zip(&a_sports) {
        let what = format!(
            "A's {} to {}:{}{}",
            s.shape,
            s.dst,
            s.port,
            s.src.map(|a| format!(" from {a}")).unwrap_or_default()
        );
        let n = on_wire(s, A_MAC, sport);
        if s.hostile {
            assert_eq!(n, 0, "{what} reached the bridge through the filter");
            if s.shape.ends_with("tcp") {
                assert_eq!(syn_acks(s.port, sport), 0, "B answered {what}");
            }
        } else {
            assert_eq!(
                n, COUNT,
                "{what} (a control the rule lets through) on the bridge"
            );
            if s.shape.ends_with("tcp") {
                assert!(
                    syn_acks(s.port, sport) > 0,
                    "B's kernel answered {what} with a SYN-ACK (it takes the shape)"
                );
            }
        }
    }
    // Nothing at all from B's port 5001: no SYN of A's reached it.
    assert!(
        !frames
            .iter()
            .any(|f| f.src_mac == B_MAC && f.proto == Some(6) && f.src_port == Some(5001)),
        "B's port 5001 answered something"
    );
    // No frame from A with the forged address, and B never asked where it is.
    assert!(
        !frames
            .iter()
            .any(|f| f.src_mac == A_MAC && f.src_ip == Some(IpAddr::V4(FORGED))),
        "A's forged address on the bridge"
    );
    let asks_forged = |mac| {
        frames
            .iter()
            .any(|f| f.src_mac == mac && f.arp == Some((1, FORGED)))
    };
    assert!(!asks_forged(B_MAC), "B received A's forged datagram");

    // Without a filter the same frames get out: B's all reached the bridge.
    for (s, &sport) in b_sends.iter().zip(&b_sports) {
        assert_eq!(
            on_wire(s, B_MAC, sport),
            COUNT,
            "B's {} to {}:{} (no filter on B's card) on the bridge",
            s.shape,
            s.dst,
            s.port
        );
    }
    // A's kernel took B's forged datagram behind its 802.1ad tag (filters judge only what a
    // guest sends by its source): it asked for the forged address to answer it.
    assert!(
        asks_forged(A_MAC),
        "A's kernel answered B's 802.1ad-tagged datagram from {FORGED}"
    );

    // A's filter: its rule dropped A's hostile TCP frames on the way out and B's on the way
    // in; anti-spoofing A's forged datagrams; every frame was read whole.
    let stats = filter_stats(&a);
    let hostile_tcp = a_sends
        .iter()
        .filter(|s| s.hostile && s.shape.ends_with("tcp"))
        .count();
    assert_eq!(
        stats["rules"][0]["matched"],
        2 * hostile_tcp * COUNT,
        "{stats}"
    );
    assert_eq!(stats["spoofed"], COUNT, "{stats}");
    assert_eq!(stats["unparsed"], 0, "{stats}");
}

// ---- the reader itself (no guest) ----

/// A frame as rawsend builds it: `tags`, then IPv4 or IPv6 with `ext`, then TCP or UDP.
fn frame(tags: &[u16], v6: bool, ext: &[u8], proto: u8, dport: u16) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&B_MAC);
    f.extend_from_slice(&A_MAC);
    for t in tags {
        f.extend_from_slice(&t.to_be_bytes());
        f.extend_from_slice(&[0, 0]);
    }
    let l4len = if proto == 6 { 20 } else { 8 };
    if v6 {
        f.extend_from_slice(&0x86ddu16.to_be_bytes());
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&((ext.len() * 8 + l4len) as u16).to_be_bytes());
        f.push(ext.first().copied().unwrap_or(proto));
        f.push(64);
        f.extend_from_slice(&"fd00::2".parse::<Ipv6Addr>().unwrap().octets());
        f.extend_from_slice(&"fd00::3".parse::<Ipv6Addr>().unwrap().octets());
        for (i, _) in ext.iter().enumerate() {
            f.push(ext.get(i + 1).copied().unwrap_or(proto));
            f.extend_from_slice(&[0, 1, 4, 0, 0, 0, 0]);
        }
    } else {
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        f.extend_from_slice(&[0x45, 0, 0, 20 + l4len as u8, 0, 0, 0x40, 0, 64, proto, 0, 0]);
        f.extend_from_slice(&FORGED.octets());
        f.extend_from_slice(&[10, 0, 0, 3]);
    }
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    if proto == 6 {
        // sequence, acknowledgement, header length; the flags; window, checksum, urgent
        f.extend_from_slice(&[0; 9]);
        f.push(SYN);
        f.extend_from_slice(&[0; 6]);
    } else {
        f.extend_from_slice(&[0; 4]);
    }
    f
}

#[test]
fn the_capture_reader_sees_through_tags_and_extension_headers() {
    let f = parse_frame(&frame(&[QTAG, QTAG], false, &[], 6, 5001));
    assert_eq!(f.tags, [QTAG, QTAG]);
    assert_eq!(f.src_ip, Some(IpAddr::V4(FORGED)));
    assert_eq!(
        (f.proto, f.src_port, f.dst_port),
        (Some(6), Some(40000), Some(5001))
    );
    assert_eq!(f.tcp_flags, Some(SYN));
    let f = parse_frame(&frame(&[ADTAG], true, &[DSTOPT, FRAG], 6, 5002));
    assert_eq!(
        (f.tags.as_slice(), f.ext.as_slice()),
        (&[ADTAG][..], &[DSTOPT, FRAG][..])
    );
    assert_eq!(f.dst_ip, Some("fd00::3".parse().unwrap()));
    assert_eq!((f.proto, f.dst_port), (Some(6), Some(5002)));
    let send = Send {
        shape: "ad-dstopt-frag-tcp",
        dst: "fd00::3",
        port: 5002,
        src: None,
        hostile: false,
    };
    assert!(send.is_mine(&f, A_MAC, 39999));
    assert!(!send.is_mine(&f, A_MAC, 40001), "another send's port");
    assert!(!send.is_mine(&f, B_MAC, 39999), "another guest's");
    // Cut short anywhere: no panic, what came before is kept.
    let whole = frame(&[QTAG], true, &[DSTOPT], 17, 5003);
    for n in 0..whole.len() {
        let _ = parse_frame(&whole[..n]);
    }
    assert_eq!(parse_frame(&whole).proto, Some(17));
    // A pcap of two frames, little-endian, microseconds.
    let mut pcap = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
    pcap.extend_from_slice(&[0; 8]);
    pcap.extend_from_slice(&65535u32.to_le_bytes());
    pcap.extend_from_slice(&1u32.to_le_bytes());
    for fr in [frame(&[], false, &[], 6, 1), whole] {
        pcap.extend_from_slice(&[0; 8]);
        pcap.extend_from_slice(&(fr.len() as u32).to_le_bytes());
        pcap.extend_from_slice(&(fr.len() as u32).to_le_bytes());
        pcap.extend_from_slice(&fr);
    }
    let frames = read_pcap(&pcap);
    assert_eq!(frames.len(), 2);
    assert_eq!(frames[0].dst_port, Some(1));
    assert_eq!(frames[1].ext, [DSTOPT]);
}
