//! fio's side: the same job through fio's own io_uring engine, and its JSON report.

use crate::sys::{cpu_time, Who};
use crate::{Outcome, Rw};
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// `fio --version`, or why fio cannot be run.
pub fn version(fio: &str) -> Result<String, String> {
    let out = Command::new(fio).arg("--version").output().map_err(|e| {
        format!("cannot run `{fio}` ({e}); install fio (scripts/setup.sh does) or give --fio")
    })?;
    if !out.status.success() {
        return Err(format!("`{fio} --version` failed ({})", out.status));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// fio's command line for one job. `batch`: fio submits and reaps up to `depth` requests
/// a system call (`--iodepth_batch_submit`, `--iodepth_batch_complete_max`), as our loop
/// does; by default fio submits each request on its own.
pub fn args(
    path: &Path,
    rw: Rw,
    depth: usize,
    runtime: Duration,
    bytes: u64,
    batch: bool,
    direct: bool,
) -> Vec<String> {
    // fio splits --filename at ':' unless escaped.
    let name = path.display().to_string().replace(':', "\\:");
    let mut args: Vec<String> = vec![
        "--name=x".into(),
        format!("--filename={name}"),
        "--ioengine=io_uring".into(),
        format!("--rw={}", rw.name()),
        "--bs=4k".into(),
        format!("--iodepth={depth}"),
        format!("--direct={}", u8::from(direct)),
        "--time_based".into(),
        format!("--runtime={}", runtime.as_secs().max(1)),
        format!("--size={bytes}"),
        "--randrepeat=0".into(),
        "--norandommap".into(),
        // fio drops the file's page cache before a buffered job by default; ours starts
        // from the cache as it is, so fio does too.
        "--invalidate=0".into(),
        "--output-format=json".into(),
    ];
    if batch {
        args.push(format!("--iodepth_batch_submit={depth}"));
        args.push(format!("--iodepth_batch_complete_max={depth}"));
    }
    args
}

/// Runs one job.
#[allow(clippy::too_many_arguments)]
pub fn run(
    fio: &str,
    path: &Path,
    rw: Rw,
    depth: usize,
    runtime: Duration,
    bytes: u64,
    batch: bool,
    direct: bool,
) -> Result<Outcome, String> {
    let before = cpu_time(Who::Children);
    let out = Command::new(fio)
        .args(args(path, rw, depth, runtime, bytes, batch, direct))
        .output()
        .map_err(|e| format!("cannot run `{fio}`: {e}"))?;
    let whole = (cpu_time(Who::Children) - before).as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "fio {} qd{depth} failed ({}): {}",
            rw.name(),
            out.status,
            tail(if stderr.trim().is_empty() {
                &stdout
            } else {
                &stderr
            })
        ));
    }
    let report = parse(&stdout, rw).map_err(|e| format!("fio {} qd{depth}: {e}", rw.name()))?;
    Ok(Outcome {
        iops: report.iops,
        cpu_us_per_req: whole * 1e6 / report.requests as f64,
        thread_us_per_req: report.thread_us_per_req,
        engine: "io_uring",
    })
}

