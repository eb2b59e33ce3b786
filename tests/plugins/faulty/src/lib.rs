//! A deliberately misbehaving plugin, for tests of the boundary: requests that touch the
//! configured byte range panic (`mode = "panic"`) or fail (`mode = "fail"`) in the pre
//! hook, or panic in the post hook (`mode = "panic-post"`), or make a system call no
//! plugin may make (`mode = "forbidden-syscall"`: the pre hook opens an IPv4 socket, which
//! the vmm's seccomp filter for its I/O threads stops, docs/security.md; with the filters
//! off the socket is closed again and the request continues), or read a file its config
//! does not grant (`mode = "read-file"`, `target = "/etc/passwd"`: the pre hook tries to
//! read `target` and counts in its stats whether it could, `read_ok`, or was refused,
//! `read_refused` with `read_error`; the vmm's Landlock rules refuse it). Everything else
//! passes.

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
    /// The file `read-file` reads (a name that does not end in `_file`, so the vmm does not
    /// take it for a file the config grants).
    #[serde(default)]
    target: String,
}

struct Faulty {
    cfg: Config,
    hits: AtomicU64,
    read_ok: AtomicU64,
    read_refused: AtomicU64,
    read_error: std::sync::Mutex<String>,
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
        let modes = [
            "panic",
            "fail",
            "panic-post",
            "forbidden-syscall",
            "read-file",
        ];
        if !modes.contains(&cfg.mode.as_str()) {
            return Err(format!("mode {:?}: use {}", cfg.mode, modes.join(", ")));
        }
        if cfg.mode == "read-file" && cfg.target.is_empty() {
            return Err("mode read-file needs a target".into());
        }
        Ok(Faulty {
            cfg,
            hits: AtomicU64::new(0),
            read_ok: AtomicU64::new(0),
            read_refused: AtomicU64::new(0),
            read_error: Default::default(),
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
            "read-file" => {
                match std::fs::read(&self.cfg.target) {
                    Ok(_) => self.read_ok.fetch_add(1, Relaxed),
                    Err(e) => {
                        if let Ok(mut last) = self.read_error.lock() {
                            *last = e.to_string();
                        }
                        self.read_refused.fetch_add(1, Relaxed)
                    }
                };
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
        let read_error = self
            .read_error
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default();
        serde_json::json!({
            "hits": self.hits.load(Relaxed),
            "read_ok": self.read_ok.load(Relaxed),
            "read_refused": self.read_refused.load(Relaxed),
            "read_error": read_error,
        })
    }
}

export_interceptor!(Faulty);
