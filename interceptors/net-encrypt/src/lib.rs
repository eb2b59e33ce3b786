//! Frame encryption between VMs (docs/net-encrypt.md): every Ethernet frame a guest sends
//! is sealed with AES-256-GCM, and every sealed frame it receives is opened, checked
//! against its sender's replay window and passed on plain; anything else it receives is
//! dropped. Between the cards only sealed frames travel: a capture on the wire sees MAC
//! addresses, lengths and timing, nothing else.
//!
//! Each instance (each boot of a card) draws a random 16-byte epoch and seals under a key of
//! its own, derived from the shared key, its key id and that epoch: no two senders share a
//! cipher key, so the counter alone is the nonce, and it counts from 1. A receiver opens a
//! sender's frames only after a handshake ([`peers`]): it asks the sender a random
//! question, and the sender's sealed answer proves it runs now and says from which counter
//! on its frames are new. So a frame is accepted once, whatever either side forgot when it
//! restarted, however many senders there are (a full table refuses new ones), and a card's
//! own frames reflected back to it are refused.

mod peers;
mod window;
pub mod wire;

use aes_gcm::{AeadInOut, Aes256Gcm, KeyInit, Tag};
use interceptor_sdk::key::read_key_file;
use interceptor_sdk::{
    abi, export_interceptor, CreateContext, Decision, DeviceKind, Frame, Interceptor, LogLevel,
    Lower, Request, RequestKind, Slot, Status,
};
use peers::{Ask, Peers};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;
use wire::{Control, Epoch, Header, Nonce, Parsed, CONTROL_BODY, CONTROL_FRAME, HEADER, TAG};

pub use wire::{ETHERTYPE, OVERHEAD, VERSION};

const KEY_CONTEXT: &str = "vmm net-encrypt 2026-12 sender key v2";
/// Counters stop here (a sender would need centuries at line rate): the card then refuses
/// to send rather than reuse a nonce; a restart (a new epoch) starts over.
pub const COUNTER_LIMIT: u64 = 1 << 62;
/// The most peers a config may ask for.
pub const MAX_PEERS: usize = 4096;
const NONE: Nonce = [0; 16];

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// 32 raw bytes or 64 hex digits: the key this card seals with (and opens with).
    key_file: std::path::PathBuf,
    /// Its id on the wire (0 to 255), so that peers holding two keys know which one.
    #[serde(default = "default_key_id")]
    key_id: u8,
    /// A second key this card opens frames with but never seals with (a key rotation).
    accept_key_file: Option<std::path::PathBuf>,
    accept_key_id: Option<u8>,
    /// Frames of a sender accepted out of order (a replayed one never is).
    #[serde(default = "default_window")]
    replay_window: u64,
    /// Senders admitted at once.
    #[serde(default = "default_max_peers")]
    max_peers: usize,
}

fn default_key_id() -> u8 {
    1
}

fn default_window() -> u64 {
    1024
}

fn default_max_peers() -> usize {
    256
}

/// What an instance seals and opens with.
pub struct Settings {
    /// The key it seals with, and its id.
    pub key: (u8, [u8; 32]),
    /// A second key it opens with.
    pub accept: Option<(u8, [u8; 32])>,
    pub replay_window: u64,
    pub max_peers: usize,
}

#[derive(Default)]
struct Counters {
    sealed: AtomicU64,
    opened: AtomicU64,
    /// Received frames that did not authenticate (forged, damaged, another key) or that
    /// no sender makes (malformed).
    forged: AtomicU64,
    replayed: AtomicU64,
    /// This card's own frames, come back.
    reflected: AtomicU64,
    /// Received frames that were not sealed at all.
    unsealed: AtomicU64,
    /// Sealed by another version of the wire format.
    wrong_version: AtomicU64,
    /// Sealed under a key id this card does not hold.
    unknown_key: AtomicU64,
    /// Frames too long to seal within the buffer (none, at the MTU the card tells).
    too_long: AtomicU64,
    /// Frames not sent because the counter reached its limit.
    exhausted: AtomicU64,
    /// Authentic frames from a sender not admitted yet (dropped while it is asked).
    unadmitted: AtomicU64,
    /// Authentic frames from a sender refused: the table of peers or of handshakes full.
    refused: AtomicU64,
    /// Senders admitted (handshakes done).
    admitted: AtomicU64,
    /// Handshake messages sent.
    control_sent: AtomicU64,
    /// Questions not answered: the answers' rate limit.
    answers_limited: AtomicU64,
}