/// What fio's report says about a job.
#[derive(Clone, Copy, Debug)]
pub struct Report {
    pub iops: f64,
    /// Requests done (never 0).
    pub requests: u64,
    /// The job thread's CPU time per request, from `usr_cpu` + `sys_cpu` (percent of
    /// the job's runtime; fio reads them with `getrusage(RUSAGE_THREAD)`, so the kernel's
    /// io_uring workers are not in them).
    pub thread_us_per_req: f64,
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.trim().lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

/// fio's JSON report of a one-job run: the IOPS of the job's direction, the requests
/// done and its job thread's CPU time per request.
pub fn parse(text: &str, rw: Rw) -> Result<Report, String> {
    // fio may print a warning or two before the JSON object.
    let start = if text.starts_with('{') {
        0
    } else {
        text.find("\n{")
            .map(|i| i + 1)
            .ok_or("no JSON object in fio's output")?
    };
    let v: Value = serde_json::from_str(&text[start..])
        .map_err(|e| format!("fio's JSON does not parse: {e}"))?;
    let job = v
        .get("jobs")
        .and_then(Value::as_array)
        .and_then(|j| j.first())
        .ok_or("fio's JSON has no jobs[0]")?;
    match job.get("error").and_then(Value::as_i64) {
        Some(0) | None => {}
        Some(e) => return Err(format!("fio's job reports error {e}")),
    }
    let num = |v: Option<&Value>, what: &str| -> Result<f64, String> {
        v.and_then(Value::as_f64)
            .ok_or_else(|| format!("fio's JSON has no number jobs[0].{what}"))
    };
    let dir = rw.fio_direction();
    let iops = num(
        job.get(dir).and_then(|d| d.get("iops")),
        &format!("{dir}.iops"),
    )?;
    let usr = num(job.get("usr_cpu"), "usr_cpu")?;
    let sys = num(job.get("sys_cpu"), "sys_cpu")?;
    let requests = num(
        job.get(dir).and_then(|d| d.get("total_ios")),
        &format!("{dir}.total_ios"),
    )?;
    // (NaN fails the tests too.)
    if !iops.is_finite() || iops <= 0.0 || !requests.is_finite() || requests < 1.0 {
        return Err(format!(
            "fio did no {dir}s (jobs[0].{dir}.iops is {iops}, total_ios {requests})"
        ));
    }
    Ok(Report {
        iops,
        requests: requests as u64,
        // (usr+sys)% of the runtime, over iops × runtime requests.
        thread_us_per_req: (usr + sys) / 100.0 * 1e6 / iops,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = include_str!("fio_sample.json");

    #[test]
    fn reads_iops_and_cpu_per_request_from_a_captured_report() {
        let r = parse(SAMPLE, Rw::RandRead).unwrap();
        assert!((r.iops - 525_068.931_069).abs() < 1e-6);
        // 97.8 % of a CPU at 525 069 IOPS: 1.863 µs a request.
        assert!(
            (r.thread_us_per_req - 1.8626).abs() < 1e-3,
            "{}",
            r.thread_us_per_req
        );
        assert_eq!(r.requests, 525_594);
        // A warning line before the JSON is skipped.
        let noisy = format!("fio: some warning\n{SAMPLE}");
        assert_eq!(parse(&noisy, Rw::RandRead).unwrap().iops, r.iops);
    }

    #[test]
    fn bad_reports_are_errors_not_panics() {
        // The sample is a read job: its write side did nothing.
        assert!(parse(SAMPLE, Rw::RandWrite)
            .unwrap_err()
            .contains("no writes"));
        assert!(parse("", Rw::RandRead).is_err());
        assert!(parse("fio: file not found\n", Rw::RandRead).is_err());
        assert!(parse("{\"jobs\": []}", Rw::RandRead)
            .unwrap_err()
            .contains("jobs[0]"));
        assert!(parse("{\"jobs\": [{\"error\": 5}]}", Rw::RandRead)
            .unwrap_err()
            .contains("error 5"));
        let no_cpu = "{\"jobs\": [{\"read\": {\"iops\": 10.0, \"total_ios\": 10}}]}";
        assert!(parse(no_cpu, Rw::RandRead).unwrap_err().contains("usr_cpu"));
        assert!(parse("{\"jobs\": [ {", Rw::RandRead)
            .unwrap_err()
            .contains("parse"));
    }

    #[test]
    fn the_command_line_names_the_job() {
        let a = args(
            Path::new("/var/tmp/a:b.img"),
            Rw::RandWrite,
            32,
            Duration::from_secs(5),
            1 << 30,
            false,
            false,
        );
        for want in [
            "--filename=/var/tmp/a\\:b.img",
            "--rw=randwrite",
            "--iodepth=32",
            "--runtime=5",
            "--size=1073741824",
            "--ioengine=io_uring",
            "--direct=0",
            "--norandommap",
            "--randrepeat=0",
        ] {
            assert!(a.iter().any(|x| x == want), "{want} missing from {a:?}");
        }
        assert!(!a.iter().any(|x| x.starts_with("--iodepth_batch")));
        let b = args(
            Path::new("f"),
            Rw::RandRead,
            8,
            Duration::from_secs(1),
            4096,
            true,
            true,
        );
        assert!(b.iter().any(|x| x == "--iodepth_batch_submit=8"));
        assert!(b.iter().any(|x| x == "--iodepth_batch_complete_max=8"));
        assert!(
            b.iter().any(|x| x == "--direct=1"),
            "--direct: past the page cache"
        );
    }
}
