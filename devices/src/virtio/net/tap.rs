//! A tap interface: opened if it exists, created otherwise, always with IFF_TAP | IFF_NO_PI
//! | IFF_VNET_HDR, so every frame read or written carries the 12-byte virtio net header
//! (`struct virtio_net_hdr_v1`) in front of it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use vmm_sys_util::ioctl::{ioctl_with_ref, ioctl_with_val};
use vmm_sys_util::ioctl_iow_nr;

const TUNTAP: u32 = b'T' as u32;
ioctl_iow_nr!(TUNSETIFF, TUNTAP, 202, std::ffi::c_int);
ioctl_iow_nr!(TUNSETOFFLOAD, TUNTAP, 208, std::ffi::c_uint);
ioctl_iow_nr!(TUNSETVNETHDRSZ, TUNTAP, 216, std::ffi::c_int);

const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;

/// `TUNSETOFFLOAD` bits: what the tap may hand us unfinished (the guest finishes it).
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;

/// Bytes of the header in front of every frame (`struct virtio_net_hdr_v1`).
pub const VNET_HDR_LEN: usize = 12;
/// The longest interface name Linux takes (IFNAMSIZ less its NUL).
pub const MAX_NAME: usize = 15;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags (the rest of the union
/// is unused here).
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _rest: [u8; 22],
}

/// Why a tap could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name `{0}` must be 1 to 15 characters of [A-Za-z0-9_.-]")]
    BadName(String),
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(io::Error),
    #[error(
        "cannot open or create tap `{name}`: {source} (it must exist and be usable by this \
         user, or the VMM needs CAP_NET_ADMIN to create it)"
    )]
    SetIff { name: String, source: io::Error },
    #[error("tap `{name}`: {what}: {source}")]
    Setup {
        name: String,
        what: &'static str,
        source: io::Error,
    },
}

/// An open tap: frames in and out, each behind its virtio net header; non-blocking.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

fn valid_name(name: &str) -> bool {
    (1..=MAX_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

impl Tap {
    /// Opens tap `name` (created if it does not exist), non-blocking, with the vnet header.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if !valid_name(name) {
            return Err(TapError::BadName(name.into()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _rest: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads a struct ifreq, which `req` is laid out as, for the call.
        let rc = unsafe { ioctl_with_ref(&file, TUNSETIFF(), &req) };
        if rc < 0 {
            return Err(TapError::SetIff {
                name: name.into(),
                source: io::Error::last_os_error(),
            });
        }
        let tap = Tap {
            file,
            name: name.into(),
        };
        let size: std::ffi::c_int = VNET_HDR_LEN as std::ffi::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int.
        let rc = unsafe { ioctl_with_ref(&tap.file, TUNSETVNETHDRSZ(), &size) };
        if rc < 0 {
            return Err(tap.setup_error("TUNSETVNETHDRSZ"));
        }
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// A card's tap over any descriptor that keeps a tap's framing, one frame (behind its
    /// header) per read and per write, non-blocking: a `SOCK_SEQPACKET` socket in tests
    /// and the fuzz harness, whose other end plays the host's network (a misbehaving one
    /// too: it can hang up, stay full, or send what no tap would). Offloads cannot be set
    /// on it (`set_offload` fails; the card goes on with finished frames).
    ///
    /// ```
    /// use std::os::fd::{FromRawFd, OwnedFd};
    /// let mut fds = [0; 2];
    /// // SAFETY: socketpair writes two new descriptors into `fds`.
    /// let rc = unsafe {
    ///     libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK, 0, fds.as_mut_ptr())
    /// };
    /// assert_eq!(rc, 0);
    /// // SAFETY: both are new and owned here.
    /// let (ours, _wire) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    /// let tap = devices::virtio::net::tap::Tap::from_fd(ours, "wire");
    /// assert_eq!(tap.name(), "wire");
    /// ```
    pub fn from_fd(fd: std::os::fd::OwnedFd, name: &str) -> Tap {
        Tap {
            file: File::from(fd),
            name: name.into(),
        }
    }

    fn setup_error(&self, what: &'static str) -> TapError {
        TapError::Setup {
            name: self.name.clone(),
            what,
            source: io::Error::last_os_error(),
        }
    }

    /// Tells the tap which unfinished frames (`TUN_F_*`) it may give us: those the guest
    /// agreed to finish.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        let rc = unsafe { ioctl_with_val(&self.file, TUNSETOFFLOAD(), flags.into()) };
        if rc < 0 {
            return Err(self.setup_error("TUNSETOFFLOAD"));
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame: its header into `header`, its bytes into `frame`. Returns the
    /// bytes read (header included), or `WouldBlock` when none is waiting. A frame longer
    /// than `frame` is cut (the tap drops the rest).
    pub fn read_frame(&self, header: &mut [u8], frame: &mut [u8]) -> io::Result<usize> {
        let iov = [
            libc::iovec {
                iov_base: header.as_mut_ptr().cast(),
                iov_len: header.len(),
            },
            libc::iovec {
                iov_base: frame.as_mut_ptr().cast(),
                iov_len: frame.len(),
            },
        ];
        // SAFETY: both buffers are writable for their lengths during the call.
        let n = unsafe { libc::readv(self.file.as_raw_fd(), iov.as_ptr(), 2) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Writes one frame given as its header and its bytes.
    pub fn write_frame(&self, header: &[u8], frame: &[u8]) -> io::Result<usize> {
        let iov = [
            libc::iovec {
                iov_base: header.as_ptr() as *mut libc::c_void,
                iov_len: header.len(),
            },
            libc::iovec {
                iov_base: frame.as_ptr() as *mut libc::c_void,
                iov_len: frame.len(),
            },
        ];
        // SAFETY: both buffers are readable for their lengths during the call.
        let n = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), 2) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_anything_is_opened() {
        for bad in ["", "a-name-that-is-too-long", "tap 0", "tap/0", "täp"] {
            assert!(
                matches!(Tap::open(bad), Err(TapError::BadName(_))),
                "{bad:?} should be refused"
            );
        }
        assert!(valid_name("vmtap0"));
        assert!(valid_name("br-lab.1_x"));
    }
}
