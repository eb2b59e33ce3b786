//! The REST control socket, end to end: the real server (`vmm_api::serve`, hyper and the
//! router) on a Unix socket, over two disks with live chains, fed requests whose method,
//! path, headers, framing and body come from the input, or raw bytes.
//!
//! What must hold: no answer is a 5xx other than the documented 503 (too many connections)
//! and hyper's own 505 (an HTTP version it does not speak), and the server answers well-
//! framed requests promptly (a hang fails after 10 s). After each input the chains, their
//! enabled flags and the VM's state are put back as they were, so inputs do not depend on
//! each other.

use crate::disk::{scratch_dir, MemDisk};
use crate::input::Input;
use compat::{InstanceSpec, LiveStack, Plugin, PluginRegistry};
use interceptor_sdk::{CreateContext, Decision, Interceptor, Request, RequestKind, Slot, Status};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use vmm_api::{ApiState, Disk, VmControl, VmInfo};

/// How long a well-framed exchange may take before it counts as a hang.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);
const MAX_REQUESTS: usize = 4;

struct Count {
    requests: AtomicU64,
}

impl Interceptor for Count {
    const NAME: &'static std::ffi::CStr = c"count";

    fn create(_ctx: CreateContext<'_>) -> Result<Self, String> {
        Ok(Count {
            requests: AtomicU64::new(0),
        })
    }

    fn pre(&self, _req: &mut Request<'_>, _slot: &mut Slot) -> Decision {
        self.requests.fetch_add(1, Ordering::Relaxed);
        Decision::Continue
    }

    fn stats(&self) -> serde_json::Value {
        serde_json::json!({ "requests": self.requests.load(Ordering::Relaxed) })
    }
}

/// Transforms data and stays in the path when disabled (removal flushes it first).
struct Keep;

impl Interceptor for Keep {
    const NAME: &'static std::ffi::CStr = c"keep";
    const FLAGS: u32 = interceptor_abi::F_MODIFIES_DATA | interceptor_abi::F_KEEP_WHEN_DISABLED;

    fn create(_ctx: CreateContext<'_>) -> Result<Self, String> {
        Ok(Keep)
    }

    fn post(&self, req: &mut Request<'_>, _slot: Slot, status: Status) -> Status {
        if req.kind() == RequestKind::Read {
            let _ = req.transform(|_, b| b.iter_mut().for_each(|x| *x = !*x));
        }
        status
    }
}

#[derive(Default)]
struct StandInVm {
    stopping: AtomicBool,
}

impl VmControl for StandInVm {
    fn info(&self) -> VmInfo {
        VmInfo {
            state: if self.stopping.load(Ordering::SeqCst) {
                "ShuttingDown"
            } else {
                "Running"
            },
            vcpus: 2,
            memory_mib: 256,
            uptime: Duration::from_secs(7),
        }
    }

    fn shutdown(&self) -> Result<(), String> {
        if self.stopping.swap(true, Ordering::SeqCst) {
            Err("a shutdown is already under way".into())
        } else {
            Ok(())
        }
    }
}

struct Server {
    socket: PathBuf,
    vm: Arc<StandInVm>,
    data: Arc<LiveStack>,
    root: Arc<LiveStack>,
    /// The data disk's chain, top to bottom.
    chain: Vec<InstanceSpec>,
    /// One input at a time (the replay test may run several threads).
    turn: Mutex<()>,
}

fn spec(id: &str, plugin: Arc<Plugin>) -> InstanceSpec {
    InstanceSpec {
        id: id.into(),
        plugin,
        config_json: "{}".into(),
        enabled: true,
    }
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        // A client write after the server closed must be an error, not the end of us (the
        // fuzzer's main is not Rust's, which would ignore SIGPIPE).
        // SAFETY: setting a signal's disposition to ignore.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let count = Plugin::from_static("count", interceptor_sdk::static_table!(Count)).unwrap();
        let keep = Plugin::from_static("keep", interceptor_sdk::static_table!(Keep)).unwrap();
        let chain = vec![spec("count", count), spec("keep", keep)];
        let data = Arc::new(
            LiveStack::start("data", Arc::new(MemDisk::new(1 << 20)), &chain, None).unwrap(),
        );
        let root = Arc::new(
            LiveStack::start("root", Arc::new(MemDisk::new(64 << 10)), &[], None).unwrap(),
        );
        let vm = Arc::new(StandInVm::default());
        let disks = vec![
            Disk {
                id: "data".into(),
                read_only: false,
                stack: data.clone(),
                queues: Arc::new(Vec::new),
            },
            Disk {
                id: "root".into(),
                read_only: true,
                stack: root.clone(),
                queues: Arc::new(Vec::new),
            },
        ];
        let socket = scratch_dir().join("api.sock");
        let state = ApiState::new(vm.clone(), disks, Arc::new(PluginRegistry::new()));
        vmm_api::serve(&socket, state).expect("the API serves");
        Server {
            socket,
            vm,
            data,
            root,
            chain,
            turn: Mutex::new(()),
        }
    })
}

