//! A net device's chain: the instances every frame passes. A frame the guest transmits
//! passes each enabled instance's pre hook, top to bottom, on its way to the tap; a frame
//! for the guest passes each one's post hook, bottom to top, on its way from the tap (the
//! same two hook points as a disk's request and its completion). A hook may change the
//! frame in place (its length within the buffer), take it (it goes no further), drop it,
//! or answer it with frames sent back the way it came.
//!
//! Frames always travel in a private buffer ([`FrameBuf`]): the device copies them out of
//! guest memory (TX) or reads them from the tap (RX), so a hook never sees guest memory.

use crate::instance::{Instance, InstanceSpec};
use crate::live::ChainError;
use crate::loader::LoadError;
use crate::stack::{BlockStack, BuildError, MAX_CHAIN};
use crate::{BlockBackend, DeviceKind, IoRequest, RequestStatus};
use interceptor_abi as abi;
use std::ffi::c_void;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, RwLock};
use std::time::Instant;

/// The largest frame a net device carries: 64 KiB (a TSO frame) plus an Ethernet header.
pub const MAX_FRAME: usize = 65536 + 14;
/// The most a chain may add to a frame in all (each plugin's `net_headroom`).
pub const MAX_HEADROOM: u32 = 512;
/// Answers one frame may cause, at most (more are dropped and counted as errors).
pub const MAX_ANSWERS: usize = 4;

/// A frame in a private buffer of `MAX_FRAME` plus the chain's headroom.
pub struct FrameBuf {
    data: Vec<u8>,
    len: usize,
    pub header: abi::NetHeader,
}

impl FrameBuf {
    /// An empty frame whose buffer holds `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> FrameBuf {
        FrameBuf {
            data: vec![0; capacity],
            len: 0,
            header: abi::NetHeader::default(),
        }
    }

    /// The frame.
    pub fn bytes(&self) -> &[u8] {
        &self.data[..self.len]
    }

    /// The whole buffer, to fill; then [`set_len`](Self::set_len).
    pub fn buffer_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }

    /// Sets the frame's length (at most the buffer's).
    pub fn set_len(&mut self, len: usize) {
        self.len = len.min(self.data.len());
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.data.len()
    }
}

/// What the chain made of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send it on (possibly changed).
    Pass,
    /// An instance took it (answered it, or dropped it on purpose).
    Taken,
    /// An instance failed it, or returned something the ABI does not allow: dropped.
    Dropped,
}

/// The direction a frame travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the guest to the tap (pre hooks).
    Transmit,
    /// From the tap to the guest (post hooks).
    Receive,
}

/// What an instance under a net device has below it: nothing (a net plugin does no I/O of
/// its own; its handle to the layers below has a capacity of 0 and logs only).
struct NoDisk;

impl BlockBackend for NoDisk {
    fn capacity(&self) -> u64 {
        0
    }

    unsafe fn execute(&self, _req: &IoRequest<'_>) -> RequestStatus {
        RequestStatus::IoError
    }
}

/// Frames an instance sent back, collected during its hook.
struct Answers {
    frames: Vec<Vec<u8>>,
    refused: u64,
    capacity: usize,
}

unsafe extern "C" fn inject(ctx: *mut c_void, frame: *const u8, len: u32) -> u32 {
    // SAFETY: ctx is the `Answers` of the hook call in progress (see `run`).
    let Some(answers) = (unsafe { ctx.cast::<Answers>().as_mut() }) else {
        return abi::STATUS_IOERR;
    };
    let len = len as usize;
    if frame.is_null()
        || len < abi::NET_FRAME_MIN as usize
        || len > answers.capacity
        || answers.frames.len() >= MAX_ANSWERS
    {
        answers.refused += 1;
        return abi::STATUS_IOERR;
    }
    // SAFETY: the plugin passes `len` readable bytes for the call.
    let bytes = unsafe { std::slice::from_raw_parts(frame, len) };
    answers.frames.push(bytes.to_vec());
    abi::STATUS_OK
}

/// A net device's instances, top (guest side) to bottom (tap side).
pub struct NetChain {
    device_id: String,
    layers: RwLock<Arc<Vec<Arc<Instance>>>>,
    /// What the card told the guest at start (its MTU, its offloads): an instance loaded
    /// later must fit in them.
    headroom: u32,
    plain_frames: bool,
    /// The stack each instance's lower handle points at.
    below: Arc<BlockStack>,
}

impl std::fmt::Debug for NetChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetChain")
            .field("device_id", &self.device_id)
            .field("layers", &self.layers())
            .finish()
    }
}

