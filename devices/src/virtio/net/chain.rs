//! A guest's buffers, checked before they are touched: every descriptor inside guest memory
//! and of the right direction, a TX chain at most a header and a 64 KiB frame, and the
//! offload header of a transmitted frame consistent with the frame and with what was
//! negotiated. Shared by the card's handler and the fuzz target.

use super::tap::VNET_HDR_LEN;
use super::VnetHeader;
use compat::{FrameBuf, MAX_FRAME};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// The longest TX chain: a header and the largest frame.
pub const MAX_TX_CHAIN: usize = VNET_HDR_LEN + MAX_FRAME;

/// The guest-memory ranges of one descriptor chain, checked.
#[derive(Debug)]
pub struct Buffers {
    pub head: u16,
    pub ranges: Vec<(GuestAddress, usize)>,
    pub total: usize,
}

/// The chain's buffers if each is inside guest memory, `writable` (RX) or not (TX), and
/// together at most `limit` bytes; else its head and why not.
pub fn buffers(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    writable: bool,
    limit: usize,
) -> Result<Buffers, (u16, &'static str)> {
    let head = chain.head_index();
    let mut ranges = Vec::new();
    let mut total = 0usize;
    for d in chain {
        if d.is_write_only() != writable {
            return Err((head, "a buffer of the wrong direction"));
        }
        let len = d.len() as usize;
        if !mem.check_range(d.addr(), len) {
            return Err((head, "a buffer outside guest memory"));
        }
        total = total.checked_add(len).ok_or((head, "a chain too long"))?;
        if total > limit {
            return Err((head, "a chain longer than a frame"));
        }
        if len > 0 {
            ranges.push((d.addr(), len));
        }
    }
    Ok(Buffers {
        head,
        ranges,
        total,
    })
}

/// Copies a TX chain's header and frame out of guest memory into `frame` (whose buffer
/// holds at least [`MAX_FRAME`]); the header, or why the chain is refused.
pub fn read_tx(
    mem: &GuestMemoryMmap,
    b: &Buffers,
    frame: &mut FrameBuf,
) -> Result<VnetHeader, &'static str> {
    if b.total < VNET_HDR_LEN + compat::abi::NET_FRAME_MIN as usize {
        return Err("a frame shorter than an Ethernet header");
    }
    if b.total > MAX_TX_CHAIN || frame.capacity() < b.total - VNET_HDR_LEN {
        return Err("a frame longer than 64 KiB");
    }
    let mut header = VnetHeader::default();
    // The stream is header | frame, scattered over the ranges.
    let mut pos = 0usize;
    for &(addr, len) in &b.ranges {
        let mut done = 0usize;
        while done < len {
            let at = pos + done;
            let (dst, n) = if at < VNET_HDR_LEN {
                let n = (VNET_HDR_LEN - at).min(len - done);
                (&mut header.as_mut_slice()[at..at + n], n)
            } else {
                let off = at - VNET_HDR_LEN;
                let n = len - done;
                (&mut frame.buffer_mut()[off..off + n], n)
            };
            let src = addr
                .checked_add(done as u64)
                .ok_or("a buffer past the end of the address space")?;
            mem.read_slice(dst, src)
                .map_err(|_| "a buffer outside guest memory")?;
            done += n;
        }
        pos += len;
    }
    frame.set_len(b.total - VNET_HDR_LEN);
    Ok(header)
}

/// Bytes a frame may carry beyond its MTU: the Ethernet header and one VLAN tag (a guest's
/// VLAN device over the card sends frames of the card's MTU behind a tag).
pub const MAX_FRAME_OVER_MTU: usize = 14 + 4;
/// The smallest IP and TCP headers a segment carries besides its `gso_size` bytes.
const TCP4_HEADERS: usize = 20 + 20;
const TCP6_HEADERS: usize = 40 + 20;

