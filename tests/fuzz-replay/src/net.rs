//! virtio-net's TX path: the chains a guest can make checked and copied as the card does
//! (`chain::buffers`, `chain::read_tx`), the offload header they carry judged against
//! features the fuzz bytes choose (`chain::check_tx_header`). Never panics; what it
//! accepts holds to its promises.

use crate::guest::{self, Rings};
use crate::input::Input;
use compat::{FrameBuf, MAX_FRAME};
use devices::virtio::net::chain::{self, MAX_TX_CHAIN};
use devices::virtio::net::tap::VNET_HDR_LEN;
use devices::virtio::net::QUEUE_SIZE;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};

/// Most chains popped per input.
const MAX_CHAINS: usize = 64;
/// Most guest writes per round.
const MAX_WRITES: usize = 48;

pub fn net_tx(data: &[u8]) {
    let mut inp = Input::new(data);
    let mem = guest::memory();
    let acked = inp.u64();
    let rings = Rings::from_input(&mut inp);
    let mut q = guest::queue(&mut inp, QUEUE_SIZE, &rings);
    for _ in 0..inp.below(MAX_WRITES + 1) {
        guest::guest_write(&mut inp, &mem, &rings);
    }
    // A header the guest wrote somewhere its chains may point.
    let at = guest::addr(&mut inp, 1);
    let _ =
        vm_memory::Bytes::write_slice(&mem, inp.bytes(VNET_HDR_LEN), vm_memory::GuestAddress(at));
    let mut frame = FrameBuf::with_capacity(MAX_FRAME);
    for _ in 0..MAX_CHAINS {
        let chain = match q.iter(&mem) {
            Ok(mut chains) => chains.next(),
            Err(_) => break,
        };
        let Some(chain) = chain else { break };
        let head = chain.head_index();
        if let Ok(b) = chain::buffers(&mem, chain, false, MAX_TX_CHAIN) {
            check_buffers(&b, &mem);
            if let Ok(header) = chain::read_tx(&mem, &b, &mut frame) {
                assert_eq!(frame.len() + VNET_HDR_LEN, b.total, "{b:?}");
                assert!(frame.len() <= MAX_FRAME);
                // Any MTU from the smallest the card tells to the largest.
                let mtu = 68 + (inp.below(9000) as u16);
                if chain::check_tx_header(&header, frame.len(), acked, mtu).is_ok() {
                    let h = header.0;
                    if h.gso_type == 0 {
                        assert!(frame.len() <= usize::from(mtu) + 18, "past the MTU");
                    }
                    if h.flags & 1 != 0 {
                        let end = usize::from(u16::from_le(h.csum_start))
                            + usize::from(u16::from_le(h.csum_offset))
                            + 2;
                        assert!(end <= frame.len(), "a checksum past the frame: {h:?}");
                    }
                }
                assert!(
                    frame.len() >= compat::abi::NET_FRAME_MIN as usize,
                    "an accepted frame has an Ethernet header"
                );
            }
        }
        if q.add_used(&mem, head, 0).is_err() {
            break;
        }
    }
}

fn check_buffers(b: &chain::Buffers, mem: &GuestMemoryMmap) {
    assert!(b.total <= MAX_TX_CHAIN, "{b:?}");
    let sum: usize = b.ranges.iter().map(|r| r.1).sum();
    assert_eq!(sum, b.total);
    for &(at, len) in &b.ranges {
        assert!(mem.check_range(at, len), "a buffer outside memory: {b:?}");
    }
}
