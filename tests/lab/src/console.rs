//! Reads what a guest reported on its serial console.
//!
//! The guest's init (guest-kernel/rootfs/init) prints lines starting with `@@GUEST@@`:
//! `init uptime=..`, `selftest PASS|FAIL ..`, `fio-begin job=J` / fio's JSON / `fio-end job=J
//! rc=N`, `fio-error ..`, and `exit rc=N`. Kernel messages may interleave; they are ignored.

use serde::Serialize;

/// Prefix of every line the guest's init prints for the harness.
pub const GUEST_MARKER: &str = "@@GUEST@@";

/// One fio job's raw output as the guest printed it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct FioBlock {
    pub job: String,
    /// fio's exit status (None when the end marker never came).
    pub rc: Option<i32>,
    pub json: String,
}

/// Everything the guest reported.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct GuestConsole {
    /// The guest's own uptime when its init started (seconds).
    pub init_uptime_s: Option<f64>,
    /// vCPUs online when the guest's init started.
    pub init_cpus: Option<u32>,
    /// `Some(true)` for `selftest PASS`, `Some(false)` for `selftest FAIL`.
    pub selftest: Option<bool>,
    /// The rest of the selftest line (what failed, or the disk and its size).
    pub selftest_detail: String,
    pub fio: Vec<FioBlock>,
    /// `fio-error` and `fio-stderr` lines.
    pub errors: Vec<String>,
    /// The init's final status (the guest reached its reset).
    pub exit_rc: Option<i32>,
    /// Every marker line, without the marker (for checks of tasks like `hostcheck`).
    pub markers: Vec<String>,
}

/// Value of `key=value` among a marker line's words.
pub fn field<'a>(words: &'a str, key: &str) -> Option<&'a str> {
    words
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// A kernel log line such as `[    1.234567] virtio_blk ...`.
fn is_kernel_message(line: &str) -> bool {
    let Some(rest) = line.trim_start().strip_prefix('[') else {
        return false;
    };
    let Some((stamp, _)) = rest.split_once(']') else {
        return false;
    };
    let stamp = stamp.trim();
    !stamp.is_empty() && stamp.chars().all(|c| c.is_ascii_digit() || c == '.')
}

/// Parses a whole console transcript.
pub fn parse(console: &str) -> GuestConsole {
    let mut out = GuestConsole::default();
    let mut open: Option<FioBlock> = None;
    for raw in console.lines() {
        let line = raw.trim_end_matches('\r');
        let Some(pos) = line.find(GUEST_MARKER) else {
            if let Some(block) = open.as_mut() {
                if !is_kernel_message(line) {
                    block.json.push_str(line);
                    block.json.push('\n');
                }
            }
            continue;
        };
        let rest = line[pos + GUEST_MARKER.len()..].trim();
        out.markers.push(rest.to_string());
        let (verb, words) = rest.split_once(' ').unwrap_or((rest, ""));
        match verb {
            "init" => {
                out.init_uptime_s = field(words, "uptime").and_then(|v| v.parse().ok());
                out.init_cpus = field(words, "cpus").and_then(|v| v.parse().ok());
            }
            "selftest" => {
                let (result, detail) = words.split_once(' ').unwrap_or((words, ""));
                out.selftest = Some(result == "PASS");
                out.selftest_detail = detail.to_string();
            }
            "fio-begin" => {
                if let Some(unfinished) = open.take() {
                    out.fio.push(unfinished);
                }
                open = Some(FioBlock {
                    job: field(words, "job").unwrap_or("").to_string(),
                    ..FioBlock::default()
                });
            }
            "fio-end" => {
                let mut block = open.take().unwrap_or_default();
                if block.job.is_empty() {
                    block.job = field(words, "job").unwrap_or("").to_string();
                }
                block.rc = field(words, "rc").and_then(|v| v.parse().ok());
                out.fio.push(block);
            }
            "fio-error" | "fio-stderr" => out.errors.push(words.to_string()),
            "exit" => out.exit_rc = field(words, "rc").and_then(|v| v.parse().ok()),
            _ => {}
        }
    }
    if let Some(unfinished) = open {
        out.fio.push(unfinished);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_transcript() {
        let console = "SeaBIOS\r\n@@GUEST@@ init uptime=1.37 cpus=2 mem_kib=500000\r\n\
            @@GUEST@@ selftest PASS disk=/dev/vdb bytes=1073741824\r\n\
            @@GUEST@@ fio-begin job=randread-4k-qd1\r\n{\r\n\
            [    3.141592] random: crng init done\r\n  \"jobs\" : [\r\n]\r\n}\r\n\
            @@GUEST@@ fio-end job=randread-4k-qd1 rc=0\r\n\
            @@GUEST@@ exit rc=0 uptime=9.1\r\n";
        let c = parse(console);
        assert_eq!(c.init_uptime_s, Some(1.37));
        assert_eq!(c.init_cpus, Some(2));
        assert_eq!(c.selftest, Some(true));
        assert_eq!(c.selftest_detail, "disk=/dev/vdb bytes=1073741824");
        assert_eq!(c.fio.len(), 1);
        assert_eq!(c.fio[0].job, "randread-4k-qd1");
        assert_eq!(c.fio[0].rc, Some(0));
        assert_eq!(c.fio[0].json, "{\n  \"jobs\" : [\n]\n}\n");
        assert_eq!(c.exit_rc, Some(0));
    }

    #[test]
    fn failure_and_truncation_are_visible() {
        let c = parse(
            "@@GUEST@@ selftest FAIL readback at block 257\n\
             @@GUEST@@ fio-begin job=verify-crc32c\n{\"jobs\"",
        );
        assert_eq!(c.selftest, Some(false));
        assert_eq!(c.selftest_detail, "readback at block 257");
        assert_eq!(c.fio.len(), 1);
        assert_eq!(
            c.fio[0].rc, None,
            "a block without its end marker has no status"
        );
        assert_eq!(
            c.exit_rc, None,
            "no exit marker: the guest never reached its reset"
        );
    }

    #[test]
    fn marker_after_other_output_on_the_same_line() {
        let c = parse("partial line@@GUEST@@ exit rc=3 uptime=2\n");
        assert_eq!(c.exit_rc, Some(3));
    }

    #[test]
    fn kernel_messages_are_recognized() {
        assert!(is_kernel_message("[    0.123456] foo"));
        assert!(!is_kernel_message("[\"a\", 1]"));
        assert!(!is_kernel_message("  \"jobs\" : ["));
    }
}
