//! The network card's worker: a `Net` activated on fuzz-made RX and TX queues over a tap
//! played by a socket pair, whose other end (the wire) sends what the fuzz bytes make (any
//! header, frames of any length, none at all), stops reading (the card's writes find it
//! full), or hangs up; rounds of guest writes (descriptors, ring entries and indices,
//! whole RX buffers and TX frames, any bytes) and wire sends, each served by the card's
//! thread (its drain: both ways, what a wake-up does; the thread's own wake-ups run too),
//! then a reset and a second activation on other rings. The chain is empty or one plugin
//! that passes, takes, drops or answers frames as their bytes say.
//!
//! What must hold besides "no panic, no hang": every frame on the wire is a header and 14
//! to 64 KiB bytes, within the MTU the guest was told unless segmented, with
//! `num_buffers` 0; a card that needs a reset serves nothing until it gets one; a reset
//! succeeds and nothing serves the old rings after it.

use crate::guest::{self, Rings};
use crate::input::Input;
use compat::{InstanceSpec, IoThread, NetChain, MAX_FRAME};
use devices::virtio::net::tap::{Tap, VNET_HDR_LEN};
use devices::virtio::net::{Net, NetCounters, QUEUE_SIZE};
use devices::virtio::VirtioDevice;
use interceptor_sdk::{CreateContext, Decision, DeviceKind, Interceptor, Request, Slot, Status};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, OnceLock};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Rounds of guest writes and wire sends per activation.
const MAX_ROUNDS: usize = 8;
/// Most guest writes per round.
const MAX_WRITES: usize = 48;
/// Most frames the wire sends per round.
const MAX_SENDS: usize = 8;

const NEXT: u16 = 1;
const WRITE: u16 = 2;

/// A net plugin that decides by a frame's last byte: pass, take (complete), drop (fail),
/// or answer with its first 60 bytes and pass.
struct Mangle;

impl Mangle {
    fn decide(req: &mut Request<'_>) -> u8 {
        let Some(frame) = req.frame() else { return 0 };
        let last = frame.bytes().last().copied().unwrap_or(0);
        if last % 4 == 3 {
            let n = frame.bytes().len().min(60);
            let _ = frame.answer(&frame.bytes()[..n]);
        }
        last % 4
    }
}

impl Interceptor for Mangle {
    const NAME: &'static std::ffi::CStr = c"mangle";
    const DEVICES: u32 = DeviceKind::Net.mask();

    fn create(_ctx: CreateContext<'_>) -> Result<Self, String> {
        Ok(Mangle)
    }

    fn pre(&self, req: &mut Request<'_>, _slot: &mut Slot) -> Decision {
        match Mangle::decide(req) {
            1 => Decision::Complete,
            2 => Decision::Fail,
            _ => Decision::Continue,
        }
    }

    fn post(&self, req: &mut Request<'_>, _slot: Slot, status: Status) -> Status {
        match Mangle::decide(req) {
            2 => Status::IoError,
            _ => status,
        }
    }
}

/// The card's thread, shared by every input (the card on it is removed by each reset).
fn io_thread() -> Arc<IoThread> {
    static IO: OnceLock<Arc<IoThread>> = OnceLock::new();
    IO.get_or_init(|| Arc::new(IoThread::spawn("fz-net", None).expect("the card's thread")))
        .clone()
}

fn chain(inp: &mut Input<'_>) -> Arc<NetChain> {
    let specs: Vec<InstanceSpec> = if inp.bool() {
        vec![InstanceSpec {
            id: "mangle".into(),
            plugin: compat::Plugin::from_static("mangle", interceptor_sdk::static_table!(Mangle))
                .expect("mangle table"),
            config_json: "{}".into(),
            enabled: !inp.one_in(4),
        }]
    } else {
        Vec::new()
    };
    Arc::new(NetChain::build("fz", &specs).expect("the chain"))
}

