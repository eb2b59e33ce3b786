//! Where a guest run's CPU time went, as the bench measures it: the VMM process's threads
//! (sampled from `/proc/<pid>/task/*/stat` while it runs; its totals from `getrusage` once
//! it is reaped), the machine's CPUs (`/proc/stat`: the lab VM's, inside the lab) and what
//! fio in the guest reported for itself.

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::FromRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the sampler reads the VMM's threads.
const SAMPLE: Duration = Duration::from_millis(250);

/// CPU time of the VMM's threads of one name.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ThreadCpu {
    /// The threads' name with each run of digits as `N` (`vcpuN`, `CPU N/KVM`, `iou-wrk-N`).
    pub name: String,
    /// How many threads of that name were seen.
    pub count: usize,
    /// Seconds in user mode outside the guest (the VMM's own code).
    pub user_s: f64,
    /// Seconds in the kernel on the threads' behalf (KVM's exit handling, file I/O).
    pub sys_s: f64,
    /// Seconds running the guest's code (vCPU threads).
    pub guest_s: f64,
}

/// The VMM process's CPU time over one guest run, and the machine's.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ProcessCpu {
    /// Wall time the run took.
    pub wall_s: f64,
    /// The whole process's user time (guest time included) and system time, from
    /// `getrusage(RUSAGE_CHILDREN)` around the run: exact, every thread included.
    pub user_s: f64,
    pub sys_s: f64,
    /// By thread name, from samples every 250 ms. A thread's last interval, and threads that
    /// lived less than one, are not in here: `user_s + sys_s` minus their sum is
    /// `unsampled_s`.
    pub threads: Vec<ThreadCpu>,
    pub unsampled_s: f64,
    /// CPUs of the machine the VMM ran on (the lab VM's, inside the lab).
    pub cpus: usize,
    /// CPU-seconds those CPUs were busy over the run (everything but idle and iowait),
    /// whoever used them, and the part of it in their kernel (system, irq, softirq).
    pub machine_busy_s: f64,
    pub machine_kernel_s: f64,
    /// KVM's event counters over the run (`/sys/kernel/debug/kvm`, the sum over the VMs on
    /// the machine: the bench runs one at a time), by name; empty where debugfs is not
    /// there.
    pub kvm: BTreeMap<String, f64>,
}

impl ProcessCpu {
    pub fn total_s(&self) -> f64 {
        self.user_s + self.sys_s
    }

    /// Share of the machine's CPUs busy over the run, in percent.
    pub fn machine_busy_pct(&self) -> f64 {
        100.0 * self.machine_busy_s / (self.wall_s * self.cpus.max(1) as f64)
    }

    /// Share of the machine's CPUs in their kernel over the run, in percent.
    pub fn machine_kernel_pct(&self) -> f64 {
        100.0 * self.machine_kernel_s / (self.wall_s * self.cpus.max(1) as f64)
    }
}

/// A thread's name with each run of digits replaced by `N`.
fn thread_class(comm: &str) -> String {
    let mut out = String::new();
    let mut in_digits = false;
    for c in comm.chars() {
        if c.is_ascii_digit() {
            if !in_digits {
                out.push('N');
            }
            in_digits = true;
        } else {
            out.push(c);
            in_digits = false;
        }
    }
    out
}

/// One `/proc/<pid>/stat` line: comm and the fields after it (from field 3, `state`).
fn parse_stat(line: &str) -> Option<(String, Vec<&str>)> {
    let open = line.find('(')?;
    let close = line.rfind(')')?;
    let comm = line.get(open + 1..close)?.to_string();
    let rest = line.get(close + 1..)?.split_whitespace().collect();
    Some((comm, rest))
}

/// A thread's figures in clock ticks: user (guest included), system, guest.
#[derive(Clone, Debug, Default)]
struct TaskTicks {
    comm: String,
    utime: u64,
    stime: u64,
    gtime: u64,
}

fn task_ticks(line: &str) -> Option<TaskTicks> {
    let (comm, f) = parse_stat(line)?;
    // Fields 14, 15 and 43 of proc(5), counted from field 3.
    let field = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
    Some(TaskTicks {
        comm,
        utime: field(14)?,
        stime: field(15)?,
        gtime: field(43).unwrap_or(0),
    })
}

