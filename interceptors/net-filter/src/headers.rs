//! What the filter reads of a frame: its Ethernet header (one VLAN tag skipped), and for
//! IPv4 and IPv6 the protocol, the addresses and, for TCP and UDP, the ports. Every read is
//! bounds-checked: a short or malformed frame has fewer fields, never a panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const ETH_IPV4: u16 = 0x0800;
pub const ETH_ARP: u16 = 0x0806;
pub const ETH_VLAN: u16 = 0x8100;
pub const ETH_IPV6: u16 = 0x86dd;
pub const IP_TCP: u8 = 6;
pub const IP_UDP: u8 = 17;

/// The fields of one frame the rules look at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers {
    pub src_mac: [u8; 6],
    /// The ethertype after any VLAN tag.
    pub ethertype: u16,
    pub ip_protocol: Option<u8>,
    pub src_ip: Option<IpAddr>,
    pub dst_ip: Option<IpAddr>,
    pub src_port: Option<u16>,
    pub dst_port: Option<u16>,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn array<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..at.checked_add(N)?)?.try_into().ok()
}

/// Reads `frame`'s headers; `None` if it is shorter than an Ethernet header. A frame cut
/// short past that has the fields it holds.
pub fn parse(frame: &[u8]) -> Option<Headers> {
    let mut h = Headers {
        src_mac: array(frame, 6)?,
        ethertype: be16(frame, 12)?,
        ..Headers::default()
    };
    let _ = upper(&mut h, frame);
    Some(h)
}

/// The fields past the Ethernet header, as far as the frame holds them.
fn upper(h: &mut Headers, frame: &[u8]) -> Option<()> {
    let mut at = 14;
    if h.ethertype == ETH_VLAN {
        h.ethertype = be16(frame, 16)?;
        at = 18;
    }
    let l3 = frame.get(at..)?;
    let l4 = match h.ethertype {
        ETH_IPV4 => {
            let ihl = usize::from(*l3.first()? & 0x0f) * 4;
            if ihl < 20 {
                return None;
            }
            h.ip_protocol = Some(*l3.get(9)?);
            h.src_ip = Some(IpAddr::V4(Ipv4Addr::from(array::<4>(l3, 12)?)));
            h.dst_ip = Some(IpAddr::V4(Ipv4Addr::from(array::<4>(l3, 16)?)));
            // A fragment after the first carries no ports.
            if be16(l3, 6)? & 0x1fff != 0 {
                return None;
            }
            l3.get(ihl..)?
        }
        ETH_ARP => {
            // The sender's protocol address, for anti-spoofing (IPv4 over Ethernet).
            if be16(l3, 2) == Some(ETH_IPV4) {
                h.src_ip = Some(IpAddr::V4(Ipv4Addr::from(array::<4>(l3, 14)?)));
            }
            return None;
        }
        ETH_IPV6 => {
            // No extension headers are walked: with one, the ports are unknown.
            h.ip_protocol = Some(*l3.get(6)?);
            h.src_ip = Some(IpAddr::V6(Ipv6Addr::from(array::<16>(l3, 8)?)));
            h.dst_ip = Some(IpAddr::V6(Ipv6Addr::from(array::<16>(l3, 24)?)));
            l3.get(40..)?
        }
        _ => return None,
    };
    if let Some(IP_TCP | IP_UDP) = h.ip_protocol {
        h.src_port = be16(l4, 0);
        h.dst_port = be16(l4, 2);
    }
    Some(())
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
