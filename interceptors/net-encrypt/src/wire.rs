//! The sealed frame, byte by byte (docs/net-encrypt.md, "The sealed frame"):
//!
//! ```text
//! dst MAC (6) | src MAC (6) | 0x88b5 (2) | version 2 (1) | kind (1) | key id (1) | 0 (1)
//! | sender's epoch (16) | counter (8, BE) | AES-256-GCM(sealed part) | tag (16)
//! ```
//!
//! The first [`HEADER`] bytes are the additional authenticated data. A data frame's sealed
//! part is the original ethertype and payload; a control frame's is a [`Control`].

/// The ethertype of a sealed frame (IEEE local experimental).
pub const ETHERTYPE: u16 = 0x88b5;
/// The wire format's version: 1 (one shared key, a 4-byte salt per boot, no handshake) is
/// refused.
pub const VERSION: u8 = 2;
/// The versions this build speaks, one bit each (bit `v`), as sent in control frames so
/// that a later version can see what a peer speaks.
pub const VERSIONS: u8 = 1 << VERSION;
/// A sealed data frame.
pub const KIND_DATA: u8 = 0;
/// A handshake message.
pub const KIND_CONTROL: u8 = 1;
/// Bytes of a sender's epoch: drawn at random when an instance starts.
pub const EPOCH_LEN: usize = 16;
/// The MACs and everything before the sealed part.
pub const HEADER: usize = 12 + 2 + 4 + EPOCH_LEN + 8;
pub const TAG: usize = 16;
/// Bytes a sealed frame has more than the plain one (the original ethertype moves into
/// the sealed part): the plugin's headroom, by which the card lowers the guest's MTU.
pub const OVERHEAD: usize = HEADER - 12 + TAG;
/// A control frame's sealed part: whom it is for, an answer, a question, the versions.
pub const CONTROL_BODY: usize = EPOCH_LEN + 16 + 16 + 1;
/// A whole control frame.
pub const CONTROL_FRAME: usize = HEADER + CONTROL_BODY + TAG;

pub type Epoch = [u8; EPOCH_LEN];
/// A challenge's random bytes; all zero means none.
pub type Nonce = [u8; 16];

/// A sealed frame's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: u8,
    pub key_id: u8,
    pub epoch: Epoch,
    pub counter: u64,
}

/// What a received frame is.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not a sealed frame at all (another ethertype, or too short for one).
    Plain,
    /// Sealed, by a version this one does not speak.
    Version(u8),
    /// Sealed, version 2, but no such frame is ever sent: an unknown kind, a reserved byte
    /// set, a control frame of the wrong length.
    Malformed,
    Sealed(Header),
}

/// Reads a received frame's header.
pub fn parse(frame: &[u8]) -> Parsed {
    let Some(head) = frame.get(..16) else {
        return Parsed::Plain;
    };
    if head[12..14] != ETHERTYPE.to_be_bytes() {
        return Parsed::Plain;
    }
    if head[14] != VERSION {
        return Parsed::Version(head[14]);
    }
    if frame.len() < HEADER + 2 + TAG {
        return Parsed::Malformed;
    }
    let kind = frame[15];
    let fits = match kind {
        KIND_DATA => true,
        KIND_CONTROL => frame.len() == CONTROL_FRAME,
        _ => false,
    };
    if !fits || frame[17] != 0 {
        return Parsed::Malformed;
    }
    let mut epoch = [0u8; EPOCH_LEN];
    epoch.copy_from_slice(&frame[18..18 + EPOCH_LEN]);
    let mut counter = [0u8; 8];
    counter.copy_from_slice(&frame[HEADER - 8..HEADER]);
    Parsed::Sealed(Header {
        kind,
        key_id: frame[16],
        epoch,
        counter: u64::from_be_bytes(counter),
    })
}

/// Writes `h` into bytes 12 to [`HEADER`] of `buf` (the MACs stay as they are).
pub fn write_header(buf: &mut [u8], h: &Header) {
    buf[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    buf[14] = VERSION;
    buf[15] = h.kind;
    buf[16] = h.key_id;
    buf[17] = 0;
    buf[18..18 + EPOCH_LEN].copy_from_slice(&h.epoch);
    buf[HEADER - 8..HEADER].copy_from_slice(&h.counter.to_be_bytes());
}

/// The AES-GCM nonce of counter `n`: unique under a sender's key, which no other sender
/// has (it is derived from the sender's epoch).
pub fn nonce(n: u64) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[4..].copy_from_slice(&n.to_be_bytes());
    out
}

/// A handshake message: "to `to`: here is the answer to your question `answer`; here is my
/// question `ask`" (either may be none: all zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Control {
    pub to: Epoch,
    pub answer: Nonce,
    pub ask: Nonce,
    pub versions: u8,
}

impl Control {
    pub fn to_bytes(&self) -> [u8; CONTROL_BODY] {
        let mut b = [0u8; CONTROL_BODY];
        b[..16].copy_from_slice(&self.to);
        b[16..32].copy_from_slice(&self.answer);
        b[32..48].copy_from_slice(&self.ask);
        b[48] = self.versions;
        b
    }

    pub fn from_bytes(b: &[u8; CONTROL_BODY]) -> Control {
        let mut c = Control {
            to: [0; 16],
            answer: [0; 16],
            ask: [0; 16],
            versions: b[48],
        };
        c.to.copy_from_slice(&b[..16]);
        c.answer.copy_from_slice(&b[16..32]);
        c.ask.copy_from_slice(&b[32..48]);
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_is_what_the_docs_say() {
        assert_eq!(HEADER, 42);
        assert_eq!(OVERHEAD, 46);
        assert_eq!(CONTROL_FRAME, 107);
        let h = Header {
            kind: KIND_CONTROL,
            key_id: 7,
            epoch: [0xee; 16],
            counter: 0x0102_0304_0506_0708,
        };
        let mut f = vec![0u8; CONTROL_FRAME];
        write_header(&mut f, &h);
        assert_eq!(&f[12..18], &[0x88, 0xb5, 2, 1, 7, 0]);
        assert_eq!(&f[34..42], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(parse(&f), Parsed::Sealed(h));
        f[17] = 1;
        assert_eq!(parse(&f), Parsed::Malformed, "the reserved byte");
        f[17] = 0;
        f[14] = 1;
        assert_eq!(parse(&f), Parsed::Version(1));
        f[14] = 2;
        assert_eq!(parse(&f[..CONTROL_FRAME - 1]), Parsed::Malformed, "short");
        f[15] = 9;
        assert_eq!(parse(&f), Parsed::Malformed, "an unknown kind");
        assert_eq!(parse(&f[..13]), Parsed::Plain);
        let c = Control {
            to: [1; 16],
            answer: [2; 16],
            ask: [3; 16],
            versions: VERSIONS,
        };
        assert_eq!(Control::from_bytes(&c.to_bytes()), c);
    }
}