impl NetChain {
    /// Creates `device_id`'s instances (`chain` top to bottom). A plugin that does not
    /// declare net devices is refused, as is a chain whose headroom is over
    /// [`MAX_HEADROOM`].
    pub fn build(device_id: &str, chain: &[InstanceSpec]) -> Result<NetChain, BuildError> {
        let fail = |instance: Option<&str>, error: LoadError| BuildError {
            instance: instance.map(String::from),
            error,
        };
        if chain.len() > MAX_CHAIN {
            return Err(fail(
                None,
                LoadError::ChainTooLong {
                    device: device_id.into(),
                    max: MAX_CHAIN,
                },
            ));
        }
        // Each instance's lower handle holds this empty stack as long as it lives.
        let below = BlockStack::build(device_id, Arc::new(NoDisk), &[])?;
        let mut layers = Vec::with_capacity(chain.len());
        let mut headroom = 0u32;
        for spec in chain {
            let instance = Instance::create(spec, DeviceKind::Net, device_id, below.clone(), false)
                .map_err(|e| fail(Some(&spec.id), e))?;
            headroom = headroom.saturating_add(instance.plugin().table().net_headroom);
            if headroom > MAX_HEADROOM {
                return Err(fail(
                    Some(&spec.id),
                    LoadError::BadInstance {
                        plugin: instance.plugin().name().to_string(),
                        message: format!(
                            "the chain's net headroom would be {headroom} bytes, over {MAX_HEADROOM}"
                        ),
                    },
                ));
            }
            layers.push(Arc::new(instance));
        }
        let plain_frames = layers
            .iter()
            .any(|l| l.plugin().table().flags & abi::F_NET_PLAIN_FRAMES != 0);
        Ok(NetChain {
            device_id: device_id.into(),
            layers: RwLock::new(Arc::new(layers)),
            headroom,
            plain_frames,
            below,
        })
    }

    /// Creates `spec` as an instance at `position` (0: top) of the running chain. Call it
    /// on the card's thread (between two frames). Refused if the plugin does not serve net
    /// devices, or needs more headroom or plainer frames than the card negotiated at start
    /// (the guest's MTU and offloads cannot change under it).
    pub fn insert(&self, spec: &InstanceSpec, position: usize) -> Result<(), ChainError> {
        let layers = self.layers();
        if layers.len() >= MAX_CHAIN {
            return Err(ChainError::Conflict(format!(
                "net `{}` has a full chain ({MAX_CHAIN})",
                self.device_id
            )));
        }
        if position > layers.len() {
            return Err(ChainError::Invalid(format!(
                "position {position} is past the chain's end ({})",
                layers.len()
            )));
        }
        let table = spec.plugin.table();
        let used: u32 = layers.iter().map(|l| l.plugin().table().net_headroom).sum();
        if used.saturating_add(table.net_headroom) > self.headroom {
            return Err(ChainError::Conflict(format!(
                "plugin `{}` may add {} bytes to a frame; net `{}` told its guest an MTU with \
                 {} bytes to spare for its chain ({used} in use): load it from the config at boot",
                spec.plugin.name(),
                table.net_headroom,
                self.device_id,
                self.headroom
            )));
        }
        if table.flags & abi::F_NET_PLAIN_FRAMES != 0 && !self.plain_frames {
            return Err(ChainError::Conflict(format!(
                "plugin `{}` needs plain frames; net `{}` negotiated offloads with its guest: \
                 load it from the config at boot",
                spec.plugin.name(),
                self.device_id
            )));
        }
        let instance = Instance::create(
            spec,
            DeviceKind::Net,
            &self.device_id,
            self.below.clone(),
            false,
        )?;
        let mut next = layers.as_ref().clone();
        next.insert(position, Arc::new(instance));
        *self.layers.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        Ok(())
    }

