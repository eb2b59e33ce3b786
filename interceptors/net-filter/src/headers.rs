//! What the filter reads of a frame: its Ethernet header and every VLAN tag (802.1Q,
//! 802.1ad and the older 0x9100, up to [`MAX_TAGS`]), and for IPv4 and IPv6 the protocol,
//! the addresses and, for TCP and UDP, the ports; IPv6 extension headers are walked to the
//! upper layer. Every read is bounds-checked: a frame cut short or malformed is marked
//! incomplete (the filter drops it), never a panic and never judged on guesses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const ETH_IPV4: u16 = 0x0800;
pub const ETH_ARP: u16 = 0x0806;
pub const ETH_VLAN: u16 = 0x8100;
pub const ETH_QINQ: u16 = 0x88a8;
pub const ETH_QINQ_OLD: u16 = 0x9100;
pub const ETH_IPV6: u16 = 0x86dd;
pub const IP_TCP: u8 = 6;
pub const IP_UDP: u8 = 17;
/// VLAN tags read at most; a frame with more is incomplete.
pub const MAX_TAGS: usize = 4;
/// IPv6 extension headers walked at most; a chain that goes on is incomplete.
pub const MAX_IPV6_EXTENSIONS: usize = 8;

/// The fields of one frame the rules look at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers {
    pub src_mac: [u8; 6],
    /// The ethertype after every VLAN tag.
    pub ethertype: u16,
    /// VLAN tags before it.
    pub tags: usize,
    /// The upper-layer protocol: IPv4's protocol, or the next header after IPv6's
    /// extension headers.
    pub ip_protocol: Option<u8>,
    pub src_ip: Option<IpAddr>,
    pub dst_ip: Option<IpAddr>,
    pub src_port: Option<u16>,
    pub dst_port: Option<u16>,
    /// Every header the frame claims was read whole: false for a frame cut short or
    /// malformed where the filter must know what follows (tags, an IP header, an extension
    /// header, TCP's or UDP's ports, ARP's addresses).
    pub complete: bool,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([
        *b.get(at)?,
        *b.get(at.checked_add(1)?)?,
    ]))
}

fn array<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..at.checked_add(N)?)?.try_into().ok()
}

/// Reads `frame`'s headers; `None` if it is shorter than an Ethernet header.
pub fn parse(frame: &[u8]) -> Option<Headers> {
    let mut h = Headers {
        src_mac: array(frame, 6)?,
        ethertype: be16(frame, 12)?,
        ..Headers::default()
    };
    h.complete = upper(&mut h, frame).is_some();
    Some(h)
}

fn is_tag(ethertype: u16) -> bool {
    matches!(ethertype, ETH_VLAN | ETH_QINQ | ETH_QINQ_OLD)
}

/// The fields past the Ethernet header; `None` where the frame is cut short or malformed.
fn upper(h: &mut Headers, frame: &[u8]) -> Option<()> {
    let mut at = 14;
    while is_tag(h.ethertype) {
        if h.tags == MAX_TAGS {
            return None;
        }
        h.ethertype = be16(frame, at + 2)?;
        h.tags += 1;
        at += 4;
    }
    let l3 = frame.get(at..)?;
    let l4 = match h.ethertype {
        ETH_IPV4 => {
            let ihl = usize::from(*l3.first()? & 0x0f) * 4;
            if *l3.first()? >> 4 != 4 || ihl < 20 || l3.len() < ihl {
                return None;
            }
            h.ip_protocol = Some(l3[9]);
            h.src_ip = Some(IpAddr::V4(Ipv4Addr::from(array::<4>(l3, 12)?)));
            h.dst_ip = Some(IpAddr::V4(Ipv4Addr::from(array::<4>(l3, 16)?)));
            // A fragment after the first carries no ports (the first, which does, decides
            // whether the datagram can be put together).
            if be16(l3, 6)? & 0x1fff != 0 {
                return Some(());
            }
            &l3[ihl..]
        }
        ETH_ARP => {
            // The sender's protocol address, for anti-spoofing (IPv4 over Ethernet: the
            // whole 28 bytes must be there).
            l3.get(..8)?;
            if be16(l3, 2)? == ETH_IPV4 {
                l3.get(..28)?;
                h.src_ip = Some(IpAddr::V4(Ipv4Addr::from(array::<4>(l3, 14)?)));
            }
            return Some(());
        }
        ETH_IPV6 => {
            if *l3.first()? >> 4 != 6 {
                return None;
            }
            h.src_ip = Some(IpAddr::V6(Ipv6Addr::from(array::<16>(l3, 8)?)));
            h.dst_ip = Some(IpAddr::V6(Ipv6Addr::from(array::<16>(l3, 24)?)));
            let (next, at, later_fragment) = ipv6_upper(l3)?;
            h.ip_protocol = Some(next);
            if later_fragment {
                return Some(());
            }
            l3.get(at..)?
        }
        _ => return Some(()),
    };
    if let Some(IP_TCP | IP_UDP) = h.ip_protocol {
        h.src_port = Some(be16(l4, 0)?);
        h.dst_port = Some(be16(l4, 2)?);
    }
    Some(())
}

