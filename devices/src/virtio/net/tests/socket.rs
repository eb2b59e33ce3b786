//! The card over a tap played by a `SOCK_SEQPACKET` pair (`Tap::from_fd`): what a real tap
//! cannot be made to do (hang up), and rings laid out as no driver would; no namespace needed.

use super::*;

/// A card over a `SOCK_SEQPACKET` pair (no namespace needed): the tap and its wire.
fn card_on_socket(id: &str) -> (Net, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two new descriptors into `fds`.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0);
    // SAFETY: both descriptors are new and owned here.
    let (ours, theirs) = unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    };
    let chain = Arc::new(NetChain::build(id, &[]).unwrap());
    let io = Arc::new(IoThread::spawn(id, None).unwrap());
    let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x5c];
    let dev = Net::new(
        id,
        Tap::from_fd(ours, id),
        mac,
        1500,
        chain,
        io,
        Arc::default(),
    )
    .unwrap();
    (dev, theirs)
}

/// Found by the `net_worker` fuzz target: a tap that hangs up (a read returns the end of
/// the file, forever after) held the card's thread in an endless loop of empty reads, and
/// stayed ready in the epoll set. It is now given up until the guest resets the card: the
/// thread sleeps, and the card still transmits.
#[test]
fn a_tap_that_hangs_up_is_given_up_and_the_thread_sleeps() {
    let (mut dev, wire) = card_on_socket("nh");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let rxq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
    let txq = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
    post(&rxq, 0, &[(0x2_0000, 2048, true)]);
    let kicks = activate(&mut dev, &mem, &rxq, &txq);
    let counters = dev.counters();
    drop(wire);
    kicks[0].write(1).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let before = thread_ticks("io-nh");
    std::thread::sleep(std::time::Duration::from_secs(1));
    let used = thread_ticks("io-nh") - before;
    // A spinning thread takes most of the second (about 100 ticks); a sleeping one none.
    assert!(used < 20, "the card's thread used {used} ticks in 1 s");
    // It still transmits (the frame is dropped at the tap, which has no reader).
    mem.write_slice(VnetHeader::default().as_slice(), GuestAddress(0x3_0000))
        .unwrap();
    post(&txq, 0, &[(0x3_0000, 12, false), (0x3_1000, 60, false)]);
    kicks[1].write(1).unwrap();
    wait_for("the TX chain used", || txq.used().idx().load() == 1);
    assert_eq!(counters.tx_dropped.load(Ordering::Relaxed), 1);
    assert!(dev.reset());
}

/// Found by the `net_worker` fuzz target, the sibling of a bug the disks had: a TX used
/// ring laid over the avail index (its flags word is the avail index), so that turning
/// notifications off and on moves the index between 1 and 0. The handler found nothing,
/// was told there was more, and looked again, forever. The card now breaks (needs a reset)
/// after two empty passes, and its thread sleeps.
#[test]
fn a_used_ring_laid_over_the_avail_index_breaks_the_card_instead_of_spinning() {
    let (mut dev, _wire) = card_on_socket("no");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let rxq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
    let txq = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
    let mut tx = txq.create_queue::<virtio_queue::Queue>().unwrap();
    // The avail ring at 0x9_0002 and the used ring at 0x9_0004: the used ring's flags word
    // is the avail index. Without VIRTIO_RING_F_EVENT_IDX, notifications are that word
    // (1 off, 0 on).
    let avail = 0x9_0002u64;
    tx.set_ready(false);
    tx.set_avail_ring_address(Some(avail as u32), Some(0));
    tx.set_used_ring_address(Some((avail + 2) as u32), Some(0));
    tx.set_ready(true);
    mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
    let kicks = [EventFd::new(0).unwrap(), EventFd::new(0).unwrap()];
    let acked = dev.features() & !(1u64 << VIRTIO_RING_F_EVENT_IDX);
    dev.activate(
        mem.clone(),
        acked,
        vec![rxq.create_queue().unwrap(), tx],
        kicks.iter().map(|k| k.try_clone().unwrap()).collect(),
        Arc::new(Interrupt::new(EventFd::new(0).unwrap())),
    )
    .unwrap();
    kicks[1].write(1).unwrap();
    wait_for("the card to break", || dev.needs_reset());
    std::thread::sleep(std::time::Duration::from_millis(200));
    let before = thread_ticks("io-no");
    std::thread::sleep(std::time::Duration::from_secs(1));
    let used = thread_ticks("io-no") - before;
    assert!(used < 20, "the card's thread used {used} ticks in 1 s");
    assert!(dev.reset());
}
