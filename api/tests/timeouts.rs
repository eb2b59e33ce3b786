//! The limits with short values (`serve_with`): the idle keep-alive timeout, the body
//! timeout, an oversized head, a small connection cap.

mod common;

use common::{state, temp_dir, Conn};
use std::io::Write;
use std::time::Duration;
use vmm_api::client::request;
use vmm_api::Limits;

fn quick() -> Limits {
    Limits {
        max_connections: 4,
        header_timeout: Duration::from_millis(600),
        idle_timeout: Duration::from_millis(1500),
        body_timeout: Duration::from_millis(500),
        accept_backoff: Duration::from_millis(10),
    }
}

/// Between requests a keep-alive connection may wait the idle timeout, longer than the header
/// timeout; past it the server closes it.
#[test]
fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let dir = temp_dir("idle");
    let sock = dir.join("api.sock");
    vmm_api::serve_with(&sock, state(&[]), quick()).unwrap();
    let mut c = Conn::open(&sock).unwrap();
    assert_eq!(c.get("/vm").unwrap().0, 200);
    // Idle for twice the header timeout: still open.
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(c.get("/vm").unwrap().0, 200, "cut before the idle timeout");
    let waited = c
        .wait_closed(Duration::from_secs(10))
        .expect("never closed");
    assert!(
        waited >= Duration::from_millis(1300) && waited < Duration::from_secs(5),
        "closed after {waited:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A body announced and never sent is answered 408 with a JSON fault once the body timeout
/// passes, and the connection closed; the state did not change.
#[test]
fn a_body_that_never_arrives_is_answered_408() {
    let dir = temp_dir("body");
    let sock = dir.join("api.sock");
    vmm_api::serve_with(&sock, state(&[]), quick()).unwrap();
    let mut c = Conn::open(&sock).unwrap();
    c.stream
        .write_all(
            b"PUT /actions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
              Content-Length: 40\r\n\r\n{\"action_type\"",
        )
        .unwrap();
    let started = std::time::Instant::now();
    let (status, body) = c.answer().unwrap();
    assert_eq!(status, 408, "{body}");
    assert!(started.elapsed() >= Duration::from_millis(450));
    let fault: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(fault["fault_message"].is_string(), "{body}");
    assert!(c.wait_closed(Duration::from_secs(5)).is_ok());
    let vm = request(&sock, "GET", "/vm", None).unwrap();
    assert_eq!(vm.json()["state"], "Running", "the half action ran");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A request head over 16 KiB is answered 431 and the server goes on.
#[test]
fn an_oversized_head_is_refused_and_the_server_goes_on() {
    let dir = temp_dir("head");
    let sock = dir.join("api.sock");
    vmm_api::serve_with(&sock, state(&[]), quick()).unwrap();
    let big = format!(
        "GET /vm HTTP/1.1\r\nHost: localhost\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(32 * 1024)
    );
    let out = vmm_api::client::exchange(&sock, big.as_bytes()).unwrap();
    assert!(
        out.starts_with(b"HTTP/1.1 431"),
        "{:?}",
        String::from_utf8_lossy(&out[..out.len().min(200)])
    );
    assert_eq!(request(&sock, "GET", "/vm", None).unwrap().status, 200);
    let _ = std::fs::remove_dir_all(&dir);
}

/// With a cap of 4, clients that hold connections and send nothing fill it; the next gets
/// 503; the header timeout then frees the slots without anyone closing them.
#[test]
fn silent_connections_fill_a_small_cap_until_the_header_timeout_frees_it() {
    let dir = temp_dir("smallcap");
    let sock = dir.join("api.sock");
    vmm_api::serve_with(&sock, state(&[]), quick()).unwrap();
    let silent: Vec<Conn> = (0..4).map(|_| Conn::open(&sock).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(100));
    let a = request(&sock, "GET", "/vm", None).unwrap();
    assert_eq!(a.status, 503, "{}", a.body);
    std::thread::sleep(Duration::from_millis(900));
    let a = request(&sock, "GET", "/vm", None).unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
    drop(silent);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A body over 64 KiB is refused with 413 (a JSON fault) without reading the rest, and the
/// connection is closed; the server goes on.
#[test]
fn a_body_over_the_limit_is_answered_413_and_the_connection_closed() {
    let dir = temp_dir("bigbody");
    let sock = dir.join("api.sock");
    vmm_api::serve_with(&sock, state(&[]), quick()).unwrap();
    let mut c = Conn::open(&sock).unwrap();
    let len = 10 << 20;
    let head = format!(
        "PUT /actions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {len}\r\n\r\n"
    );
    c.stream.write_all(head.as_bytes()).unwrap();
    // The client goes on sending; the server stops reading after 64 KiB.
    let chunk = vec![b' '; 256 * 1024];
    let mut writer = c.stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let mut sent = 0;
        while sent < len {
            if writer.write_all(&chunk).is_err() {
                break;
            }
            sent += chunk.len();
        }
        sent
    });
    let (status, body) = c.answer().unwrap();
    assert_eq!(status, 413, "{body}");
    let fault: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(fault["fault_message"].is_string(), "{body}");
    assert!(c.wait_closed(Duration::from_secs(5)).is_ok(), "left open");
    let sent = sender.join().unwrap();
    assert!(sent < len, "the server read all {sent} bytes");
    assert_eq!(request(&sock, "GET", "/vm", None).unwrap().status, 200);
    let _ = std::fs::remove_dir_all(&dir);
}