/// Walks an IPv6 packet's extension headers (hop-by-hop, routing, destination options,
/// fragment, authentication): the upper-layer protocol, where it starts, and whether this
/// is a fragment after the first (no upper-layer header in it).
fn ipv6_upper(l3: &[u8]) -> Option<(u8, usize, bool)> {
    let mut next = *l3.get(6)?;
    let mut at = 40usize;
    for _ in 0..MAX_IPV6_EXTENSIONS {
        let len = match next {
            0 | 43 | 60 => (usize::from(*l3.get(at + 1)?) + 1) * 8,
            44 => {
                let offset = be16(l3, at + 2)? & 0xfff8;
                if offset != 0 {
                    return Some((*l3.get(at)?, at + 8, true));
                }
                8
            }
            51 => (usize::from(*l3.get(at + 1)?) + 2) * 4,
            upper => return Some((upper, at, false)),
        };
        next = *l3.get(at)?;
        at = at.checked_add(len)?;
        l3.get(..at)?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4_tcp(src: [u8; 4], dport: u16) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
        f.extend_from_slice(&ETH_IPV4.to_be_bytes());
        let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, IP_TCP, 0, 0];
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&[10, 0, 0, 9]);
        f.extend_from_slice(&ip);
        f.extend_from_slice(&1234u16.to_be_bytes());
        f.extend_from_slice(&dport.to_be_bytes());
        f.extend_from_slice(&[0; 16]);
        f
    }

    #[test]
    fn an_ipv4_tcp_frame_has_its_fields() {
        let h = parse(&ipv4_tcp([10, 0, 0, 2], 5001)).unwrap();
        assert_eq!(h.ethertype, ETH_IPV4);
        assert_eq!(h.ip_protocol, Some(IP_TCP));
        assert_eq!(h.src_ip, Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2))));
        assert_eq!(h.src_port, Some(1234));
        assert_eq!(h.dst_port, Some(5001));
    }

    #[test]
    fn every_cut_of_a_frame_parses_without_panic() {
        let f = ipv4_tcp([10, 0, 0, 2], 80);
        for n in 0..f.len() {
            let h = parse(&f[..n]);
            assert_eq!(h.is_some(), n >= 14, "{n} bytes");
            // Cut anywhere before the ports: incomplete (the filter drops it).
            assert_eq!(h.is_some_and(|h| h.complete), n >= 14 + 20 + 4, "{n} bytes");
        }
        // And garbage of every length.
        for n in 0..200 {
            let junk: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
            let _ = parse(&junk);
        }
    }

    #[test]
    fn a_later_fragment_has_no_ports() {
        let mut f = ipv4_tcp([10, 0, 0, 2], 80);
        f[14 + 6] = 0x00;
        f[14 + 7] = 0x10; // offset 16 * 8 bytes
        let h = parse(&f).unwrap();
        assert_eq!(h.dst_port, None);
        assert_eq!(h.ip_protocol, Some(IP_TCP));
    }
}