pub struct NetEncrypt {
    epoch: Epoch,
    key_id: u8,
    keys: Vec<(u8, [u8; 32])>,
    /// This sender's cipher (its key derived from its epoch).
    cipher: Aes256Gcm,
    next: AtomicU64,
    /// The questions' secret: question n is a keyed hash of n.
    question_key: [u8; 32],
    questions: AtomicU64,
    /// The guest's MAC (learned from what it sends; bit 63 set once learned).
    own_mac: AtomicU64,
    peers: Mutex<Peers<Aes256Gcm>>,
    lower: Option<Lower>,
    warned_version: AtomicBool,
    c: Counters,
}

fn sender_cipher(key: &[u8; 32], key_id: u8, epoch: &Epoch) -> Aes256Gcm {
    let mut material = [0u8; 32 + 1 + wire::EPOCH_LEN];
    material[..32].copy_from_slice(key);
    material[32] = key_id;
    material[33..].copy_from_slice(epoch);
    Aes256Gcm::new(&blake3::derive_key(KEY_CONTEXT, &material).into())
}

fn random<const N: usize>() -> Result<[u8; N], String> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| format!("no random bytes: {e}"))?;
    Ok(b)
}

fn mac_at(bytes: &[u8], at: usize) -> [u8; 6] {
    let mut m = [0u8; 6];
    m.copy_from_slice(&bytes[at..at + 6]);
    m
}

fn is_unicast(mac: &[u8; 6]) -> bool {
    mac[0] & 1 == 0 && *mac != [0; 6]
}

impl NetEncrypt {
    pub fn new(s: Settings) -> Result<NetEncrypt, String> {
        if let Some((id, _)) = s.accept {
            if id == s.key.0 {
                return Err(format!(
                    "accept_key_id {id} is key_id too: give each key its own id"
                ));
            }
        }
        let epoch = random::<{ wire::EPOCH_LEN }>()?;
        let mut keys = vec![s.key];
        keys.extend(s.accept);
        Ok(NetEncrypt {
            epoch,
            key_id: s.key.0,
            cipher: sender_cipher(&s.key.1, s.key.0, &epoch),
            keys,
            next: AtomicU64::new(1),
            question_key: random()?,
            questions: AtomicU64::new(0),
            own_mac: AtomicU64::new(0),
            peers: Mutex::new(Peers::new(s.max_peers, s.replay_window, Instant::now())),
            lower: None,
            warned_version: AtomicBool::new(false),
            c: Counters::default(),
        })
    }

    fn key(&self, id: u8) -> Option<&[u8; 32]> {
        self.keys.iter().find(|(i, _)| *i == id).map(|(_, k)| k)
    }