/// A child process of ours that is still running (the VMM, the only one during a boot).
fn find_child() -> Option<u32> {
    let me = std::process::id().to_string();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(line) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some((_, f)) = parse_stat(&line) {
            if f.get(1) == Some(&me.as_str()) && f.first() != Some(&"Z") {
                return Some(pid);
            }
        }
    }
    None
}

/// Reads every thread of `pid` into `seen` (tid to its latest figures).
fn sample(pid: u32, seen: &mut BTreeMap<u32, TaskTicks>) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for t in tasks.flatten() {
        let Some(tid) = t.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if let Some(ticks) = std::fs::read_to_string(t.path().join("stat"))
            .ok()
            .as_deref()
            .and_then(task_ticks)
        {
            seen.insert(tid, ticks);
        }
    }
}

/// The `cpu` lines of `/proc/stat`: the total's fields and the number of CPUs.
fn machine_stat() -> Option<(Vec<u64>, usize)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let total = text
        .lines()
        .find(|l| l.starts_with("cpu "))?
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().ok())
        .collect::<Option<Vec<u64>>>()?;
    let cpus = text
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count();
    Some((total, cpus))
}

/// Busy and kernel ticks between two `/proc/stat` totals: user nice system idle iowait irq
/// softirq steal (guest time is inside user).
fn machine_busy(a: &[u64], b: &[u64]) -> (f64, f64) {
    let d = |i: usize| {
        b.get(i)
            .unwrap_or(&0)
            .saturating_sub(*a.get(i).unwrap_or(&0)) as f64
    };
    let all: f64 = (0..8).map(d).sum();
    (all - d(3) - d(4), d(2) + d(5) + d(6))
}

fn children_rusage() -> (f64, f64) {
    // SAFETY: getrusage writes one struct rusage, which we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return (0.0, 0.0);
    }
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (s(ru.ru_utime), s(ru.ru_stime))
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no memory effects.
    match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        t if t > 0 => t as f64,
        _ => 100.0,
    }
}

/// KVM's counters the bench reads (files in `/sys/kernel/debug/kvm`): VM exits and the
/// main kinds of them, interrupts injected, and shadow-paging faults (the lab's KVM runs
/// with `npt=0`).
pub const KVM_STATS: [&str; 11] = [
    "exits",
    "mmio_exits",
    "io_exits",
    "irq_exits",
    "halt_exits",
    "halt_wakeup",
    "irq_injections",
    "pf_fixed",
    "pf_guest",
    "insn_emulation",
    "signal_exits",
];

const KVM_DEBUGFS: &str = "/sys/kernel/debug/kvm";

/// Whether KVM's counters can be read. Inside the lab VM (ours alone) debugfs is mounted
/// when it is not; elsewhere it is only read if already there.
fn kvm_stats_ready() -> bool {
    let exits = Path::new(KVM_DEBUGFS).join("exits");
    if exits.exists() {
        return true;
    }
    if std::env::var_os(vmm_lab::labvm::INSIDE_ENV).is_none() {
        return false;
    }
    let (src, dst, fs) = (c"debugfs", c"/sys/kernel/debug", c"debugfs");
    // SAFETY: the strings are NUL-terminated literals; no data argument.
    unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) };
    exits.exists()
}

fn kvm_stats() -> Vec<u64> {
    KVM_STATS
        .iter()
        .map(|name| {
            std::fs::read_to_string(Path::new(KVM_DEBUGFS).join(name))
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(0)
        })
        .collect()
}

/// One reading of the VMM's threads and the machine's CPUs.
struct Sample {
    at: Instant,
    /// Thread id to its figures; only threads alive at the time.
    tasks: BTreeMap<u32, TaskTicks>,
    /// `/proc/stat`'s total line.
    machine: Option<Vec<u64>>,
    /// `KVM_STATS`, in that order.
    kvm: Option<Vec<u64>>,
}

/// Measures one guest run: start it before the VMM starts, finish it once the VMM has been
/// reaped (`guest::boot` has returned).
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<Sample>>,
    start: Instant,
    rusage: (f64, f64),
    stat: Option<(Vec<u64>, usize)>,
}

