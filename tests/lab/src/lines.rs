//! Reading a child process's output line by line on a thread, with arrival times.

use std::io::{BufRead, BufReader, Read};
use std::sync::mpsc::Sender;
use std::time::Instant;

/// Sends each line of `reader` (without its line ending, lossily decoded) with the instant
/// it arrived, until the reader ends or the receiver is gone.
pub fn forward_lines(reader: impl Read + Send + 'static, tx: Sender<(Instant, String)>) {
    std::thread::spawn(move || {
        let mut r = BufReader::new(reader);
        let mut buf = Vec::new();
        while let Ok(n) = r.read_until(b'\n', &mut buf) {
            if n == 0 {
                break;
            }
            let line = String::from_utf8_lossy(&buf)
                .trim_end_matches(['\n', '\r'])
                .to_string();
            buf.clear();
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
}