    fn peers(&self) -> MutexGuard<'_, Peers<Aes256Gcm>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn next_counter(&self) -> Option<u64> {
        let n = self.next.fetch_add(1, Relaxed);
        if n >= COUNTER_LIMIT {
            self.next.store(COUNTER_LIMIT, Relaxed);
            self.c.exhausted.fetch_add(1, Relaxed);
            return None;
        }
        Some(n)
    }

    /// A new question: unpredictable, never all zero, never repeated by this instance.
    fn question(&self) -> Nonce {
        let n = self.questions.fetch_add(1, Relaxed);
        let h = blake3::keyed_hash(&self.question_key, &n.to_le_bytes());
        let mut q = [0u8; 16];
        q.copy_from_slice(&h.as_bytes()[..16]);
        if q == NONE {
            q[0] = 1;
        }
        q
    }

    /// Seals `frame` in place; false if it cannot (too long for its buffer, or the
    /// counter is spent).
    pub fn seal(&self, frame: &mut Frame<'_>) -> bool {
        let len = frame.bytes().len();
        if len + OVERHEAD > frame.capacity() {
            self.c.too_long.fetch_add(1, Relaxed);
            return false;
        }
        let src = mac_at(frame.bytes(), 6);
        if is_unicast(&src) {
            let mut m = [0u8; 8];
            m[2..].copy_from_slice(&src);
            self.own_mac.store(u64::from_be_bytes(m) | 1 << 63, Relaxed);
        }
        let Some(counter) = self.next_counter() else {
            return false;
        };
        let h = Header {
            kind: wire::KIND_DATA,
            key_id: self.key_id,
            epoch: self.epoch,
            counter,
        };
        let buf = frame.buffer_mut();
        buf.copy_within(12..len, HEADER);
        let end = HEADER + len - 12;
        if !self.seal_in_place(&mut buf[..end + TAG], &h) || frame.set_len(end + TAG).is_err() {
            return false;
        }
        self.c.sealed.fetch_add(1, Relaxed);
        true
    }

    /// Writes `h` into `buf` (the MACs and the sealed part in place, room for the tag at
    /// its end) and seals it.
    fn seal_in_place(&self, buf: &mut [u8], h: &Header) -> bool {
        wire::write_header(buf, h);
        let (head, rest) = buf.split_at_mut(HEADER);
        let (body, tag) = rest.split_at_mut(rest.len() - TAG);
        match self
            .cipher
            .encrypt_inout_detached(&wire::nonce(h.counter).into(), head, body.into())
        {
            Ok(t) => {
                tag.copy_from_slice(&t);
                true
            }
            Err(_) => false,
        }
    }

    /// Opens a received `frame` in place: true if it is a data frame for the guest. A
    /// handshake message is answered (through `frame.answer`) and taken; anything that is
    /// not sealed, does not authenticate, was seen before or comes from a sender not
    /// admitted is dropped and counted.
    pub fn open(&self, frame: &mut Frame<'_>, now: Instant) -> bool {
        let h = match wire::parse(frame.bytes()) {
            Parsed::Sealed(h) => h,
            Parsed::Plain => return self.count(&self.c.unsealed),
            Parsed::Malformed => return self.count(&self.c.forged),
            Parsed::Version(v) => {
                self.warn_version(v, &mac_at(frame.bytes(), 6));
                return self.count(&self.c.wrong_version);
            }
        };
        let Some(key) = self.key(h.key_id) else {
            return self.count(&self.c.unknown_key);
        };
        let mut peers = self.peers();
        // The sender's cipher: this card's own (a reflection), a known sender's, or one
        // derived for a sender heard from for the first time (kept if it is asked).
        let mut derived = None;
        let authentic = {
            let known = if h.epoch == self.epoch && h.key_id == self.key_id {
                Some(&self.cipher)
            } else {
                peers.keep(&h.epoch, h.key_id)
            };
            let cipher = match known {
                Some(c) => c,
                None => derived.insert(sender_cipher(key, h.key_id, &h.epoch)),
            };
            open_in_place(cipher, frame.bytes_mut(), h.counter)
        };
        if !authentic {
            return self.count(&self.c.forged);
        }
        if h.epoch == self.epoch {
            return self.count(&self.c.reflected);
        }
        if h.kind == wire::KIND_CONTROL {
            self.handshake(&mut peers, frame, &h, derived, now);
            return false;
        }
        if !peers.is_admitted(&h.epoch) {
            self.ask(&mut peers, frame, &h, derived, now);
            return self.count(&self.c.unadmitted);
        }
        if !peers.accept(&h.epoch, h.counter, now) {
            return self.count(&self.c.replayed);
        }
        drop(peers);
        let len = frame.bytes().len();
        frame.bytes_mut().copy_within(HEADER..len - TAG, 12);
        if frame.set_len(len - OVERHEAD).is_err() {
            return false;
        }
        self.c.opened.fetch_add(1, Relaxed);
        true
    }

    /// Counts one frame dropped for `why`.
    fn count(&self, why: &AtomicU64) -> bool {
        why.fetch_add(1, Relaxed);
        false
    }

    /// What to keep for a sender about to be asked: the cipher its frame was opened
    /// with, if it was derived for it.
    fn keep(&self, derived: Option<Aes256Gcm>, h: &Header) -> Aes256Gcm {
        match (derived, self.key(h.key_id)) {
            (Some(c), _) => c,
            (None, Some(k)) => sender_cipher(k, h.key_id, &h.epoch),
            // Not reached: the key was found before the frame was opened.
            (None, None) => self.cipher.clone(),
        }
    }

    /// A sender not admitted: ask it (unless a question is out, or the table is full).
    fn ask(
        &self,
        peers: &mut Peers<Aes256Gcm>,
        frame: &Frame<'_>,
        h: &Header,
        derived: Option<Aes256Gcm>,
        now: Instant,
    ) {
        let keep = || self.keep(derived, h);
        match peers.ask(h.epoch, h.key_id, self.question(), keep, now) {
            Ask::Send(q) => self.send_control(frame, h.epoch, NONE, q),
            Ask::Wait => {}
            Ask::Full => {
                self.c.refused.fetch_add(1, Relaxed);
            }
        }
    }

    /// A handshake message (already authenticated): admit its sender if it answers our
    /// question, and answer its question.
    fn handshake(
        &self,
        peers: &mut Peers<Aes256Gcm>,
        frame: &Frame<'_>,
        h: &Header,
        derived: Option<Aes256Gcm>,
        now: Instant,
    ) {
        let mut body = [0u8; CONTROL_BODY];
        body.copy_from_slice(&frame.bytes()[HEADER..HEADER + CONTROL_BODY]);
        let msg = Control::from_bytes(&body);
        if msg.to != self.epoch {
            // For another card (a switch floods what it has not learned): not ours.
            return;
        }
        if peers.is_admitted(&h.epoch) {
            if !peers.accept(&h.epoch, h.counter, now) {
                self.c.replayed.fetch_add(1, Relaxed);
                return;
            }
        } else if msg.answer != NONE
            && peers.answered(&h.epoch, h.key_id, &msg.answer, h.counter, now)
        {
            self.c.admitted.fetch_add(1, Relaxed);
        }
        if msg.ask == NONE {
            return;
        }
        if !peers.may_answer(now) {
            self.c.answers_limited.fetch_add(1, Relaxed);
            return;
        }
        // Ask back at once if this sender is not admitted here yet: both directions are
        // open after one and a half round trips.
        let ours = if peers.is_admitted(&h.epoch) {
            NONE
        } else {
            let keep = || self.keep(derived, h);
            match peers.ask(h.epoch, h.key_id, self.question(), keep, now) {
                Ask::Send(q) => q,
                Ask::Wait | Ask::Full => NONE,
            }
        };
        self.send_control(frame, h.epoch, msg.ask, ours);
    }

    /// Sends a handshake message back to the sender of `frame`.
    fn send_control(&self, frame: &Frame<'_>, to: Epoch, answer: Nonce, ask: Nonce) {
        let rx = frame.bytes();
        let (peer, dst) = (mac_at(rx, 6), mac_at(rx, 0));
        let learned = self.own_mac.load(Relaxed);
        let src = if learned != 0 {
            let b = learned.to_be_bytes();
            mac_at(&b[2..], 0)
        } else if is_unicast(&dst) {
            dst
        } else {
            // Nothing sent yet and a broadcast received: a locally administered address
            // of this epoch's.
            let mut m = mac_at(&self.epoch, 0);
            m[0] = (m[0] & 0xfc) | 0x02;
            m
        };
        let Some(counter) = self.next_counter() else {
            return;
        };
        let mut out = [0u8; CONTROL_FRAME];
        out[..6].copy_from_slice(&peer);
        out[6..12].copy_from_slice(&src);
        let body = Control {
            to,
            answer,
            ask,
            versions: wire::VERSIONS,
        };
        out[HEADER..HEADER + CONTROL_BODY].copy_from_slice(&body.to_bytes());
        let h = Header {
            kind: wire::KIND_CONTROL,
            key_id: self.key_id,
            epoch: self.epoch,
            counter,
        };
        if self.seal_in_place(&mut out, &h) && frame.answer(&out).is_ok() {
            self.c.control_sent.fetch_add(1, Relaxed);
        }
    }

    fn warn_version(&self, v: u8, from: &[u8; 6]) {
        if self.warned_version.swap(true, Relaxed) {
            return;
        }
        if let Some(lower) = &self.lower {
            let mac: Vec<String> = from.iter().map(|b| format!("{b:02x}")).collect();
            lower.log(
                LogLevel::Warn,
                &format!(
                    "a frame sealed by wire format version {v} from {}: this plugin speaks \
                     version {VERSION} only and drops it (counted as wrong_version); run the \
                     same net-encrypt on every peer",
                    mac.join(":")
                ),
            );
        }
    }
}