impl Sampler {
    pub fn start() -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let kvm = kvm_stats_ready();
            let mut samples = Vec::new();
            let mut pid = None;
            while !flag.load(Ordering::SeqCst) {
                if pid.is_none() {
                    pid = find_child();
                }
                if let Some(p) = pid {
                    let mut tasks = BTreeMap::new();
                    sample(p, &mut tasks);
                    samples.push(Sample {
                        at: Instant::now(),
                        tasks,
                        machine: machine_stat().map(|(t, _)| t),
                        kvm: kvm.then(kvm_stats),
                    });
                }
                std::thread::sleep(if pid.is_some() {
                    SAMPLE
                } else {
                    Duration::from_millis(20)
                });
            }
            samples
        });
        Sampler {
            stop,
            thread,
            start: Instant::now(),
            rusage: children_rusage(),
            stat: machine_stat(),
        }
    }

    /// The whole run's figures, and the samples for `Trace::window`.
    pub fn finish(self) -> (ProcessCpu, Trace) {
        let wall_s = self.start.elapsed().as_secs_f64();
        let (u1, s1) = children_rusage();
        let stat = machine_stat();
        self.stop.store(true, Ordering::SeqCst);
        let samples = self.thread.join().unwrap_or_default();
        let hz = clock_ticks();
        // Each thread's last figures.
        let mut last: BTreeMap<u32, TaskTicks> = BTreeMap::new();
        for s in &samples {
            last.extend(s.tasks.iter().map(|(tid, t)| (*tid, t.clone())));
        }
        let threads = classes(last.values().map(|t| {
            (
                t.comm.as_str(),
                [t.utime as f64, t.stime as f64, t.gtime as f64],
            )
        }))
        .into_iter()
        .map(|mut t| {
            t.user_s /= hz;
            t.sys_s /= hz;
            t.guest_s /= hz;
            t
        })
        .collect::<Vec<_>>();
        let (user_s, sys_s) = (u1 - self.rusage.0, s1 - self.rusage.1);
        let sampled: f64 = threads.iter().map(|t| t.user_s + t.sys_s + t.guest_s).sum();
        let cpus = self.stat.as_ref().map_or(0, |s| s.1);
        let (busy, kernel) = match (self.stat, stat) {
            (Some((a, _)), Some((b, _))) => {
                let (busy, kernel) = machine_busy(&a, &b);
                (busy / hz, kernel / hz)
            }
            _ => (f64::NAN, f64::NAN),
        };
        let kvm = match (
            samples.first().and_then(|s| s.kvm.as_ref()),
            samples.last().and_then(|s| s.kvm.as_ref()),
        ) {
            (Some(a), Some(b)) => KVM_STATS
                .iter()
                .zip(a.iter().zip(b))
                .map(|(name, (a, b))| (name.to_string(), b.saturating_sub(*a) as f64))
                .collect(),
            _ => BTreeMap::new(),
        };
        let whole = ProcessCpu {
            kvm,
            wall_s,
            user_s,
            sys_s,
            threads,
            unsampled_s: user_s + sys_s - sampled,
            cpus,
            machine_busy_s: busy,
            machine_kernel_s: kernel,
        };
        (whole, Trace { samples, hz, cpus })
    }
}

/// Sums figures ([user with guest, system, guest] in any unit) by thread class, busiest
/// first; `user_s` is left without the guest's share.
fn classes<'a>(threads: impl Iterator<Item = (&'a str, [f64; 3])>) -> Vec<ThreadCpu> {
    let mut by: BTreeMap<String, ThreadCpu> = BTreeMap::new();
    for (comm, [u, s, g]) in threads {
        let name = thread_class(comm);
        let c = by.entry(name.clone()).or_insert_with(|| ThreadCpu {
            name,
            ..ThreadCpu::default()
        });
        c.count += 1;
        c.user_s += (u - g).max(0.0);
        c.sys_s += s;
        c.guest_s += g;
    }
    let mut v: Vec<ThreadCpu> = by.into_values().collect();
    v.sort_by(|a, b| (b.user_s + b.sys_s + b.guest_s).total_cmp(&(a.user_s + a.sys_s + a.guest_s)));
    v
}

/// Linear interpolation of a series of (time, value) at `t`; before the first point the
/// value is `before`, after the last it stays at the last value.
fn interpolate(points: &[(Instant, f64)], t: Instant, before: f64) -> f64 {
    let Some(first) = points.first() else {
        return before;
    };
    if t <= first.0 {
        return before;
    }
    for w in points.windows(2) {
        let ((t0, v0), (t1, v1)) = (w[0], w[1]);
        if t <= t1 {
            let span = (t1 - t0).as_secs_f64();
            let f = if span > 0.0 {
                (t - t0).as_secs_f64() / span
            } else {
                1.0
            };
            return v0 + (v1 - v0) * f;
        }
    }
    points.last().map_or(before, |p| p.1)
}

