//! Frame encryption between VMs (docs/net-encrypt.md): every Ethernet frame a guest sends
//! is sealed with AES-256-GCM under a key its peers share, and every sealed frame it
//! receives is opened, checked against a replay window and passed on plain; anything else
//! it receives is dropped. Between the cards only sealed frames travel: a capture on the
//! wire sees MAC addresses, lengths and timing, nothing else.
//!
//! A sealed frame: the original destination and source MACs, ethertype 0x88b5 (IEEE local
//! experimental), a version byte and a zero byte, the nonce (the sender's 4-byte salt and
//! 8-byte counter, big-endian), then the original ethertype and payload encrypted, then the
//! 16-byte tag. The MACs, the ethertype, the version and the nonce are authenticated. A
//! frame grows by 32 bytes: the plugin's headroom, by which the card lowers the guest's MTU.
//!
//! Nonces never repeat under a key: the salt is drawn at random when the instance is
//! created, and the counter starts at the wall clock's nanoseconds then and counts up, so a
//! later boot starts above anything an earlier one could have reached (it would have had to
//! send more than a frame per nanosecond), and two senders differ by their salts.

mod replay;

use aes_gcm::{AeadInOut, Aes256Gcm, KeyInit, Nonce, Tag};
use interceptor_sdk::key::read_key_file;
use interceptor_sdk::{
    abi, export_interceptor, CreateContext, Decision, DeviceKind, Frame, Interceptor, Request,
    RequestKind, Slot, Status,
};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

/// The ethertype of a sealed frame.
pub const ETHERTYPE: u16 = 0x88b5;
pub const VERSION: u8 = 1;
/// Bytes a sealed frame has more than the plain one.
pub const OVERHEAD: usize = 2 + 2 + 12 + 16;
/// Where the sealed part (the original ethertype and payload) starts.
const SEALED_AT: usize = 12 + 2 + 2 + 12;
const KEY_CONTEXT: &str = "vmm net-encrypt 2026-12 frame key v1";

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// 32 raw bytes or 64 hex digits, shared by every card that talks to this one.
    key_file: std::path::PathBuf,
    /// Frames of a sender accepted out of order (a replayed one never is).
    #[serde(default = "default_window")]
    replay_window: u64,
}

fn default_window() -> u64 {
    1024
}

#[derive(Default)]
struct Counters {
    sealed: AtomicU64,
    opened: AtomicU64,
    /// Received frames that did not authenticate (forged, damaged, another key).
    forged: AtomicU64,
    replayed: AtomicU64,
    /// Received frames that were not sealed at all.
    unsealed: AtomicU64,
    /// Frames too long to seal within the buffer (none, at the MTU the card tells).
    too_long: AtomicU64,
}

pub struct NetEncrypt {
    cipher: Aes256Gcm,
    salt: [u8; 4],
    next: AtomicU64,
    window: Mutex<replay::Window>,
    c: Counters,
}

fn nonce(salt: [u8; 4], counter: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&salt);
    n[4..].copy_from_slice(&counter.to_be_bytes());
    n
}

