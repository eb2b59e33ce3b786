//! The server under clients that hold connections: descriptors run out, connections that
//! never send a request, more connections than the cap. Host only, no VM: a stand-in VM and
//! a disk over a temporary file; in the descriptor test a thread plays the guest, doing I/O
//! through the same stack the API reports on.

mod common;

use common::{disk, state, temp_dir, Conn};
use compat::{BlockRequestKind, LiveStack, RequestStatus, Segment};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use vmm_api::client::request;

/// Set in the child process of the descriptor test: the socket it serves on.
const CHILD_SOCK: &str = "VMM_API_FD_CHILD_SOCK";
const CHILD_TEST: &str = "fd_limited_server_child";

/// The guest: writes a block, reads it back, compares, over and over.
fn guest_io(stack: &LiveStack, stop: &AtomicBool, ok: &AtomicU64, bad: &AtomicU64) {
    let blocks = stack.capacity() / 4096;
    let mut i: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let offset = (i % blocks) * 4096;
        let mut data = vec![(i % 251) as u8; 4096];
        let mut back = vec![0u8; 4096];
        let w = [Segment {
            base: data.as_mut_ptr(),
            len: data.len(),
        }];
        let r = [Segment {
            base: back.as_mut_ptr(),
            len: back.len(),
        }];
        // SAFETY: both buffers outlive the calls; the range is inside the disk.
        let wrote = unsafe { stack.submit(BlockRequestKind::Write, offset, &w) };
        // SAFETY: as above.
        let read = unsafe { stack.submit(BlockRequestKind::Read, offset, &r) };
        if wrote == RequestStatus::Ok && read == RequestStatus::Ok && back == data {
            ok.fetch_add(1, Ordering::Relaxed);
        } else {
            bad.fetch_add(1, Ordering::Relaxed);
        }
        i += 1;
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").unwrap().count() as u64
}

/// The child's half of the descriptor test (does nothing unless started by it): serves the
/// API with its descriptor limit a few above what it has open, runs the guest, and when its
/// stdin closes reports what the guest saw.
#[test]
fn fd_limited_server_child() {
    let Some(sock) = std::env::var_os(CHILD_SOCK) else {
        return;
    };
    let sock = PathBuf::from(sock);
    let image = sock.with_extension("img");
    let stack = disk(&image, "data", 1 << 20);
    vmm_api::serve(&sock, state(&[("data", stack.clone())])).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, bad) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let guest = {
        let (stack, stop, ok, bad) = (stack.clone(), stop.clone(), ok.clone(), bad.clone());
        std::thread::spawn(move || guest_io(&stack, &stop, &ok, &bad))
    };
    // Room for four connections beyond what is open now (the count's own descriptor is
    // closed again).
    let limit = open_fds() + 3;
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain calls on a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl), 0);
        rl.rlim_cur = limit;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &rl), 0);
    }
    let mut out = std::io::stdout();
    writeln!(out, "\nREADY limit={limit}").unwrap();
    out.flush().unwrap();
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    stop.store(true, Ordering::Relaxed);
    guest.join().unwrap();
    writeln!(
        out,
        "GUEST ok={} bad={}",
        ok.load(Ordering::Relaxed),
        bad.load(Ordering::Relaxed)
    )
    .unwrap();
    out.flush().unwrap();
}

fn devices(sock: &Path) -> serde_json::Value {
    let a = request(sock, "GET", "/devices", None).unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
    a.json()[0].clone()
}