/// The samples of one run, for the CPU used between two instants of it.
pub struct Trace {
    samples: Vec<Sample>,
    hz: f64,
    cpus: usize,
}

impl Trace {
    /// What the VMM's threads and the machine's CPUs used from `from` to `to`, by linear
    /// interpolation between samples. A thread counts from zero at the sample before it was
    /// first seen; one that ended keeps its last figures. `user_s` and `sys_s` are the
    /// threads' sums (`unsampled_s` is 0).
    pub fn window(&self, from: Instant, to: Instant) -> ProcessCpu {
        type Points = Vec<(Instant, [f64; 3])>;
        let mut series: BTreeMap<u32, (String, Points)> = BTreeMap::new();
        let mut born: BTreeMap<u32, Instant> = BTreeMap::new();
        let mut previous: Option<Instant> = None;
        for s in &self.samples {
            for (tid, t) in &s.tasks {
                let e = series
                    .entry(*tid)
                    .or_insert_with(|| (t.comm.clone(), Vec::new()));
                e.0.clone_from(&t.comm);
                e.1.push((s.at, [t.utime as f64, t.stime as f64, t.gtime as f64]));
                born.entry(*tid).or_insert(previous.unwrap_or(s.at));
            }
            previous = Some(s.at);
        }
        let delta = |points: &[(Instant, f64)]| {
            interpolate(points, to, 0.0) - interpolate(points, from, 0.0)
        };
        let threads = series.iter().map(|(tid, (comm, points))| {
            let mut d = [0.0; 3];
            for (k, v) in d.iter_mut().enumerate() {
                let mut p: Vec<(Instant, f64)> = Vec::with_capacity(points.len() + 1);
                if let Some(b) = born
                    .get(tid)
                    .filter(|b| Some(**b) != points.first().map(|p| p.0))
                {
                    p.push((*b, 0.0));
                }
                p.extend(points.iter().map(|(at, x)| (*at, x[k] / self.hz)));
                *v = delta(&p);
            }
            (comm.as_str(), d)
        });
        let threads = classes(threads);
        let machine = |i: usize| -> Vec<(Instant, f64)> {
            self.samples
                .iter()
                .filter_map(|s| Some((s.at, *s.machine.as_ref()?.get(i)? as f64 / self.hz)))
                .collect()
        };
        let field = |i: usize| delta(&machine(i));
        let all: f64 = (0..8).map(field).sum();
        let busy = all - field(3) - field(4);
        let kernel = field(2) + field(5) + field(6);
        let kvm = if self.samples.iter().any(|s| s.kvm.is_some()) {
            KVM_STATS
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    let points: Vec<(Instant, f64)> = self
                        .samples
                        .iter()
                        .filter_map(|s| Some((s.at, *s.kvm.as_ref()?.get(i)? as f64)))
                        .collect();
                    (name.to_string(), delta(&points))
                })
                .collect()
        } else {
            BTreeMap::new()
        };
        ProcessCpu {
            wall_s: to.saturating_duration_since(from).as_secs_f64(),
            user_s: threads.iter().map(|t| t.user_s + t.guest_s).sum(),
            sys_s: threads.iter().map(|t| t.sys_s).sum(),
            threads,
            unsampled_s: 0.0,
            cpus: self.cpus,
            machine_busy_s: busy,
            machine_kernel_s: kernel,
            kvm,
        }
    }
}

/// While it lives, our stderr goes through a pipe: a thread passes every line on to the
/// real stderr and keeps, with its arrival time, each line `keep` picks. This is how the
/// bench learns when the guest's marker lines (which `guest::boot` prints as they come)
/// arrived, without a change to the boot loop.
pub struct StderrTap {
    saved: libc::c_int,
    reader: Option<JoinHandle<Vec<(Instant, String)>>>,
}