impl NetEncrypt {
    /// An instance under `key` (the key file's bytes).
    pub fn with_key(key: &[u8; 32], window: u64) -> Result<NetEncrypt, String> {
        let mut salt = [0u8; 4];
        getrandom::fill(&mut salt).map_err(|e| format!("no random salt: {e}"))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|_| "the wall clock is before 1970: no counter start")?;
        let start = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX / 2);
        let frame_key = blake3::derive_key(KEY_CONTEXT, key);
        Ok(NetEncrypt {
            cipher: Aes256Gcm::new(&frame_key.into()),
            salt,
            next: AtomicU64::new(start),
            window: Mutex::new(replay::Window::new(window)),
            c: Counters::default(),
        })
    }

    /// Seals `frame` in place; false if it cannot (too long for its buffer).
    pub fn seal(&self, frame: &mut Frame<'_>) -> bool {
        let len = frame.bytes().len();
        if len + OVERHEAD > frame.capacity() {
            self.c.too_long.fetch_add(1, Relaxed);
            return false;
        }
        let counter = self.next.fetch_add(1, Relaxed);
        let n = nonce(self.salt, counter);
        let buf = frame.buffer_mut();
        buf.copy_within(12..len, SEALED_AT);
        buf[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
        buf[14] = VERSION;
        buf[15] = 0;
        buf[16..28].copy_from_slice(&n);
        let (head, rest) = buf.split_at_mut(SEALED_AT);
        let body = &mut rest[..len - 12];
        let Ok(tag) = self
            .cipher
            .encrypt_inout_detached(&Nonce::from(n), &head[..28], body.into())
        else {
            return false;
        };
        let end = SEALED_AT + len - 12;
        buf[end..end + 16].copy_from_slice(&tag);
        if frame.set_len(len + OVERHEAD).is_err() {
            return false;
        }
        self.c.sealed.fetch_add(1, Relaxed);
        true
    }

    /// Opens a sealed `frame` in place: false (and counted) if it is not sealed, does not
    /// authenticate, or was seen before.
    pub fn open(&self, frame: &mut Frame<'_>) -> bool {
        let bytes = frame.bytes();
        let len = bytes.len();
        let sealed = len >= SEALED_AT + 2 + 16
            && bytes[12..14] == ETHERTYPE.to_be_bytes()
            && bytes[14] == VERSION;
        if !sealed {
            self.c.unsealed.fetch_add(1, Relaxed);
            return false;
        }
        let mut n = [0u8; 12];
        n.copy_from_slice(&bytes[16..28]);
        let mut tag = [0u8; 16];
        tag.copy_from_slice(&bytes[len - 16..]);
        let buf = frame.bytes_mut();
        let (head, rest) = buf.split_at_mut(SEALED_AT);
        let body = &mut rest[..len - 16 - SEALED_AT];
        let ok = self
            .cipher
            .decrypt_inout_detached(&Nonce::from(n), &head[..28], body.into(), &Tag::from(tag))
            .is_ok();
        if !ok {
            self.c.forged.fetch_add(1, Relaxed);
            return false;
        }
        let mut salt = [0u8; 4];
        salt.copy_from_slice(&n[..4]);
        let mut counter = [0u8; 8];
        counter.copy_from_slice(&n[4..]);
        let fresh = self
            .window
            .lock()
            .map(|mut w| w.accept(salt, u64::from_be_bytes(counter)))
            .unwrap_or(false);
        if !fresh {
            self.c.replayed.fetch_add(1, Relaxed);
            return false;
        }
        buf.copy_within(SEALED_AT..len - 16, 12);
        if frame.set_len(len - OVERHEAD).is_err() {
            return false;
        }
        self.c.opened.fetch_add(1, Relaxed);
        true
    }
}

impl Interceptor for NetEncrypt {
    const NAME: &'static std::ffi::CStr = c"net-encrypt";
    const DEVICES: u32 = DeviceKind::Net.mask();
    // A sealed frame must fit the link: no 64 KiB segments, no checksums left undone.
    const FLAGS: u32 = abi::F_NET_PLAIN_FRAMES;
    const NET_HEADROOM: u32 = OVERHEAD as u32;

    fn create(ctx: CreateContext<'_>) -> Result<Self, String> {
        let cfg: Config = ctx.config_as()?;
        if cfg.replay_window == 0 || cfg.replay_window > replay::MAX_WINDOW {
            return Err(format!(
                "replay_window must be 1 to {} frames",
                replay::MAX_WINDOW
            ));
        }
        let key = read_key_file(&cfg.key_file)?;
        NetEncrypt::with_key(&key.0, cfg.replay_window)
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
        if req.frame().is_some_and(|mut f| self.open(&mut f)) {
            Status::Ok
        } else {
            Status::IoError
        }
    }

    fn stats(&self) -> serde_json::Value {
        let c = &self.c;
        serde_json::json!({
            "sealed": c.sealed.load(Relaxed),
            "opened": c.opened.load(Relaxed),
            "forged": c.forged.load(Relaxed),
            "replayed": c.replayed.load(Relaxed),
            "unsealed": c.unsealed.load(Relaxed),
            "too_long": c.too_long.load(Relaxed),
        })
    }
}

export_interceptor!(NetEncrypt);

#[cfg(test)]
mod tests;
