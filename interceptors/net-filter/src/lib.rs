//! A frame filter for network cards (docs/net-filter.md): ordered rules on the ethertype,
//! the IP protocol, addresses and TCP/UDP ports, in either direction, the first that
//! matches deciding; a default for the rest; and anti-spoofing of what the guest sends
//! (its source MAC and IP addresses must be the configured ones). Every rule counts the
//! frames it matched.
//!
//! Frames the guest sends are filtered at the pre hook, frames for it at the post hook. A
//! dropped frame goes no further (`Decision::Complete` / a non-OK status: taken by the
//! filter, not an error).

mod headers;

pub use headers::{parse, Headers};

use interceptor_sdk::{
    export_interceptor, CreateContext, Decision, DeviceKind, Interceptor, Request, RequestKind,
    Slot, Status,
};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The most rules one instance takes.
pub const MAX_RULES: usize = 256;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    #[default]
    Pass,
    Drop,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Frames the guest sends.
    Tx,
    /// Frames for the guest.
    Rx,
    #[default]
    Both,
}

/// One rule: every field given must match.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    /// A label for the stats (default: `rule<N>`).
    #[serde(default)]
    name: Option<String>,
    #[serde(default = "drop")]
    action: Action,
    #[serde(default)]
    direction: Direction,
    ethertype: Option<u16>,
    /// IPv4's protocol or IPv6's next header (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6).
    ip_protocol: Option<u8>,
    src_ip: Option<IpAddr>,
    dst_ip: Option<IpAddr>,
    src_port: Option<u16>,
    dst_port: Option<u16>,
    /// Either port.
    port: Option<u16>,
}

fn drop() -> Action {
    Action::Drop
}

/// What the guest may send from: anything else it sends is dropped and counted.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AntiSpoof {
    /// The guest's MAC (its card's `mac`).
    mac: String,
    /// Its IPv4 address: IPv4 and ARP from any other source are dropped (0.0.0.0, a DHCP
    /// client's, passes). Unset: no IPv4 or ARP at all.
    ipv4: Option<Ipv4Addr>,
    /// Its IPv6 address: IPv6 from any other source but link-local and :: is dropped.
    /// Unset: no IPv6 at all.
    ipv6: Option<Ipv6Addr>,
}

#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    rules: Vec<Rule>,
    /// What happens to a frame no rule matches.
    #[serde(default)]
    default: Action,
    #[serde(default)]
    anti_spoof: Option<AntiSpoof>,
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let bad = || format!("anti_spoof.mac: {s:?} is not a MAC address like 52:54:00:12:34:56");
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    Ok(mac)
}

struct Spoofing {
    mac: [u8; 6],
    ipv4: Option<Ipv4Addr>,
    ipv6: Option<Ipv6Addr>,
}

impl Spoofing {
    /// The guest sent `h` from an address that is not its own.
    fn spoofed(&self, h: &Headers) -> bool {
        if h.src_mac != self.mac {
            return true;
        }
        match (h.ethertype, h.src_ip) {
            (headers::ETH_IPV4 | headers::ETH_ARP, ip) => match (self.ipv4, ip) {
                (Some(mine), Some(IpAddr::V4(src))) => src != mine && !src.is_unspecified(),
                // Too short to say, or no IPv4 allowed.
                _ => true,
            },
            (headers::ETH_IPV6, ip) => match (self.ipv6, ip) {
                (Some(mine), Some(IpAddr::V6(src))) => {
                    src != mine && !src.is_unspecified() && (src.segments()[0] & 0xffc0) != 0xfe80
                }
                _ => true,
            },
            _ => false,
        }
    }
}

impl Rule {
    fn matches(&self, dir: Direction, h: &Headers) -> bool {
        let is = |want: Option<u16>, got: Option<u16>| want.is_none() || want == got;
        (self.direction == Direction::Both || self.direction == dir)
            && self.ethertype.is_none_or(|t| t == h.ethertype)
            && self.ip_protocol.is_none_or(|p| Some(p) == h.ip_protocol)
            && self.src_ip.is_none_or(|a| Some(a) == h.src_ip)
            && self.dst_ip.is_none_or(|a| Some(a) == h.dst_ip)
            && is(self.src_port, h.src_port)
            && is(self.dst_port, h.dst_port)
            && self
                .port
                .is_none_or(|p| h.src_port == Some(p) || h.dst_port == Some(p))
    }
}