impl StderrTap {
    pub fn start(keep: fn(&str) -> bool) -> Result<StderrTap> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 fills two fds, which we own from here on.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error()).context("pipe2 for the stderr tap");
        }
        let [read_end, write_end] = fds;
        // SAFETY: duplicating and replacing fds this process owns; on failure each new fd
        // is closed before returning.
        unsafe {
            let saved = libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 3);
            let out = libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 3);
            if saved < 0 || out < 0 || libc::dup2(write_end, 2) < 0 {
                let e = std::io::Error::last_os_error();
                for fd in [saved, out, read_end, write_end] {
                    if fd >= 0 {
                        libc::close(fd);
                    }
                }
                return Err(e).context("redirecting stderr to the tap");
            }
            libc::close(write_end);
            let input = std::fs::File::from_raw_fd(read_end);
            let mut output = std::fs::File::from_raw_fd(out);
            let reader = std::thread::spawn(move || {
                let mut kept = Vec::new();
                let mut r = BufReader::new(input);
                let mut buf = Vec::new();
                while let Ok(n) = r.read_until(b'\n', &mut buf) {
                    if n == 0 {
                        break;
                    }
                    let at = Instant::now();
                    let _ = output.write_all(&buf);
                    let line = String::from_utf8_lossy(&buf);
                    if keep(&line) {
                        kept.push((at, line.trim_end().to_string()));
                    }
                    buf.clear();
                }
                kept
            });
            Ok(StderrTap {
                saved,
                reader: Some(reader),
            })
        }
    }

    /// Puts stderr back and returns the lines kept.
    pub fn finish(mut self) -> Vec<(Instant, String)> {
        self.restore();
        self.reader
            .take()
            .and_then(|r| r.join().ok())
            .unwrap_or_default()
    }

    fn restore(&mut self) {
        if self.saved >= 0 {
            // SAFETY: `saved` is our duplicate of the real stderr; putting it back closes
            // the pipe's last write end, so the reader sees its end.
            unsafe {
                libc::dup2(self.saved, 2);
                libc::close(self.saved);
            }
            self.saved = -1;
        }
    }
}

impl Drop for StderrTap {
    fn drop(&mut self) {
        self.restore();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// What fio said about its own CPU use in the guest, for one job.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FioCpu {
    pub job: String,
    /// fio's `usr_cpu` and `sys_cpu`: percent of one CPU, averaged over the job's threads.
    pub usr_pct: f64,
    pub sys_pct: f64,
    /// fio's `job_runtime` (milliseconds, summed over the job's threads).
    pub runtime_ms: f64,
    /// I/Os completed in both directions.
    pub ios: f64,
    /// Context switches.
    pub ctx: f64,
}

impl FioCpu {
    /// Seconds of the guest's CPU that fio's threads used (user, system).
    pub fn cpu_s(&self) -> (f64, f64) {
        let run = self.runtime_ms / 1e3;
        (self.usr_pct / 100.0 * run, self.sys_pct / 100.0 * run)
    }
}

/// Reads `FioCpu` from one job's fio JSON (the report's text for it).
pub fn fio_cpu(job: &str, text: &str) -> Result<FioCpu> {
    let start = text.find('{').context("no JSON object in fio output")?;
    let doc: Value =
        serde_json::from_str(&text[start..]).with_context(|| format!("fio JSON of job {job}"))?;
    let jobs = doc
        .get("jobs")
        .and_then(Value::as_array)
        .filter(|j| !j.is_empty())
        .with_context(|| format!("fio JSON of job {job} has no jobs"))?;
    let num = |j: &Value, path: &[&str]| {
        path.iter()
            .try_fold(j, |v, k| v.get(k))
            .and_then(Value::as_f64)
    };
    let mut out = FioCpu {
        job: job.to_string(),
        usr_pct: 0.0,
        sys_pct: 0.0,
        runtime_ms: 0.0,
        ios: 0.0,
        ctx: 0.0,
    };
    for j in jobs {
        let field = |k: &str| num(j, &[k]).with_context(|| format!("fio job {job}: no {k}"));
        let runtime = field("job_runtime")?;
        // Weighted by runtime, as fio itself merges the threads of a group.
        out.usr_pct += field("usr_cpu")? * runtime;
        out.sys_pct += field("sys_cpu")? * runtime;
        out.runtime_ms += runtime;
        out.ctx += field("ctx")?;
        out.ios += ["read", "write"]
            .iter()
            .filter_map(|d| num(j, &[d, "total_ios"]))
            .sum::<f64>();
    }
    if out.runtime_ms > 0.0 {
        out.usr_pct /= out.runtime_ms;
        out.sys_pct /= out.runtime_ms;
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
