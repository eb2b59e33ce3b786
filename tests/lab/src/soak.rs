//! `lab soak`: many short boots of each variant in one lab session, counting the guests
//! that hang (run past a short limit) and keeping each hang's full report. For faults too
//! rare for a bench to show, such as the halted guest of docs/lab.md: variants alternate
//! boot by boot, so that a slow or busy stretch of the session falls on all of them, and
//! the host or the lab can be kept busy beside the guests (`--hog-host`, `--hog-lab`).

use crate::{spec_for, GuestOpts};
use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;
use vmm_lab::guest::{self, Backend, Scratch, VmmExit};

#[derive(Args, Debug)]
pub struct SoakArgs {
    /// Boots of each variant.
    #[arg(long, default_value_t = 20)]
    pub boots: usize,
    /// The variants, comma-separated: `vmm`, `qemu` (virtio-blk-pci, ACPI), `qemu-noacpi`
    /// (QEMU shaped like vmm: no ACPI, no HPET; the MP table and the local APIC's timer
    /// only). Each may carry guest kernel parameters after a colon, `+` for a space, to
    /// test one hypothesis against the plain variant in the same session:
    /// `vmm:no-kvmapf`, `vmm:no-kvmclock+tsc=reliable`.
    #[arg(long, value_delimiter = ',', default_value = "vmm,qemu,qemu-noacpi")]
    pub variants: Vec<String>,
    /// The guest's task on every boot (init's task words). `--interceptors FILE` and
    /// `--block-option` apply to the vmm variants (the demo's hang was a guest through
    /// the whole stack).
    #[arg(long, default_value = "fio=randread-4k-qd1")]
    pub task: String,
    /// Seconds each fio job runs (replaces --fio-runtime).
    #[arg(long, default_value_t = 1)]
    pub fio_seconds: u32,
    /// A boot that has not ended after this many seconds is a hang (replaces --timeout);
    /// a normal one takes 10 to 30 s in the lab.
    #[arg(long, default_value_t = 90)]
    pub limit: u64,
    /// Busy threads on the host beside the lab VM while the boots run (contention, as
    /// when a second lab session shares the host).
    #[arg(long, default_value_t = 0)]
    pub hog_host: usize,
    /// Busy threads inside the lab VM, beside the guests' VMMs.
    #[arg(long, default_value_t = 0)]
    pub hog_lab: usize,
    /// MiB written to a file in the lab's tmpfs before the boots and kept until the end:
    /// memory pressure inside the lab (its page cache and compaction), as after a bench's
    /// write jobs have filled their disk images there.
    #[arg(long, default_value_t = 0)]
    pub lab_fill_mib: u64,
    /// Sample the VMM's threads, the lab's CPUs and KVM's counters every 250 ms during each
    /// boot, its stderr through a tap, as `lab bench` does (its sessions are where the halted guest was seen): to
    /// test whether the sampling matters. With `--parallel 1` only.
    #[arg(long)]
    pub sample_cpu: bool,
    /// Guests booted at once (1 to 4): with 2, each guest has another busy guest beside
    /// it in the lab, and the session does twice the boots in the same time.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=4))]
    pub parallel: u8,
    /// Directory for the hang reports, one text file each (default: build/soak).
    #[arg(long)]
    pub reports: Option<PathBuf>,
    /// Write every boot's outcome and the counts as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub opts: GuestOpts,
}

/// A variant: a backend and the guest kernel parameters added to its command line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Variant {
    pub label: String,
    pub backend: Backend,
    pub params: String,
}

/// `BACKEND[:PARAM+PARAM..]`.
pub fn parse_variant(s: &str) -> Result<Variant> {
    let (name, params) = s.split_once(':').unwrap_or((s, ""));
    let backend = match name.trim() {
        "vmm" => Backend::Vmm,
        "qemu" => Backend::Qemu,
        "qemu-noacpi" => Backend::QemuNoAcpi,
        "qemu-io_uring" => Backend::QemuIoUring,
        other => bail!("{other:?}: a variant is vmm, qemu, qemu-noacpi or qemu-io_uring"),
    };
    let params = params.replace('+', " ");
    if params
        .split_whitespace()
        .any(|w| w.contains('"') || w.starts_with("init="))
    {
        bail!("{s:?}: kernel parameters without quotes, and not init=");
    }
    Ok(Variant {
        label: s.trim().to_string(),
        backend,
        params: params.split_whitespace().collect::<Vec<_>>().join(" "),
    })
}