    /// Takes instance `id` out of the chain; it is destroyed here once no view holds it.
    /// Call it on the card's thread.
    pub fn remove(&self, id: &str) -> Result<(), ChainError> {
        let layers = self.layers();
        let Some(pos) = layers.iter().position(|l| l.id() == id) else {
            return Err(ChainError::NotFound {
                device: self.device_id.clone(),
                id: id.into(),
            });
        };
        let mut next = layers.as_ref().clone();
        let gone = next.remove(pos);
        *self.layers.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        drop(layers);
        drop(gone);
        Ok(())
    }

    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    /// The instances, top to bottom.
    pub fn layers(&self) -> Arc<Vec<Arc<Instance>>> {
        self.layers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Bytes the chain may add to a frame: the device lowers the guest's MTU by this.
    pub fn headroom(&self) -> u32 {
        self.headroom
    }

    /// An instance needs whole, plain frames: the device negotiates no offloads.
    pub fn plain_frames(&self) -> bool {
        self.plain_frames
    }

    /// Destroys every instance (each plugin's destroy runs): call it on the thread that
    /// calls the hooks, at shutdown. Frames pass unchanged from then on.
    pub fn close(&self) {
        let old = std::mem::take(&mut *self.layers.write().unwrap_or_else(|p| p.into_inner()));
        drop(old);
    }

    /// No instance at all: frames need no private copy.
    pub fn is_empty(&self) -> bool {
        self.layers().is_empty()
    }

    /// Runs `frame` through the chain in `dir`; frames the instances answered with are
    /// appended to `answers` (each at most the frame's buffer), to be sent back the way the
    /// frame came.
    pub fn run(&self, dir: Direction, frame: &mut FrameBuf, answers: &mut Vec<Vec<u8>>) -> Verdict {
        let layers = self.layers();
        let order: Box<dyn Iterator<Item = &Arc<Instance>>> = match dir {
            Direction::Transmit => Box::new(layers.iter()),
            Direction::Receive => Box::new(layers.iter().rev()),
        };
        for layer in order {
            let disabled = !layer.enabled();
            if disabled && !layer.keeps_when_disabled() {
                continue;
            }
            let verdict = self.call(layer, dir, disabled, frame, answers);
            if verdict != Verdict::Pass {
                return verdict;
            }
        }
        Verdict::Pass
    }

    fn call(
        &self,
        layer: &Instance,
        dir: Direction,
        disabled: bool,
        frame: &mut FrameBuf,
        answers: &mut Vec<Vec<u8>>,
    ) -> Verdict {
        let c = layer.counters();
        c.requests.fetch_add(1, Relaxed);
        c.bytes.fetch_add(frame.len() as u64, Relaxed);
        let plain = layer.plugin().table().flags & abi::F_NET_PLAIN_FRAMES != 0;
        let capacity = frame.capacity();
        let mut collected = Answers {
            frames: Vec::new(),
            refused: 0,
            capacity,
        };
        let mut net = abi::NetFrame {
            data: frame.data.as_mut_ptr(),
            len: frame.len as u32,
            capacity: capacity as u32,
            header: if plain {
                abi::NetHeader::default()
            } else {
                frame.header
            },
            inject_ctx: (&mut collected as *mut Answers).cast(),
            inject: Some(inject),
        };
        let request = abi::Request {
            kind: match dir {
                Direction::Transmit => abi::REQ_NET_TX,
                Direction::Receive => abi::REQ_NET_RX,
            },
            flags: abi::REQ_F_DATA_PRIVATE | if disabled { abi::REQ_F_DISABLED } else { 0 },
            offset: 0,
            len: frame.len as u64,
            segments: std::ptr::null(),
            nsegments: 0,
            device_kind: DeviceKind::Net as u32,
            device_id: layer.device_id_ptr(),
            net: &mut net,
            handle: std::ptr::null_mut(),
        };
        let started = Instant::now();
        // SAFETY: `net` points at the frame's private buffer of `capacity` bytes and at
        // `collected`, both live and ours for the call; no segments.
        let result = unsafe {
            match dir {
                Direction::Transmit => {
                    let mut slot = std::ptr::null_mut();
                    let r = layer.call_pre(&request, &mut slot);
                    if !slot.is_null() {
                        // A slot makes no sense for a frame (there is no post for it): the
                        // plugin would leak it; say so once per frame.
                        tracing::warn!(
                            "interceptor {}: left a slot for a frame; ignored",
                            layer.id()
                        );
                    }
                    match r {
                        abi::CONTINUE => Verdict::Pass,
                        abi::COMPLETE => Verdict::Taken,
                        _ => Verdict::Dropped,
                    }
                }
                Direction::Receive => {
                    match layer.call_post(&request, std::ptr::null_mut(), abi::STATUS_OK) {
                        abi::STATUS_OK => Verdict::Pass,
                        _ => Verdict::Taken,
                    }
                }
            }
        };
        c.latency
            .record(u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX));
        answers.append(&mut collected.frames);
        let mut verdict = result;
        let len = net.len as usize;
        if verdict == Verdict::Pass {
            if (abi::NET_FRAME_MIN as usize..=capacity).contains(&len) {
                frame.len = len;
                if !plain {
                    frame.header = net.header;
                }
            } else {
                tracing::warn!(
                    "interceptor {}: set a frame length of {len} (14..={capacity}); dropped",
                    layer.id()
                );
                verdict = Verdict::Dropped;
            }
        }
        match verdict {
            Verdict::Pass => {}
            Verdict::Taken => {
                c.completed.fetch_add(1, Relaxed);
            }
            Verdict::Dropped => {
                c.errors.fetch_add(1, Relaxed);
            }
        }
        if collected.refused > 0 {
            c.errors.fetch_add(collected.refused, Relaxed);
        }
        verdict
    }
}