/// Issue 14, point 5: more idle connections than the descriptor limit allows. Before the fix
/// the first EMFILE killed the API thread (the accept back-off slept on a runtime without
/// timers) and every later connection was refused.
#[test]
fn an_api_out_of_descriptors_serves_again_once_they_are_released_and_the_guest_never_notices() {
    let dir = temp_dir("fds");
    let sock = dir.join("api.sock");
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([CHILD_TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_SOCK, &sock)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines_tx, lines) = mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut stderr = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let ready = loop {
        let line = lines
            .recv_timeout(Duration::from_secs(60))
            .expect("the child never got ready");
        // libtest's "test NAME ... " precedes it on the same line.
        if line.contains("READY") {
            break line;
        }
    };
    let before = devices(&sock);

    // Far more connections than the child has descriptors left: the first few are taken,
    // the rest wait in the listen queue while accept() fails with EMFILE.
    let idle: Vec<UnixStream> = (0..40)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    // A request queued behind them is answered once they go.
    let queued = {
        let sock = sock.clone();
        std::thread::spawn(move || request(&sock, "GET", "/vm", None))
    };
    std::thread::sleep(Duration::from_millis(300));
    drop(idle);
    let queued = queued.join().unwrap();
    let alive = child.try_wait().unwrap().is_none();
    let mut answers = Vec::new();
    for _ in 0..20 {
        answers.push(request(&sock, "GET", "/vm", None).map(|a| a.status).ok());
    }
    let after = if alive {
        request(&sock, "GET", "/devices", None)
            .ok()
            .map(|a| a.json()[0].clone())
    } else {
        None
    };
    drop(child.stdin.take());
    let status = child.wait().unwrap();
    let stderr = stderr.join().unwrap();
    let report: Vec<String> = lines.try_iter().collect();

    assert!(alive, "the child died: {stderr}");
    let queued = queued.unwrap_or_else(|e| panic!("the queued request failed: {e}; {stderr}"));
    assert_eq!(queued.status, 200, "{}", queued.body);
    assert!(
        answers.iter().all(|a| *a == Some(200)),
        "after the release: {answers:?}; {ready}; {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(status.success(), "{status}; {stderr}");
    // The guest's I/O went on throughout, and not one request failed.
    let after = after.unwrap();
    assert!(
        after["requests"].as_u64() > before["requests"].as_u64(),
        "{before} then {after}"
    );
    assert_eq!(after["errors"], 0, "{after}");
    let guest = report.iter().find(|l| l.starts_with("GUEST")).unwrap();
    assert!(
        guest.ends_with(" bad=0") && !guest.contains("ok=0 "),
        "{guest}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A connection that never sends a byte, and one that stops half-way through its head, are
/// both closed by the server after the header timeout (5 s by default); a keep-alive
/// connection that has been answered is not (its idle timeout is 30 s).
#[test]
fn a_connection_that_sends_nothing_or_half_a_head_is_closed_after_the_header_timeout() {
    let dir = temp_dir("header");
    let sock = dir.join("api.sock");
    vmm_api::serve(&sock, state(&[])).unwrap();
    let mut answered = Conn::open(&sock).unwrap();
    assert_eq!(answered.get("/vm").unwrap().0, 200);
    let silent = std::thread::spawn({
        let sock = sock.clone();
        move || Conn::open(&sock)?.wait_closed(Duration::from_secs(15))
    });
    let half = std::thread::spawn({
        let sock = sock.clone();
        move || {
            let mut c = Conn::open(&sock)?;
            c.stream.write_all(b"GET /vm HTTP/1.1\r\nHost: loc")?;
            c.wait_closed(Duration::from_secs(15))
        }
    });
    for (what, waited) in [("silent", silent), ("half a head", half)] {
        let waited = waited.join().unwrap();
        let waited = waited.unwrap_or_else(|e| panic!("{what}: never closed: {e}"));
        assert!(
            waited >= Duration::from_millis(4500) && waited < Duration::from_secs(10),
            "{what}: closed after {waited:?}"
        );
    }
    assert_eq!(
        answered.get("/vm").unwrap().0,
        200,
        "the idle keep-alive was cut"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// 64 connections are served at once (the default cap); the 65th is answered 503 with a JSON
/// fault and closed, and the 64 keep being answered. Once one closes, a new one is served.
#[test]
fn connections_beyond_the_cap_get_503_while_earlier_ones_are_still_answered() {
    let dir = temp_dir("cap");
    let sock = dir.join("api.sock");
    vmm_api::serve(&sock, state(&[])).unwrap();
    let mut held: Vec<Conn> = (0..64).map(|_| Conn::open(&sock).unwrap()).collect();
    for c in &mut held {
        assert_eq!(c.get("/vm").unwrap().0, 200);
    }
    // One that sends nothing gets the answer at once.
    let mut extra = Conn::open(&sock).unwrap();
    extra
        .stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let (status, body) = extra
        .answer()
        .expect("no 503 for a connection over the cap");
    assert_eq!(status, 503, "{body}");
    let fault: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        fault["fault_message"].as_str().unwrap().contains("64"),
        "{body}"
    );
    assert!(
        extra.wait_closed(Duration::from_secs(3)).is_ok(),
        "left open"
    );
    // So does the blocking client's request (vmmctl's).
    let a = request(&sock, "GET", "/vm", None).expect("the client saw no answer");
    assert_eq!(a.status, 503, "{}", a.body);

    for c in &mut held {
        assert_eq!(c.get("/devices").unwrap().0, 200);
    }
    drop(held.pop());
    let start = Instant::now();
    loop {
        let status = request(&sock, "GET", "/vm", None).unwrap().status;
        if status == 200 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "a freed slot stayed taken"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
