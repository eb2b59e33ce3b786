//! Turns fio's JSON output into rows of a results table.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One direction (read or write) of one fio job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FioRow {
    pub job: String,
    /// "read" or "write".
    pub dir: String,
    pub iops: f64,
    /// Throughput in MB/s (10^6 bytes).
    pub mb_s: f64,
    /// Mean total latency (submission to completion), microseconds.
    pub lat_mean_us: f64,
    /// 99th percentile latency, microseconds.
    pub lat_p99_us: f64,
}

fn num(v: &Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(v, |v, key| v.get(key))?.as_f64()
}

/// Parses fio's `--output-format=json` for `job` (the name shown in the table). Every fio
/// job in the output must have finished without error; each direction that moved bytes
/// becomes a row.
pub fn parse_fio_json(job: &str, text: &str) -> Result<Vec<FioRow>> {
    // fio may print notes before the JSON object when writing to stdout.
    let start = text.find('{').context("no JSON object in fio output")?;
    let doc: Value =
        serde_json::from_str(&text[start..]).with_context(|| format!("fio JSON of job {job}"))?;
    let jobs = doc
        .get("jobs")
        .and_then(Value::as_array)
        .with_context(|| format!("fio JSON of job {job} has no \"jobs\" array"))?;
    if jobs.is_empty() {
        bail!("fio JSON of job {job} lists no jobs");
    }
    let mut rows = Vec::new();
    for j in jobs {
        let error = j.get("error").and_then(Value::as_i64).unwrap_or(0);
        if error != 0 {
            bail!("fio job {job} failed with error {error}");
        }
        for dir in ["read", "write"] {
            let Some(d) = j.get(dir) else { continue };
            if num(d, &["io_bytes"]).unwrap_or(0.0) <= 0.0 {
                continue;
            }
            // lat_percentiles=1 puts percentiles under lat_ns; older jobs have clat_ns only.
            let p99 = num(d, &["lat_ns", "percentile", "99.000000"])
                .or_else(|| num(d, &["clat_ns", "percentile", "99.000000"]))
                .with_context(|| format!("fio job {job} {dir}: no p99 latency"))?;
            rows.push(FioRow {
                job: job.to_string(),
                dir: dir.to_string(),
                iops: num(d, &["iops"]).with_context(|| format!("fio job {job}: no iops"))?,
                mb_s: num(d, &["bw_bytes"]).unwrap_or(0.0) / 1e6,
                lat_mean_us: num(d, &["lat_ns", "mean"]).unwrap_or(0.0) / 1e3,
                lat_p99_us: p99 / 1e3,
            });
        }
    }
    if rows.is_empty() {
        bail!("fio job {job} moved no data");
    }
    Ok(rows)
}

/// A plain-text table of rows, one line each.
pub fn render_table(rows: &[FioRow]) -> String {
    let mut s = format!(
        "{:<20} {:<5} {:>10} {:>9} {:>11} {:>11}\n",
        "job", "dir", "IOPS", "MB/s", "mean (us)", "p99 (us)"
    );
    for r in rows {
        s.push_str(&format!(
            "{:<20} {:<5} {:>10.0} {:>9.1} {:>11.1} {:>11.1}\n",
            r.job, r.dir, r.iops, r.mb_s, r.lat_mean_us, r.lat_p99_us
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const RANDWRITE: &str = include_str!("../tests/fixtures/fio-randwrite-4k-qd32.json");
    const VERIFY: &str = include_str!("../tests/fixtures/fio-verify-crc32c.json");

    #[test]
    fn parses_real_fio_output() {
        let rows = parse_fio_json("randwrite-4k-qd32", RANDWRITE).unwrap();
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!(r.dir, "write");
        assert!(r.iops > 0.0 && r.mb_s > 0.0);
        // 4 KiB blocks: MB/s and IOPS agree to within fio's rounding.
        assert!(
            (r.mb_s * 1e6 / 4096.0 - r.iops).abs() / r.iops < 0.02,
            "{r:?}"
        );
        assert!(
            r.lat_p99_us >= r.lat_mean_us * 0.5 && r.lat_mean_us > 0.0,
            "{r:?}"
        );
    }

    #[test]
    fn verify_job_has_both_directions() {
        let rows = parse_fio_json("verify-crc32c", VERIFY).unwrap();
        let dirs: Vec<_> = rows.iter().map(|r| r.dir.as_str()).collect();
        assert_eq!(dirs, ["read", "write"]);
    }

    #[test]
    fn job_error_is_reported() {
        let bad = RANDWRITE.replacen("\"error\" : 0", "\"error\" : 5", 1);
        assert_ne!(bad, RANDWRITE, "fixture must contain an error field");
        let err = parse_fio_json("x", &bad).unwrap_err().to_string();
        assert!(err.contains("error 5"), "{err}");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for text in [
            "",
            "not json",
            "{",
            "{\"jobs\": []}",
            "{\"jobs\": 3}",
            "[1]",
        ] {
            assert!(parse_fio_json("x", text).is_err(), "{text:?}");
        }
    }

    #[test]
    fn notes_before_the_json_are_skipped() {
        let text = format!("note: both iodepth >= 1 and synchronous I/O engine\n{RANDWRITE}");
        assert_eq!(parse_fio_json("x", &text).unwrap().len(), 1);
    }

    #[test]
    fn table_has_a_line_per_row() {
        let rows = parse_fio_json("verify-crc32c", VERIFY).unwrap();
        let table = render_table(&rows);
        assert_eq!(table.lines().count(), 3);
        assert!(table.lines().nth(1).unwrap().starts_with("verify-crc32c"));
    }
}