#[derive(Debug, Default, Serialize)]
pub struct Counts {
    pub boots: usize,
    pub ok: usize,
    pub hangs: usize,
    pub other_failures: usize,
}

/// What the workers share: the next boot of the plan, the counts, the boots done.
struct Tally {
    next: usize,
    /// Plan places done before a restart of the lab.
    done: std::collections::HashSet<usize>,
    counts: Vec<Counts>,
    boots: Vec<Boot>,
    progress: Option<std::fs::File>,
}

/// One boot's outcome, as the progress file keeps it (a line of JSON each).
#[derive(Debug, Serialize, Deserialize)]
struct Boot {
    /// Its place in the session's plan.
    plan_index: usize,
    variant: String,
    n: usize,
    outcome: String,
    seconds: f64,
    report: Option<PathBuf>,
}

/// The variable naming the progress file: set by the `lab` outside the lab VM, so that a
/// session the lab restarts after a fault of its own kernel goes on where it stopped
/// instead of starting over.
pub const PROGRESS_ENV: &str = "VMM_LAB_SOAK_PROGRESS";

/// The boots a progress file recorded (none if there is no file yet).
fn recorded(path: &std::path::Path) -> Result<Vec<Boot>> {
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).with_context(|| format!("{}: {l}", path.display())))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Names the progress file before the command moves into the lab (where it would be
/// started again from the same arguments after a lab fault).
pub fn name_progress() {
    if std::env::var_os(PROGRESS_ENV).is_none() {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let path = vmm_lab::paths::build_dir()
            .join("soak")
            .join(format!("progress-{stamp}.jsonl"));
        std::env::set_var(PROGRESS_ENV, path);
    }
}

/// Spins until the process ends: a CPU kept busy beside the guests.
fn hog(n: usize) {
    for _ in 0..n {
        std::thread::spawn(|| {
            let mut x = 0u64;
            loop {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        });
    }
}

/// The host's busy threads, before the command moves into the lab.
pub fn hog_host(a: &SoakArgs) {
    hog(a.hog_host);
}

/// The next place of the plan to boot, past those done before a restart; None at its end.
fn next_place(
    next: &mut usize,
    done: &std::collections::HashSet<usize>,
    len: usize,
) -> Option<usize> {
    while done.contains(next) {
        *next += 1;
    }
    (*next < len).then(|| {
        *next += 1;
        *next - 1
    })
}

/// The order of the variants in round `r`: rotated each round, so that none always boots
/// right after another.
pub fn round_order(n: usize, r: usize) -> Vec<usize> {
    (0..n).map(|i| (i + r) % n.max(1)).collect()
}

/// What every worker shares.
struct Session<'a> {
    a: &'a SoakArgs,
    variants: &'a [Variant],
    plan: &'a [usize],
    state: &'a Mutex<Tally>,
    reports: &'a std::path::Path,
    stamp: u64,
    t0: Instant,
}

/// One worker: boots the plan's next place until none is left.
fn worker(w: u8, session: &Session<'_>) -> Result<()> {
    let Session {
        a,
        variants,
        plan,
        state,
        reports,
        stamp,
        t0,
    } = *session;
    let total = plan.len();
    let scratch = Scratch::new(&format!("soak{w}"))?;
    // Guests at once each get a copy of the root image: on the lab's 9p
    // share, vmm's flock of the cached one reads as a POSIX lock that
    // QEMU's image locking refuses to share.
    let rootfs = if a.parallel > 1 {
        let cached = vmm_lab::paths::guest_image()?.rootfs_ext4;
        let copy = scratch.path().join("rootfs.ext4");
        std::fs::copy(&cached, &copy).with_context(|| format!("copying {}", cached.display()))?;
        Some(copy)
    } else {
        None
    };
    loop {
        let (place, i) = {
            let mut t = state.lock().unwrap_or_else(|p| p.into_inner());
            let t = &mut *t;
            match next_place(&mut t.next, &t.done, plan.len()) {
                Some(place) => (place, plan[place]),
                None => return Ok(()),
            }
        };
        let v = &variants[i];
        let mut opts = a.opts.clone();
        opts.backend = v.backend;
        if v.backend != Backend::Vmm {
            // --interceptors and --block-option are vmm's.
            opts.interceptors = None;
            opts.block_options.clear();
        }
        opts.fio_runtime = a.fio_seconds;
        opts.timeout = a.limit;
        let task = format!("{} {}", a.task, v.params);
        let mut spec = spec_for(&opts, task.trim(), &scratch)?;
        spec.control_sock = Some(scratch.path().join("api.sock"));
        if let Some(r) = &rootfs {
            spec.image.rootfs_ext4 = r.clone();
        }
        let start = Instant::now();
        // As lab bench measures a boot: its stderr through a tap, the sampler beside it.
        let tap = if a.sample_cpu {
            Some(crate::cpu::StderrTap::start(|_| false)?)
        } else {
            None
        };
        let sampler = a.sample_cpu.then(crate::cpu::Sampler::start);
        let run = guest::boot(&spec);
        if let Some(s) = sampler {
            s.finish();
        }
        if let Some(t) = tap {
            t.finish();
        }
        let run = run?;
        let seconds = start.elapsed().as_secs_f64();
        let mut t = state.lock().unwrap_or_else(|p| p.into_inner());
        let c = &mut t.counts[i];
        c.boots += 1;
        let n = c.boots;
        let outcome = match (run.ok(), run.vmm_exit) {
            (true, _) => {
                c.ok += 1;
                "ok"
            }
            (false, VmmExit::Timeout) => {
                c.hangs += 1;
                "hang"
            }
            (false, _) => {
                c.other_failures += 1;
                "failed"
            }
        };
        let report = (outcome != "ok").then(|| {
            reports.join(format!(
                "{stamp}-{}-{n}.txt",
                v.label.replace(['/', ' ', ':', '+'], "_")
            ))
        });
        if let Some(path) = &report {
            let mut text = format!(
                "lab soak {stamp}: {} boot {n} of {}: {outcome} after {seconds:.1} s ({} at once)\n\n",
                v.label, a.boots, a.parallel
            );
            for p in &run.problems {
                text.push_str(&format!("problem: {p}\n\n"));
            }
            text.push_str("console:\n");
            text.push_str(&run.transcript);
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        eprintln!(
            "lab soak: [{}/{total}, {:.0} min] {} boot {n}: {outcome} in {seconds:.1} s{}",
            t.boots.len() + 1,
            t0.elapsed().as_secs_f64() / 60.0,
            v.label,
            report
                .as_ref()
                .map(|p| format!(" (report: {})", p.display()))
                .unwrap_or_default()
        );
        let boot = Boot {
            plan_index: place,
            variant: v.label.clone(),
            n,
            outcome: outcome.to_string(),
            seconds,
            report,
        };
        if let Some(f) = t.progress.as_mut() {
            let line = serde_json::to_string(&boot)? + "\n";
            std::io::Write::write_all(f, line.as_bytes())
                .and_then(|_| f.sync_data())
                .context("writing the progress file")?;
        }
        t.boots.push(boot);
    }
}

pub fn run(a: SoakArgs) -> Result<i32> {
    let variants = a
        .variants
        .iter()
        .map(|v| parse_variant(v))
        .collect::<Result<Vec<_>>>()?;
    if variants.is_empty() || a.boots == 0 {
        bail!("nothing to boot: give --variants and --boots");
    }
    if a.sample_cpu && a.parallel > 1 {
        bail!("--sample-cpu samples the one VMM running: with --parallel 1 only");
    }
    hog(a.hog_lab);
    let fill = Scratch::new("soak-fill")?;
    if a.lab_fill_mib > 0 {
        let path = fill.path().join("fill");
        let mut f =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let chunk: Vec<u8> = (0..1 << 20)
            .map(|i: u32| (i.wrapping_mul(2654435761) >> 24) as u8)
            .collect();
        for _ in 0..a.lab_fill_mib {
            std::io::Write::write_all(&mut f, &chunk)
                .with_context(|| format!("filling {}", path.display()))?;
        }
        eprintln!(
            "lab soak: {} MiB written to {} (kept until the end)",
            a.lab_fill_mib,
            path.display()
        );
    }
    let reports = a
        .reports
        .clone()
        .unwrap_or_else(|| vmm_lab::paths::build_dir().join("soak"));
    std::fs::create_dir_all(&reports).with_context(|| format!("creating {}", reports.display()))?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // Every boot in order: one of each variant per round, the order rotated each round.
    let plan: Vec<usize> = (0..a.boots)
        .flat_map(|round| round_order(variants.len(), round))
        .collect();
    eprintln!(
        "lab soak: {} boots of each of {}, {} at once (task {:?}, hang after {} s, {} busy host thread(s), {} in the lab)",
        a.boots,
        a.variants.join(", "),
        a.parallel,
        a.task,
        a.limit,
        a.hog_host,
        a.hog_lab
    );
    let t0 = Instant::now();
    let progress_path = std::env::var_os(PROGRESS_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| reports.join(format!("progress-{stamp}.jsonl")));
    let mut tally = Tally {
        next: 0,
        done: Default::default(),
        counts: variants.iter().map(|_| Counts::default()).collect(),
        boots: Vec::new(),
        progress: None,
    };
    for b in recorded(&progress_path)? {
        let Some(i) = variants.iter().position(|v| v.label == b.variant) else {
            bail!(
                "{}: variant {} is not this session's",
                progress_path.display(),
                b.variant
            );
        };
        let c = &mut tally.counts[i];
        c.boots += 1;
        match b.outcome.as_str() {
            "ok" => c.ok += 1,
            "hang" => c.hangs += 1,
            _ => c.other_failures += 1,
        }
        tally.done.insert(b.plan_index);
        tally.boots.push(b);
    }
    if !tally.boots.is_empty() {
        eprintln!(
            "lab soak: going on after {} boots recorded in {} (the lab was started again)",
            tally.boots.len(),
            progress_path.display()
        );
    }
    tally.progress = Some(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&progress_path)
            .with_context(|| format!("opening {}", progress_path.display()))?,
    );
    let state = Mutex::new(tally);
    let session = Session {
        a: &a,
        variants: &variants,
        plan: &plan,
        state: &state,
        reports: &reports,
        stamp,
        t0,
    };
    std::thread::scope(|scope| -> Result<()> {
        let workers: Vec<_> = (0..a.parallel)
            .map(|w| {
                let session = &session;
                scope.spawn(move || worker(w, session))
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("a soak worker panicked"))??;
        }
        Ok(())
    })?;
    let Tally { counts, boots, .. } = state.into_inner().unwrap_or_else(|p| p.into_inner());
    if let Some(path) = &a.json {
        let value = serde_json::json!({
            "task": a.task,
            "limit_s": a.limit,
            "hog_host": a.hog_host,
            "hog_lab": a.hog_lab,
            "parallel": a.parallel,
            "variants": variants,
            "counts": counts,
            "boots": boots,
        });
        std::fs::write(path, serde_json::to_string_pretty(&value)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{}", render(&variants, &counts));
    Ok(if counts.iter().all(|c| c.ok == c.boots) {
        0
    } else {
        1
    })
}

/// The counts as a table; the last lines give each variant's hangs as `hangs LABEL: H/N`.
pub fn render(variants: &[Variant], counts: &[Counts]) -> String {
    let w = variants
        .iter()
        .map(|v| v.label.len())
        .max()
        .unwrap_or(7)
        .max(7);
    let mut out = format!(
        "{:w$}  {:>6}  {:>6}  {:>6}  {:>6}\n",
        "variant", "boots", "ok", "hangs", "failed"
    );
    for (v, c) in variants.iter().zip(counts) {
        out.push_str(&format!(
            "{:w$}  {:>6}  {:>6}  {:>6}  {:>6}\n",
            v.label, c.boots, c.ok, c.hangs, c.other_failures
        ));
    }
    for (v, c) in variants.iter().zip(counts) {
        out.push_str(&format!("hangs {}: {}/{}\n", v.label, c.hangs, c.boots));
    }
    out.trim_end().to_string()
}

#[cfg(test)]
mod tests;