/// Opens a sealed frame's body in place under `cipher`.
fn open_in_place(cipher: &Aes256Gcm, buf: &mut [u8], counter: u64) -> bool {
    let len = buf.len();
    let mut tag = [0u8; TAG];
    tag.copy_from_slice(&buf[len - TAG..]);
    let (head, rest) = buf.split_at_mut(HEADER);
    let body = &mut rest[..len - TAG - HEADER];
    cipher
        .decrypt_inout_detached(
            &wire::nonce(counter).into(),
            head,
            body.into(),
            &Tag::from(tag),
        )
        .is_ok()
}

impl Interceptor for NetEncrypt {
    const NAME: &'static std::ffi::CStr = c"net-encrypt";
    const DEVICES: u32 = DeviceKind::Net.mask();
    // A sealed frame must fit the link: no 64 KiB segments, no checksums left undone.
    const FLAGS: u32 = abi::F_NET_PLAIN_FRAMES;
    const NET_HEADROOM: u32 = OVERHEAD as u32;

    fn create(ctx: CreateContext<'_>) -> Result<Self, String> {
        let cfg: Config = ctx.config_as()?;
        if cfg.replay_window == 0 || cfg.replay_window > window::MAX_WINDOW {
            return Err(format!(
                "replay_window must be 1 to {} frames",
                window::MAX_WINDOW
            ));
        }
        if cfg.max_peers == 0 || cfg.max_peers > MAX_PEERS {
            return Err(format!("max_peers must be 1 to {MAX_PEERS}"));
        }
        let accept = match (&cfg.accept_key_file, cfg.accept_key_id) {
            (Some(f), Some(id)) => Some((id, read_key_file(f)?.0)),
            (None, None) => None,
            _ => {
                return Err("accept_key_file and accept_key_id go together: \
                            give both or neither"
                    .into())
            }
        };
        let key = read_key_file(&cfg.key_file)?;
        let mut me = NetEncrypt::new(Settings {
            key: (cfg.key_id, key.0),
            accept,
            replay_window: cfg.replay_window,
            max_peers: cfg.max_peers,
        })?;
        me.lower = Some(ctx.lower);
        Ok(me)
    }