/// A `SOCK_SEQPACKET` pair, both ends non-blocking: the card's tap and the wire.
fn socket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two new descriptors into `fds`.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "socketpair: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are new and owned here alone.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// The host's side of the tap.
struct Wire {
    fd: Option<OwnedFd>,
    /// Stopped reading: what the card writes fills the socket, then its writes fail.
    deaf: bool,
}

impl Wire {
    fn send(&self, bytes: &[u8]) {
        if let Some(fd) = &self.fd {
            // SAFETY: `bytes` is readable for its length; a full socket answers EAGAIN.
            unsafe { libc::send(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        }
    }

    /// Reads every frame the card wrote and checks each.
    fn check_output(&self, guest_mtu: u16) {
        let (Some(fd), false) = (&self.fd, self.deaf) else {
            return;
        };
        let mut buf = vec![0u8; VNET_HDR_LEN + MAX_FRAME + 1];
        loop {
            // SAFETY: `buf` is writable for its length.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            let Ok(n) = usize::try_from(n) else { return };
            if n == 0 {
                return;
            }
            assert!(
                n >= VNET_HDR_LEN + 14,
                "a frame without its Ethernet header: {n} bytes"
            );
            let frame = n - VNET_HDR_LEN;
            assert!(frame <= MAX_FRAME, "a frame of {frame} bytes");
            let num_buffers = u16::from_le_bytes([buf[10], buf[11]]);
            assert_eq!(num_buffers, 0, "num_buffers on the wire");
            let gso_type = buf[1];
            if gso_type == 0 {
                assert!(
                    frame <= usize::from(guest_mtu) + 18,
                    "{frame} bytes past the guest's MTU {guest_mtu}"
                );
            }
        }
    }
}

/// Frame lengths a host's network could hand a tap, and some no tap would.
fn frame_len(inp: &mut Input<'_>) -> usize {
    match inp.u8() % 8 {
        0 => 0,
        1 => inp.below(14),
        2 => 14,
        3 => 60,
        4 => 1514,
        5 => 9018,
        6 => MAX_FRAME + inp.below(16),
        _ => usize::from(inp.u16()),
    }
}

fn wire_round(inp: &mut Input<'_>, wire: &mut Wire) {
    for _ in 0..inp.below(MAX_SENDS + 1) {
        match inp.u8() % 8 {
            0 => {
                // Hangs up: the card reads the end of the file, forever after.
                trace!("net_worker: the wire hangs up");
                wire.fd = None;
            }
            1 => {
                trace!("net_worker: the wire stops or starts reading");
                wire.deaf = !wire.deaf;
            }
            _ => {
                let mut msg = if inp.bool() {
                    vec![0u8; VNET_HDR_LEN]
                } else {
                    inp.bytes(VNET_HDR_LEN).to_vec()
                };
                let len = frame_len(inp);
                let fill = inp.u8();
                msg.extend((0..len).map(|i| fill.wrapping_add(i as u8)));
                // The last byte picks what the chain's plugin does with it.
                let decides = inp.u8();
                if msg.len() > VNET_HDR_LEN {
                    if let Some(last) = msg.last_mut() {
                        *last = decides;
                    }
                }
                trace!("net_worker: the wire sends {} bytes", msg.len());
                wire.send(&msg);
            }
        }
    }
}

/// A chain of buffers as a driver posts it: for RX, writable buffers; for TX, the header
/// and a frame (an Ethernet header and bytes) readable; made available.
fn net_buffers(inp: &mut Input<'_>, mem: &GuestMemoryMmap, rings: &Rings, rx: bool) {
    let size = rings.size.max(1);
    let head = inp.u16() % size;
    let pieces = 1 + inp.below(3);
    let mut i = head;
    for p in 0..pieces {
        let at = guest::addr(inp, 2);
        let len = match inp.u8() % 4 {
            0 => VNET_HDR_LEN as u32,
            1 => 1526,
            2 => u32::from(inp.u16() % 4096),
            _ => 60 + u32::from(inp.u8()),
        };
        if !rx && p == 0 {
            // The offload header: mostly zero, sometimes any bytes.
            let hdr = if inp.bool() {
                [0u8; VNET_HDR_LEN]
            } else {
                inp.array::<VNET_HDR_LEN>()
            };
            let _ = vm_memory::Bytes::write_slice(mem, &hdr, GuestAddress(at));
        }
        let last = p + 1 == pieces;
        let flags = if rx { WRITE } else { 0 } | if last { 0 } else { NEXT };
        guest::descriptor(mem, rings, i, (at, len, flags, (i + 1) % size));
        i = (i + 1) % size;
    }
    guest::make_available(mem, rings, head);
}

fn guest_round(inp: &mut Input<'_>, mem: &GuestMemoryMmap, rx: &Rings, tx: &Rings) {
    for _ in 0..inp.below(MAX_WRITES + 1) {
        let rings = if inp.bool() { rx } else { tx };
        match inp.u8() % 4 {
            0 => net_buffers(inp, mem, rx, true),
            1 => net_buffers(inp, mem, tx, false),
            _ => guest::guest_write(inp, mem, rings),
        }
    }
}

fn snapshot(mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut v = vec![0u8; guest::LOW_END as usize];
    vm_memory::Bytes::read_slice(mem, &mut v, GuestAddress(0)).expect("read memory");
    v
}

pub fn net_worker(data: &[u8]) {
    let mut inp = Input::new(data);
    let io = io_thread();
    let chain = chain(&mut inp);
    let (ours, theirs) = socket_pair();
    let mut wire = Wire {
        fd: Some(theirs),
        deaf: false,
    };
    let mtu = inp.pick(&[1500u16, 68, 9000, 1468, 576]);
    let mut net = Net::new(
        "fz",
        Tap::from_fd(ours, "fz"),
        [0x52, 0x54, 0, 0, 0, 1],
        mtu,
        chain,
        io.clone(),
        Arc::new(NetCounters::default()),
    )
    .expect("a card");
    let guest_mtu = net.guest_mtu();
    let mem = guest::memory();
    for session in 0..2 {
        let rx_rings = Rings::from_input(&mut inp);
        let tx_rings = Rings::from_input(&mut inp);
        let rxq = guest::queue(&mut inp, QUEUE_SIZE, &rx_rings);
        let txq = guest::queue(&mut inp, QUEUE_SIZE, &tx_rings);
        let features = net.features() & inp.u64();
        guest_round(&mut inp, &mem, &rx_rings, &tx_rings);
        // What the transport promises the device at DRIVER_OK: valid queues.
        use virtio_queue::QueueT;
        if !rxq.is_valid(&mem) || !txq.is_valid(&mem) {
            return;
        }
        let (line, irq) = crate::blk::interrupt();
        let kicks = vec![
            EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            EventFd::new(EFD_NONBLOCK).expect("eventfd"),
        ];
        trace!("net_worker: session {session}, rx {rx_rings:x?}, tx {tx_rings:x?}, features {features:#x}");
        net.activate(mem.clone(), features, vec![rxq, txq], kicks, line.clone())
            .expect("activate");
        for _ in 0..MAX_ROUNDS {
            io.drain().expect("the card's thread is serving");
            trace!("net_worker: {:?}", net.counters().fields());
            wire.check_output(guest_mtu);
            if net.needs_reset() {
                // Broken: nothing more is served until the reset.
                wire_round(&mut inp, &mut wire);
                let before = snapshot(&mem);
                io.drain().expect("the card's thread is serving");
                assert!(before == snapshot(&mem), "a broken card served its queues");
                break;
            }
            if inp.is_empty() {
                break;
            }
            if inp.one_in(4) {
                line.ack(inp.u32());
            }
            guest_round(&mut inp, &mem, &rx_rings, &tx_rings);
            wire_round(&mut inp, &mut wire);
        }
        assert!(net.reset(), "a reset must succeed");
        assert!(!net.needs_reset(), "a reset clears DEVICE_NEEDS_RESET");
        wire_round(&mut inp, &mut wire);
        let before = snapshot(&mem);
        io.drain().expect("the card's thread is serving");
        assert!(
            before == snapshot(&mem),
            "a reset card still served its queues"
        );
        let _ = irq.read();
    }
}
