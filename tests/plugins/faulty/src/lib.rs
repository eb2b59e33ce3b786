//! A deliberately misbehaving plugin, for tests of the boundary: requests that touch the
//! configured byte range panic (`mode = "panic"`) or fail (`mode = "fail"`) in the pre
//! hook, or panic in the post hook (`mode = "panic-post"`), or make a system call no
//! plugin may make (`mode = "forbidden-syscall"`: the pre hook opens an IPv4 socket, which
//! the vmm's seccomp filter for its I/O threads stops, docs/security.md; with the filters
//! off the socket is closed again and the request continues). Everything else passes.

use interceptor_sdk::{
    export_interceptor, CreateContext, Decision, Interceptor, Request, Slot, Status,
};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    mode: String,
    /// Byte range [from, to) whose requests misbehave.
    from: u64,
    to: u64,
}

struct Faulty {
    cfg: Config,
    hits: AtomicU64,
}

impl Faulty {
    fn hit(&self, req: &Request<'_>) -> bool {
        let end = req.offset() + req.len();
        !req.is_empty() && req.offset() < self.cfg.to && end > self.cfg.from
    }
}

impl Interceptor for Faulty {
    const NAME: &'static std::ffi::CStr = c"faulty";

    fn create(ctx: CreateContext<'_>) -> Result<Self, String> {
        let cfg: Config = ctx.config_as()?;
        if !["panic", "fail", "panic-post", "forbidden-syscall"].contains(&cfg.mode.as_str()) {
            return Err(format!(
                "mode {:?}: use panic, fail, panic-post or forbidden-syscall",
                cfg.mode
            ));
        }
        Ok(Faulty {
            cfg,
            hits: AtomicU64::new(0),
        })
    }

    fn pre(&self, req: &mut Request<'_>, _: &mut Slot) -> Decision {
        if !self.hit(req) {
            return Decision::Continue;
        }
        self.hits.fetch_add(1, Relaxed);
        match self.cfg.mode.as_str() {
            "panic" => panic!("faulty: request at {} panics on purpose", req.offset()),
            "fail" => Decision::Fail,
            "forbidden-syscall" => {
                // socket(AF_INET, SOCK_DGRAM): a network socket, which no plugin may open.
                // Bound to the loopback address, and dropped at once, when nothing stops it.
                drop(std::net::UdpSocket::bind("127.0.0.1:0"));
                Decision::Continue
            }
            _ => Decision::Continue,
        }
    }

    fn post(&self, req: &mut Request<'_>, _: Slot, status: Status) -> Status {
        if self.cfg.mode == "panic-post" && self.hit(req) {
            panic!("faulty: completion at {} panics on purpose", req.offset());
        }
        status
    }

    fn stats(&self) -> serde_json::Value {
        serde_json::json!({ "hits": self.hits.load(Relaxed) })
    }
}

export_interceptor!(Faulty);