pub struct NetFilter {
    rules: Vec<(Rule, String, AtomicU64)>,
    default: Action,
    spoofing: Option<Spoofing>,
    passed: AtomicU64,
    dropped: AtomicU64,
    spoofed: AtomicU64,
    unparsed: AtomicU64,
}

impl NetFilter {
    /// What becomes of a frame going `dir`.
    fn judge(&self, dir: Direction, frame: &[u8]) -> Action {
        // What cannot be read whole cannot be judged: dropped, whatever the rules and the
        // default say (a stack behind it may read it differently).
        let Some(h) = parse(frame).filter(|h| h.complete) else {
            self.unparsed.fetch_add(1, Relaxed);
            return self.count(Action::Drop);
        };
        if dir == Direction::Tx {
            if let Some(s) = &self.spoofing {
                if s.spoofed(&h) {
                    self.spoofed.fetch_add(1, Relaxed);
                    return self.count(Action::Drop);
                }
            }
        }
        for (rule, _, matched) in &self.rules {
            if rule.matches(dir, &h) {
                matched.fetch_add(1, Relaxed);
                return self.count(rule.action);
            }
        }
        self.count(self.default)
    }

    fn count(&self, a: Action) -> Action {
        match a {
            Action::Pass => self.passed.fetch_add(1, Relaxed),
            Action::Drop => self.dropped.fetch_add(1, Relaxed),
        };
        a
    }
}

impl Interceptor for NetFilter {
    const NAME: &'static std::ffi::CStr = c"net-filter";
    const DEVICES: u32 = DeviceKind::Net.mask();

    fn create(ctx: CreateContext<'_>) -> Result<Self, String> {
        let cfg: Config = ctx.config_as()?;
        if cfg.rules.len() > MAX_RULES {
            return Err(format!(
                "config: rules: {} rules; at most {MAX_RULES}",
                cfg.rules.len()
            ));
        }
        let spoofing = match cfg.anti_spoof {
            Some(a) => Some(Spoofing {
                mac: parse_mac(&a.mac)?,
                ipv4: a.ipv4,
                ipv6: a.ipv6,
            }),
            None => None,
        };
        let rules = cfg
            .rules
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                let name = r.name.clone().unwrap_or_else(|| format!("rule{i}"));
                (r, name, AtomicU64::new(0))
            })
            .collect();
        Ok(NetFilter {
            rules,
            default: cfg.default,
            spoofing,
            passed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            spoofed: AtomicU64::new(0),
            unparsed: AtomicU64::new(0),
        })
    }

    fn pre(&self, req: &mut Request<'_>, _slot: &mut Slot) -> Decision {
        if req.kind() != RequestKind::NetTx {
            return Decision::Continue;
        }
        let Some(frame) = req.frame() else {
            return Decision::Continue;
        };
        match self.judge(Direction::Tx, frame.bytes()) {
            Action::Pass => Decision::Continue,
            Action::Drop => Decision::Complete,
        }
    }

    fn post(&self, req: &mut Request<'_>, _slot: Slot, status: Status) -> Status {
        if req.kind() != RequestKind::NetRx || status != Status::Ok {
            return status;
        }
        let Some(frame) = req.frame() else {
            return status;
        };
        match self.judge(Direction::Rx, frame.bytes()) {
            Action::Pass => Status::Ok,
            Action::Drop => Status::IoError,
        }
    }

    fn stats(&self) -> serde_json::Value {
        let rules: Vec<serde_json::Value> = self
            .rules
            .iter()
            .map(|(_, name, n)| serde_json::json!({ "name": name, "matched": n.load(Relaxed) }))
            .collect();
        serde_json::json!({
            "rules": rules,
            "passed": self.passed.load(Relaxed),
            "dropped": self.dropped.load(Relaxed),
            "spoofed": self.spoofed.load(Relaxed),
            "unparsed": self.unparsed.load(Relaxed),
        })
    }
}

export_interceptor!(NetFilter);

#[cfg(test)]
mod tests;
