//! The device against a real tap, in a network namespace of the test's own (so nothing
//! reaches the host's interfaces): frames written to the guest's TX queue come out of the
//! tap's interface, frames sent into the interface land in the guest's RX buffers.

use super::*;
use std::os::fd::AsRawFd;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

#[test]
fn the_header_is_virtio_net_hdr_v1() {
    assert_eq!(std::mem::size_of::<VnetHeader>(), tap::VNET_HDR_LEN);
    assert_eq!(std::mem::size_of::<ConfigSpace>(), 24);
}

/// Runs the calling thread in a new network namespace; `None` (with the reason) where
/// that is not allowed.
fn own_netns() -> Option<String> {
    // SAFETY: unshare changes only this thread's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Some(format!(
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        ));
    }
    None
}

fn skip_or_fail(why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("needs a network namespace and /dev/net/tun: {why}");
    }
    eprintln!("SKIPPED: needs a network namespace and /dev/net/tun: {why}");
}

/// Sets interface `name` up (SIOCSIFFLAGS) in the current namespace.
fn set_up(name: &str) {
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: i16,
        _rest: [u8; 22],
    }
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    assert!(sock >= 0);
    let mut req = IfReq {
        name: [0; 16],
        flags: 0,
        _rest: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    unsafe {
        assert_eq!(libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req), 0);
        req.flags |= (libc::IFF_UP | libc::IFF_RUNNING) as i16;
        assert_eq!(libc::ioctl(sock, libc::SIOCSIFFLAGS, &req), 0);
        libc::close(sock);
    }
}

/// A packet socket on interface `name`: what it sends goes into the tap (RX for the
/// guest), what the guest transmits arrives on it.
struct Wire(i32);