    fn pre(&self, req: &mut Request<'_>, _slot: &mut Slot) -> Decision {
        if req.kind() != RequestKind::NetTx {
            return Decision::Continue;
        }
        let sealed = req.frame().is_some_and(|mut f| self.seal(&mut f));
        // Never let a frame out plain.
        if sealed {
            Decision::Continue
        } else {
            Decision::Fail
        }
    }

    fn post(&self, req: &mut Request<'_>, _slot: Slot, status: Status) -> Status {
        if req.kind() != RequestKind::NetRx || status != Status::Ok {
            return status;
        }
        let now = Instant::now();
        if req.frame().is_some_and(|mut f| self.open(&mut f, now)) {
            Status::Ok
        } else {
            Status::IoError
        }
    }

    fn stats(&self) -> serde_json::Value {
        let c = &self.c;
        let peers = self.peers();
        serde_json::json!({
            "sealed": c.sealed.load(Relaxed),
            "opened": c.opened.load(Relaxed),
            "forged": c.forged.load(Relaxed),
            "replayed": c.replayed.load(Relaxed),
            "reflected": c.reflected.load(Relaxed),
            "unsealed": c.unsealed.load(Relaxed),
            "wrong_version": c.wrong_version.load(Relaxed),
            "unknown_key": c.unknown_key.load(Relaxed),
            "too_long": c.too_long.load(Relaxed),
            "exhausted": c.exhausted.load(Relaxed),
            "unadmitted": c.unadmitted.load(Relaxed),
            "refused": c.refused.load(Relaxed),
            "admitted": c.admitted.load(Relaxed),
            "control_sent": c.control_sent.load(Relaxed),
            "answers_limited": c.answers_limited.load(Relaxed),
            "peers": peers.len(),
            "peer_window_bytes": peers.window_bytes(),
        })
    }
}

export_interceptor!(NetEncrypt);

#[cfg(test)]
mod tests;