/// Whether a transmitted frame's offload header asks only for what the device offered and
/// the guest accepted (`acked`; none under a chain that needs plain frames), points inside
/// the frame, and whether the frame (each segment, for a segmentation offload) fits the
/// `mtu` the guest was told: a longer one would not fit the link (or, under net-encrypt,
/// would not fit once sealed).
pub fn check_tx_header(
    h: &VnetHeader,
    frame_len: usize,
    acked: u64,
    mtu: u16,
) -> Result<(), &'static str> {
    let has = |bit: u32| acked & (1u64 << bit) != 0;
    let mtu = usize::from(mtu);
    let h = h.0;
    if h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8 != 0 {
        if !has(VIRTIO_NET_F_CSUM) {
            return Err("a checksum offload the device did not offer");
        }
        let end =
            usize::from(u16::from_le(h.csum_start)) + usize::from(u16::from_le(h.csum_offset)) + 2;
        if end > frame_len {
            return Err("a checksum past the frame");
        }
    } else if h.flags != 0 {
        return Err("unknown header flags");
    }
    let gso = h.gso_type & !(VIRTIO_NET_HDR_GSO_ECN as u8);
    if gso == VIRTIO_NET_HDR_GSO_NONE as u8 {
        if frame_len > mtu + MAX_FRAME_OVER_MTU {
            return Err("a frame longer than the MTU the guest was told");
        }
        return Ok(());
    }
    let (allowed, headers) = match u32::from(gso) {
        VIRTIO_NET_HDR_GSO_TCPV4 => (has(VIRTIO_NET_F_HOST_TSO4), TCP4_HEADERS),
        VIRTIO_NET_HDR_GSO_TCPV6 => (has(VIRTIO_NET_F_HOST_TSO6), TCP6_HEADERS),
        _ => (false, 0),
    };
    if !allowed || h.gso_type & VIRTIO_NET_HDR_GSO_ECN as u8 != 0 {
        return Err("a segmentation offload the device did not offer");
    }
    if h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8 == 0 {
        return Err("a segmentation offload without a checksum offload");
    }
    if u16::from_le(h.gso_size) == 0 || usize::from(u16::from_le(h.hdr_len)) > frame_len {
        return Err("a segmentation offload with a bad segment size or header length");
    }
    if usize::from(u16::from_le(h.gso_size)) + headers > mtu {
        return Err("segments longer than the MTU the guest was told");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use compat::abi::NetHeader;

    fn hdr(flags: u8, gso_type: u8, csum: (u16, u16), gso_size: u16) -> VnetHeader {
        VnetHeader(NetHeader {
            flags,
            gso_type,
            hdr_len: 54u16.to_le(),
            gso_size: gso_size.to_le(),
            csum_start: csum.0.to_le(),
            csum_offset: csum.1.to_le(),
            num_buffers: 0,
        })
    }

    #[test]
    fn headers_ask_only_for_what_was_negotiated_and_point_inside_the_frame() {
        let all = (1u64 << VIRTIO_NET_F_CSUM)
            | (1 << VIRTIO_NET_F_HOST_TSO4)
            | (1 << VIRTIO_NET_F_HOST_TSO6);
        let csum = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
        let tcp4 = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
        assert!(check_tx_header(&VnetHeader::default(), 60, 0, 1500).is_ok());
        assert!(check_tx_header(&hdr(csum, 0, (34, 16), 0), 60, all, 1500).is_ok());
        assert!(
            check_tx_header(&hdr(csum, 0, (34, 16), 0), 60, 0, 1500).is_err(),
            "not offered"
        );
        assert!(
            check_tx_header(&hdr(csum, 0, (50, 16), 0), 60, all, 1500).is_err(),
            "past the end"
        );
        assert!(check_tx_header(&hdr(csum, tcp4, (34, 16), 1448), 60000, all, 1500).is_ok());
        assert!(check_tx_header(&hdr(csum, tcp4, (34, 16), 0), 60000, all, 1500).is_err());
        assert!(check_tx_header(&hdr(0, tcp4, (0, 0), 1448), 60000, all, 1500).is_err());
        assert!(
            check_tx_header(&hdr(csum, 3, (34, 16), 1448), 60000, all, 1500).is_err(),
            "UDP"
        );
        assert!(check_tx_header(&hdr(0x80, 0, (0, 0), 0), 60, all, 1500).is_err());
        let plain = 0;
        assert!(check_tx_header(&hdr(csum, tcp4, (34, 16), 1448), 60000, plain, 1500).is_err());
        // Issue 30, item 5: nothing longer than the MTU the guest was told (1468 under
        // net-encrypt): a plain frame past it and its tag, or segments past it.
        assert!(check_tx_header(&VnetHeader::default(), 1468 + 18, 0, 1468).is_ok());
        assert!(check_tx_header(&VnetHeader::default(), 1468 + 19, 0, 1468).is_err());
        assert!(check_tx_header(&VnetHeader::default(), 9000, all, 1500).is_err());
        assert!(check_tx_header(&hdr(csum, tcp4, (34, 16), 1428), 60000, all, 1468).is_ok());
        assert!(check_tx_header(&hdr(csum, tcp4, (34, 16), 1448), 60000, all, 1468).is_err());
        let tcp6 = VIRTIO_NET_HDR_GSO_TCPV6 as u8;
        assert!(check_tx_header(&hdr(csum, tcp6, (54, 16), 1440), 60000, all, 1500).is_ok());
        assert!(check_tx_header(&hdr(csum, tcp6, (54, 16), 1448), 60000, all, 1500).is_err());
    }
}