/// Puts the chains, their flags and the VM back as they were before the input.
fn restore(s: &Server) {
    s.vm.stopping.store(false, Ordering::SeqCst);
    let want: Vec<&str> = s.chain.iter().map(|c| c.id.as_str()).collect();
    let ids = |stack: &LiveStack| -> Vec<String> {
        stack
            .snapshot()
            .layers()
            .iter()
            .map(|l| l.id().to_string())
            .collect()
    };
    if ids(&s.data) != want {
        for id in ids(&s.data) {
            let _ = s.data.remove(&id);
        }
        for spec in s.chain.iter().rev() {
            s.data
                .insert(spec, 0, false)
                .expect("the chain is put back");
        }
    }
    for layer in s.data.snapshot().layers() {
        layer.set_enabled(true);
    }
    for id in ids(&s.root) {
        let _ = s.root.remove(&id);
    }
}

const METHODS: &[&str] = &[
    "GET", "PUT", "PATCH", "DELETE", "GET", "PUT", "POST", "HEAD", "OPTIONS",
];
const PATHS: &[&str] = &[
    "/vm",
    "/devices",
    "/interceptors",
    "/interceptors/count",
    "/interceptors/keep",
    "/interceptors/new-1",
    "/actions",
    "/metrics",
    "/",
    "/interceptors/count/x",
    "/vm?verbose=1",
    "//devices",
    "/interceptors/%2e%2e",
    "/interceptors/a%00b",
];

fn token(inp: &mut Input<'_>, max: usize) -> String {
    inp.chunk(max)
        .iter()
        .map(|&b| match b {
            b'!'..=b'~' => b as char,
            _ => 'a',
        })
        .collect()
}

fn body(inp: &mut Input<'_>) -> Vec<u8> {
    let id_path = [
        "/nonexistent/plugin.so",
        "relative.so",
        "/dev/null",
        "/",
        "/proc/self/status",
    ];
    match inp.u8() % 12 {
        0 => Vec::new(),
        1 => format!("{{\"enabled\": {}}}", inp.bool()).into_bytes(),
        2 => br#"{"enabled": "yes"}"#.to_vec(),
        3 => br#"{"action_type": "Shutdown"}"#.to_vec(),
        4 => format!("{{\"action_type\": {:?}}}", token(inp, 12)).into_bytes(),
        5 | 6 => {
            let mut load = serde_json::json!({
                "path": inp.pick(&id_path),
                "device": inp.pick(&["data", "root", "nope", ""]),
            });
            if inp.bool() {
                load["position"] = inp.pick(&[0i64, 1, 2, 99, -1]).into();
            }
            if inp.bool() {
                load["config"] = serde_json::json!({ "k": inp.u8() });
            }
            if inp.bool() {
                load["fresh"] = inp.bool().into();
            }
            if inp.bool() {
                load["blake3"] = inp.pick(&["00", &"0".repeat(64)]).into();
            }
            if inp.one_in(8) {
                load["unknown"] = 1.into();
            }
            load.to_string().into_bytes()
        }
        7 => vec![b' '; MAX_BODY_PROBE],
        8 => b"   \n\t".to_vec(),
        _ => inp.chunk(200).to_vec(),
    }
}

/// A body one byte over the API's limit.
const MAX_BODY_PROBE: usize = vmm_api::MAX_BODY + 1;