impl Wire {
    fn on(name: &str) -> Wire {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto.into()) };
        assert!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        let cname = std::ffi::CString::new(name).unwrap();
        let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        assert!(index > 0);
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = index as i32;
        let rc = unsafe {
            libc::bind(
                fd,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0);
        let tv = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        Wire(fd)
    }

    fn send(&self, frame: &[u8]) {
        let n = unsafe { libc::send(self.0, frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(n, frame.len() as isize);
    }

    /// The next frame whose ethertype is `ty` (the kernel sends its own, e.g. IPv6 ones).
    fn recv_type(&self, ty: u16) -> Vec<u8> {
        let mut buf = vec![0u8; 70000];
        loop {
            let n = unsafe { libc::recv(self.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
            assert!(
                n > 0,
                "nothing arrived on the wire: {}",
                std::io::Error::last_os_error()
            );
            let f = &buf[..n as usize];
            if f.len() >= 14 && u16::from_be_bytes([f[12], f[13]]) == ty {
                return f.to_vec();
            }
        }
    }
}

impl Drop for Wire {
    fn drop(&mut self) {
        unsafe { libc::close(self.0) };
    }
}

const TEST_TYPE: u16 = 0x88b5; // IEEE local experimental ethertype

fn frame(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&TEST_TYPE.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Puts a chain of `descs` (address, length, writable) in `mq`'s avail slot `slot`, its
/// descriptors from index `slot * 4`.
fn post(mq: &MockSplitQueue<GuestMemoryMmap>, slot: u16, descs: &[(u64, u32, bool)]) {
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    let first = slot * 4;
    for (i, &(addr, len, writable)) in descs.iter().enumerate() {
        let at = first + i as u16;
        let mut flags = if writable {
            VRING_DESC_F_WRITE as u16
        } else {
            0
        };
        if i + 1 < descs.len() {
            flags |= VRING_DESC_F_NEXT as u16;
        }
        let d = SplitDescriptor::new(addr, len, flags, at + 1);
        mq.desc_table().store(at, RawDescriptor::from(d)).unwrap();
    }
    mq.avail()
        .ring()
        .ref_at(usize::from(slot))
        .unwrap()
        .store(first);
    mq.avail().idx().store(slot + 1);
}

/// In a network namespace of the calling thread's own: tap `tap` up (no IPv6, so the
/// kernel sends no frames of its own), a packet socket on it, and a card `id` with `mac`
/// and `chain` on the tap. `None` (after `skip_or_fail`) where the host allows neither.
fn card_on_wire(
    tap: &str,
    id: &str,
    mac: [u8; 6],
    chain: Vec<compat::InstanceSpec>,
) -> Option<(Net, Wire)> {
    if let Some(why) = own_netns() {
        skip_or_fail(&why);
        return None;
    }
    let t = match Tap::open(tap) {
        Ok(t) => t,
        Err(e) => {
            skip_or_fail(&e.to_string());
            return None;
        }
    };
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{tap}/disable_ipv6"), "1");
    set_up(tap);
    let wire = Wire::on(tap);
    let chain = Arc::new(NetChain::build(id, &chain).unwrap());
    let io = Arc::new(IoThread::spawn(id, None).unwrap());
    let dev = Net::new(id, t, mac, 1500, chain, io, Arc::default()).unwrap();
    Some((dev, wire))
}

/// Puts `frame` behind a zero header on `txq`'s first slot (header and frame in two
/// descriptors, at 0x2_0000 and 0x2_1000).
fn queue_tx(mem: &GuestMemoryMmap, txq: &MockSplitQueue<GuestMemoryMmap>, frame: &[u8]) {
    mem.write_slice(VnetHeader::default().as_slice(), GuestAddress(0x2_0000))
        .unwrap();
    mem.write_slice(frame, GuestAddress(0x2_1000)).unwrap();
    post(
        txq,
        0,
        &[(0x2_0000, 12, false), (0x2_1000, frame.len() as u32, false)],
    );
}

/// Activates `dev` with every feature it offers on these queues; the RX and TX kicks.
fn activate(
    dev: &mut Net,
    mem: &GuestMemoryMmap,
    rxq: &MockSplitQueue<GuestMemoryMmap>,
    txq: &MockSplitQueue<GuestMemoryMmap>,
) -> [EventFd; 2] {
    let kicks = [EventFd::new(0).unwrap(), EventFd::new(0).unwrap()];
    let acked = dev.features();
    dev.activate(
        mem.clone(),
        acked,
        vec![rxq.create_queue().unwrap(), txq.create_queue().unwrap()],
        kicks.iter().map(|k| k.try_clone().unwrap()).collect(),
        Arc::new(Interrupt::new(EventFd::new(0).unwrap())),
    )
    .unwrap();
    kicks
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !done() {
        assert!(t0.elapsed().as_secs() < 10, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// A frame from the guest's TX queue leaves through the tap with its bytes intact, and a
/// frame sent to the tap's interface fills the guest's RX buffer behind a virtio header
/// that says one buffer: the device end to end over a real tap, no interceptor.
#[test]
fn frames_cross_a_real_tap_both_ways() {
    std::thread::spawn(|| {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let Some((mut dev, wire)) = card_on_wire("vmmtest0", "nt", mac, Vec::new()) else {
            return;
        };
        assert_ne!(dev.features() & (1 << VIRTIO_NET_F_HOST_TSO4), 0);
        let mut cfg = [0u8; 6];
        dev.read_config(0, &mut cfg);
        assert_eq!(cfg, mac);

        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 64);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
        // TX: one chain of two descriptors, the header split from the frame.
        let out = frame([0xff; 6], mac, b"from the guest to the wire");
        queue_tx(&mem, &txq, &out);
        // RX: eight writable buffers of 2 KiB (the kernel sends frames of its own too).
        for i in 0..8u16 {
            post(&rxq, i, &[(0x3_0000 + u64::from(i) * 0x1000, 2048, true)]);
        }
        let kicks = activate(&mut dev, &mem, &rxq, &txq);
        kicks[1].write(1).unwrap();
        let got = wire.recv_type(TEST_TYPE);
        assert_eq!(got, out, "the frame the guest sent, on the wire");
        wait_for("the TX chain used", || txq.used().idx().load() == 1);

        let back = frame(mac, [2, 0, 0, 0, 0, 1], &[0x5a; 300]);
        wire.send(&back);
        // Our frame fills one buffer, whole, behind a header that says one buffer.
        let t0 = std::time::Instant::now();
        let ours = loop {
            let used = rxq.used().idx().load();
            let found = (0..used).find_map(|i| {
                let e = rxq.used().ring().ref_at(usize::from(i)).unwrap().load();
                let addr = GuestAddress(0x3_0000 + u64::from(e.id() / 4) * 0x1000);
                let mut got = vec![0u8; e.len() as usize];
                mem.read_slice(&mut got, addr).unwrap();
                (got.len() > 26 && got[24..26] == TEST_TYPE.to_be_bytes()).then_some(got)
            });
            if let Some(f) = found {
                break f;
            }
            assert!(
                t0.elapsed().as_secs() < 10,
                "our frame never reached the guest"
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        };
        assert_eq!(ours.len(), 12 + back.len());
        let hdr = VnetHeader::from_slice(&ours[..12]).copied().unwrap();
        assert_eq!(u16::from_le(hdr.0.num_buffers), 1);
        assert_eq!(&ours[12..], &back[..]);
        assert!(dev.counters().rx_frames.load(Ordering::Relaxed) >= 1);
        assert_eq!(dev.counters().tx_frames.load(Ordering::Relaxed), 1);
        // The queues' figures, as the API shows them (issue 30, item 8): receive, then
        // transmit, with the rings as guest memory holds them.
        let figures = dev.queue_stats().fields();
        assert_eq!(figures.len(), 2);
        let get = |q: usize, name: &str| {
            figures[q]
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| *v)
                .unwrap_or_else(|| panic!("no {name} in {figures:?}"))
        };
        assert_eq!(get(1, "next_avail"), 1);
        assert_eq!(get(1, "next_used"), 1);
        assert_eq!(get(1, "used_idx"), 1);
        assert_eq!(get(1, "kicks"), 1);
        assert!(get(0, "next_used") >= 1);
        assert_eq!(get(0, "guest_avail_idx"), 8);
        assert!(get(0, "interrupts") >= 1);
        assert!(dev.reset());
        let _ = wire.0.as_raw_fd();
    })
    .join()
    .unwrap();
}

/// With mergeable buffers and VIRTIO_RING_F_EVENT_IDX, a frame that finds too few buffers
/// keeps those it took and moves `avail_event` to the end of what the guest posted, so the
/// guest's next buffer kicks (a guest kicks only when its index passes `avail_event`); the
/// frame then arrives across several buffers. Putting the buffers back instead left
/// `avail_event` behind them: no kick ever came, and the card stopped receiving for good
/// (what stalled a guest flooded with large frames).
#[test]
fn a_frame_waiting_for_buffers_gets_the_kick_of_the_next_one() {
    std::thread::spawn(|| {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x57];
        let Some((mut dev, wire)) = card_on_wire("vmmtest1", "nm", mac, Vec::new()) else {
            return;
        };
        let acked = dev.features();
        assert_ne!(acked & (1 << VIRTIO_NET_F_MRG_RXBUF), 0);
        assert_ne!(acked & (1 << VIRTIO_RING_F_EVENT_IDX), 0);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        const SIZE: u16 = 64;
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0x1000), SIZE);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
        // The device's avail_event: after the used ring's 8-byte elements (virtio 1.x 2.7.8).
        let avail_event = GuestAddress(rxq.used_addr().0 + 4 + 8 * u64::from(SIZE));
        let event = || mem.read_obj::<u16>(avail_event).unwrap();
        let kicks = activate(&mut dev, &mem, &rxq, &txq);
        // A guest's buffers: 256 bytes each, slot i at 0x3_0000 + i * 0x1000.
        let buffer = |i: u16| (0x3_0000 + u64::from(i) * 0x1000, 256u32, true);
        // Posts slots from..to and kicks as a guest with EVENT_IDX does.
        let post_and_kick = |from: u16, to: u16| {
            for i in from..to {
                post(&rxq, i, &[buffer(i)]);
            }
            let ev = event();
            // vring_need_event(event, new, old)
            if to.wrapping_sub(ev).wrapping_sub(1) < to.wrapping_sub(from) {
                kicks[0].write(1).unwrap();
            }
        };
        let sent = frame(mac, [2, 0, 0, 0, 0, 1], &[0xa5; 990]);
        wire.send(&sent);
        // One buffer is too few for 12 + 1004 bytes: the device takes it and waits.
        std::thread::sleep(std::time::Duration::from_millis(200));
        post_and_kick(0, 1);
        wait_for("avail_event past the buffer the device holds", || {
            event() == 1
        });
        assert_eq!(rxq.used().idx().load(), 0, "nothing delivered yet");
        post_and_kick(1, 8);
        wait_for("the frame in the guest's buffers", || {
            rxq.used().idx().load() > 0
        });
        // The frame fills four buffers in order, behind a header that says four.
        let mut got = Vec::new();
        for i in 0..4u16 {
            let e = rxq.used().ring().ref_at(usize::from(i)).unwrap().load();
            assert_eq!(e.id(), u32::from(i) * 4, "buffers used in the order posted");
            let mut part = vec![0u8; e.len() as usize];
            mem.read_slice(&mut part, GuestAddress(buffer(i).0))
                .unwrap();
            got.extend_from_slice(&part);
        }
        let hdr = VnetHeader::from_slice(&got[..12]).copied().unwrap();
        assert_eq!(u16::from_le(hdr.0.num_buffers), 4);
        assert_eq!(&got[12..], &sent[..]);
        assert!(dev.reset());
    })
    .join()
    .unwrap();
}

/// Answers frames of its ethertypes: a transmitted 0x88b5 frame with "echo:" and its
/// payload, back to the guest, and takes it; a received 0x88b6 frame likewise, back out of
/// the tap, and takes it.
struct Echo;

const ECHO_RX_TYPE: u16 = 0x88b6;

fn echo_of(frame: &[u8]) -> Vec<u8> {
    let mut a = Vec::new();
    a.extend_from_slice(&frame[6..12]); // back to the sender
    a.extend_from_slice(&frame[0..6]);
    a.extend_from_slice(&frame[12..14]);
    a.extend_from_slice(b"echo:");
    a.extend_from_slice(&frame[14..]);
    a
}

impl interceptor_sdk::Interceptor for Echo {
    const NAME: &'static std::ffi::CStr = c"echo";
    const DEVICES: u32 = interceptor_sdk::DeviceKind::Net.mask();
    fn create(_: interceptor_sdk::CreateContext<'_>) -> Result<Self, String> {
        Ok(Echo)
    }
    fn pre(
        &self,
        req: &mut interceptor_sdk::Request<'_>,
        _: &mut interceptor_sdk::Slot,
    ) -> interceptor_sdk::Decision {
        let Some(frame) = req.frame() else {
            return interceptor_sdk::Decision::Continue;
        };
        if frame.bytes()[12..14] != TEST_TYPE.to_be_bytes() {
            return interceptor_sdk::Decision::Continue;
        }
        match frame.answer(&echo_of(frame.bytes())) {
            Ok(()) => interceptor_sdk::Decision::Complete,
            Err(_) => interceptor_sdk::Decision::Fail,
        }
    }
    fn post(
        &self,
        req: &mut interceptor_sdk::Request<'_>,
        _: interceptor_sdk::Slot,
        status: interceptor_sdk::Status,
    ) -> interceptor_sdk::Status {
        let Some(frame) = req.frame() else {
            return status;
        };
        if frame.bytes()[12..14] != ECHO_RX_TYPE.to_be_bytes() {
            return status;
        }
        let _ = frame.answer(&echo_of(frame.bytes()));
        interceptor_sdk::Status::IoError // taken: the guest never sees it
    }
}

/// A plugin's answers reach their side end to end: one to a frame the guest sent lands in
/// the guest's RX buffers (and the frame never reaches the wire), one to a frame from the
/// wire goes out of the tap (and the guest never sees the frame). Both frames count as
/// taken by the chain.
#[test]
fn answers_go_back_the_way_their_frame_came() {
    std::thread::spawn(|| {
        let plugin =
            compat::Plugin::from_static("echo", interceptor_sdk::static_table!(Echo)).unwrap();
        let spec = compat::InstanceSpec {
            id: "echo".into(),
            plugin,
            config_json: "{}".into(),
            enabled: true,
        };
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x58];
        let Some((mut dev, wire)) = card_on_wire("vmmtest2", "ne", mac, vec![spec]) else {
            return;
        };
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 64);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
        let asked = frame([2, 0, 0, 0, 0, 1], mac, b"are you there?");
        queue_tx(&mem, &txq, &asked);
        for i in 0..8u16 {
            post(&rxq, i, &[(0x3_0000 + u64::from(i) * 0x1000, 2048, true)]);
        }
        let kicks = activate(&mut dev, &mem, &rxq, &txq);
        kicks[1].write(1).unwrap();
        wait_for("the answer in the guest's buffers", || {
            rxq.used().idx().load() > 0
        });
        let e = rxq.used().ring().ref_at(0).unwrap().load();
        let mut got = vec![0u8; e.len() as usize];
        mem.read_slice(&mut got, GuestAddress(0x3_0000)).unwrap();
        assert_eq!(&got[12..], &echo_of(&asked)[..], "the answer, to the guest");
        let counters = dev.counters();
        assert_eq!(counters.tx_taken.load(Ordering::Relaxed), 1);
        assert_eq!(
            counters.tx_frames.load(Ordering::Relaxed),
            0,
            "nothing on the wire"
        );

        // From the wire: the answer goes back out of the tap, the frame goes no further.
        let mut from_wire = frame(mac, [2, 0, 0, 0, 0, 1], b"ping from the wire");
        from_wire[12..14].copy_from_slice(&ECHO_RX_TYPE.to_be_bytes());
        wire.send(&from_wire);
        let back = loop {
            let f = wire.recv_type(ECHO_RX_TYPE);
            if f != from_wire {
                break f; // the packet socket also sees what it sent itself
            }
        };
        assert_eq!(back, echo_of(&from_wire), "the answer, out of the tap");
        wait_for("the frame counted as taken", || {
            counters.rx_taken.load(Ordering::Relaxed) == 1
        });
        assert_eq!(
            rxq.used().idx().load(),
            1,
            "the guest got only the first answer"
        );
        assert!(dev.reset());
    })
    .join()
    .unwrap();
}

/// CPU time (user and system, in clock ticks) the thread named `name` of this process has
/// used.
fn thread_ticks(name: &str) -> u64 {
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
        // Fields after the command's closing parenthesis: state is field 3, utime 14.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        return f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    }
    panic!("no thread {name}");
}

/// Issue 30, item 2: a card the guest broke (an avail index a queue ahead) stops watching
/// its tap: frames waiting there used to wake its thread at once, forever (630 ms of CPU in
/// 2 s). Its thread now sleeps until the guest resets the card.
#[test]
fn a_broken_card_sleeps_while_frames_wait_on_its_tap() {
    std::thread::spawn(|| {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x5a];
        let Some((mut dev, wire)) = card_on_wire("vmmtest5", "nb", mac, Vec::new()) else {
            return;
        };
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
        let kicks = activate(&mut dev, &mem, &rxq, &txq);
        // The TX avail index 100 entries ahead of a queue of 16: the card breaks.
        txq.avail().idx().store(100);
        kicks[1].write(1).unwrap();
        wait_for("the card to break", || dev.needs_reset());
        for _ in 0..4 {
            wire.send(&frame(mac, [2, 0, 0, 0, 0, 1], &[0x11; 100]));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        let before = thread_ticks("io-nb");
        std::thread::sleep(std::time::Duration::from_secs(1));
        let used = thread_ticks("io-nb") - before;
        // A spinning thread takes most of the second (about 100 ticks); a sleeping one none.
        assert!(
            used < 20,
            "the broken card's thread used {used} ticks in 1 s"
        );
        assert!(dev.reset());
    })
    .join()
    .unwrap();
}

/// Issue 30, item 3: a TX buffer goes back to the guest only after the device read it. The
/// frame's buffer is laid over the TX used ring: read before the used entry is published,
/// the frame carries the ring as it was (index 0, the entry not yet written); published
/// first, it carried index 1.
#[test]
fn a_transmitted_frame_is_read_before_its_buffer_goes_back_to_the_guest() {
    std::thread::spawn(|| {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x5b];
        let Some((mut dev, wire)) = card_on_wire("vmmtest6", "nu", mac, Vec::new()) else {
            return;
        };
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
        let used = txq.used_addr();
        // The used ring, as the frame: flags, idx (0), entry 0 (0xaa bytes until the device
        // writes it), then entry 1's id as the ethertype, which the device never writes.
        let mut ring = vec![0xaau8; 64];
        ring[0..4].fill(0);
        ring[12..14].copy_from_slice(&TEST_TYPE.to_be_bytes());
        mem.write_slice(&ring, used).unwrap();
        mem.write_slice(VnetHeader::default().as_slice(), GuestAddress(0x2_0000))
            .unwrap();
        post(&txq, 0, &[(0x2_0000, 12, false), (used.0, 64, false)]);
        let kicks = activate(&mut dev, &mem, &rxq, &txq);
        kicks[1].write(1).unwrap();
        let got = wire.recv_type(TEST_TYPE);
        wait_for("the TX chain used", || txq.used().idx().load() == 1);
        assert_eq!(
            u16::from_le_bytes([got[2], got[3]]),
            0,
            "the used index in the frame: the buffer was given back before it was read"
        );
        assert_eq!(
            &got[4..12],
            &[0xaa; 8],
            "the used entry was written before the read"
        );
        assert!(dev.reset());
    })
    .join()
    .unwrap();
}

mod socket;