/// One request; whether it is a HEAD (its answer has no body).
fn request(inp: &mut Input<'_>, out: &mut Vec<u8>, last: bool) -> bool {
    let method = if inp.one_in(16) {
        token(inp, 8)
    } else {
        inp.pick(METHODS).to_string()
    };
    let path = match inp.u8() % 8 {
        0 => format!("/interceptors/{}", token(inp, 70)),
        1 => format!("/{}", token(inp, 20)),
        _ => inp.pick(PATHS).to_string(),
    };
    let version = inp.pick(&[
        "HTTP/1.1",
        "HTTP/1.1",
        "HTTP/1.1",
        "HTTP/1.0",
        "HTTP/2.0",
        "HTTP/1.1x",
    ]);
    let body = body(inp);
    let chunked = inp.one_in(8);
    out.extend_from_slice(format!("{method} {path} {version}\r\nhost: localhost\r\n").as_bytes());
    match inp.u8() % 8 {
        0 => out.extend_from_slice(b"content-type: application/json\r\n"),
        1 => out.extend_from_slice(b"expect: 100-continue\r\n"),
        2 => {
            let name = token(inp, 12);
            let value = token(inp, 30);
            out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        _ => {}
    }
    if last {
        out.extend_from_slice(b"connection: close\r\n");
    }
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
        // Chunk sizes never claim more than follows: a body that never ends would only
        // test the body timeout, slowly.
        for piece in body.chunks(1 + inp.below(64)) {
            out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
            out.extend_from_slice(piece);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
    } else {
        // A length that says less than the body (the rest reads as the next request), or
        // none at all; never more.
        match inp.u8() % 8 {
            0 => {}
            1 => {
                let n = inp.below(body.len() + 1);
                out.extend_from_slice(format!("content-length: {n}\r\n").as_bytes());
            }
            _ => out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes()),
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&body);
    }
    method == "HEAD"
}

/// The statuses of the complete answers at the start of `buf`, and how many final answers
/// that is; stops at anything it cannot frame.
fn statuses(buf: &[u8], heads: &[bool]) -> (Vec<u16>, usize) {
    let mut at = 0;
    let mut out = Vec::new();
    let mut finals = 0;
    while let Some(end) = find(&buf[at..], b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&buf[at..at + end]).to_ascii_lowercase();
        let Some(status) = head
            .strip_prefix("http/1.")
            .and_then(|r| r.get(2..5))
            .and_then(|s| s.parse::<u16>().ok())
        else {
            break;
        };
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok());
        let interim = (100..200).contains(&status);
        let bodiless = interim || status == 204 || heads.get(finals).copied().unwrap_or(false);
        let len = match (bodiless, length) {
            (true, _) => 0,
            (false, Some(n)) => n,
            (false, None) => {
                out.push(status);
                finals += 1;
                break;
            }
        };
        if at + end + 4 + len > buf.len() {
            break;
        }
        out.push(status);
        if !interim {
            finals += 1;
        }
        at += end + 4 + len;
    }
    (out, finals)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn check(statuses: &[u16], sent: &[u8]) {
    for &s in statuses {
        assert!(
            s < 500 || s == 503 || s == 505,
            "the API answered {s} to:\n{}",
            String::from_utf8_lossy(sent)
        );
    }
}

pub fn api(data: &[u8]) {
    let s = server();
    let _turn = s.turn.lock().unwrap_or_else(|p| p.into_inner());
    let mut inp = Input::new(data);
    let mut conn = UnixStream::connect(&s.socket).expect("connect to the API socket");
    conn.set_read_timeout(Some(ANSWER_WITHIN)).unwrap();
    conn.set_write_timeout(Some(ANSWER_WITHIN)).unwrap();
    let raw = inp.one_in(8);
    let mut sent = Vec::new();
    let mut heads = Vec::new();
    if raw {
        sent.extend_from_slice(inp.rest());
    } else {
        let n = 1 + inp.below(MAX_REQUESTS);
        for i in 0..n {
            heads.push(request(&mut inp, &mut sent, i + 1 == n));
        }
    }
    // The server may close before it read everything (an error it answered); that is fine.
    let _ = conn.write_all(&sent);
    if raw {
        // Whatever the bytes were, the server sees their end. (A well-formed request in
        // them may go unanswered: hyper drops a connection whose client closed its side
        // mid-request. What does get answered is checked.)
        let _ = conn.shutdown(std::net::Shutdown::Write);
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 16 << 10];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if !raw && statuses(&got, &heads).1 >= heads.len() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!(
                    "the API gave no complete answer within {ANSWER_WITHIN:?} to:\n{}\n(got {:?})",
                    String::from_utf8_lossy(&sent),
                    String::from_utf8_lossy(&got)
                );
            }
            // Reset by the server after an error: what arrived is checked.
            Err(_) => break,
        }
    }
    drop(conn);
    let (answers, _) = statuses(&got, &heads);
    trace!(
        "api: sent {:?}\n  answers {answers:?}",
        String::from_utf8_lossy(&sent)
    );
    check(&answers, &sent);
    restore(s);
}
