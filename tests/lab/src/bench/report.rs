//! What `lab bench` prints and draws from its reports: the per-layer figures, the table of
//! vmm against the better QEMU row by row, the VMMs' CPU per I/O, ratios and the chart.

use super::*;

/// After the tables: what each interceptor of each variant did in its last round, and what
/// `vmm-img info` said of its disk.
pub(super) fn print_layers(runs: &[Vec<BenchReport>]) {
    for r in runs.iter().filter_map(|v| v.last()) {
        if r.layers.is_empty() {
            continue;
        }
        println!();
        println!(
            "{} (round {}): what each layer did over the fio boot, top first",
            r.label, r.round
        );
        for l in &r.layers {
            println!("  {}", vmm_lab::layers::summary(l));
        }
        if let Some(info) = &r.image_info {
            println!("vmm-img info of its data disk:");
            for line in info.lines() {
                println!("  {line}");
            }
        }
    }
}

/// Mean IOPS of one job direction over the rounds of one variant.
pub(super) fn mean_iops(reports: &[BenchReport], job: &str, dir: &str) -> Option<f64> {
    let v: Vec<f64> = reports.iter().filter_map(|r| r.iops(job, dir)).collect();
    (v.len() == reports.len() && !v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Lowest and highest of several figures, when there are several.
pub(super) fn range(v: &[f64]) -> Option<(f64, f64)> {
    (v.len() > 1).then(|| {
        (
            v.iter().copied().fold(f64::INFINITY, f64::min),
            v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        )
    })
}

/// One row of vmm against the QEMU configurations.
#[derive(Debug, PartialEq)]
pub(super) struct CompareRow {
    pub(super) job: String,
    pub(super) dir: String,
    /// Mean IOPS over the rounds: vmm's, and each QEMU's (None: it has no such row).
    pub(super) vmm: f64,
    pub(super) qemu: Vec<Option<f64>>,
    /// vmm over the better QEMU (the one with more mean IOPS on this row).
    pub(super) to_better: Option<f64>,
    /// vmm over the better QEMU of each round: lowest and highest.
    pub(super) round_range: Option<(f64, f64)>,
}

pub(super) fn compare_rows(qemus: &[&[BenchReport]], vmm: &[BenchReport]) -> Vec<CompareRow> {
    let Some(v0) = vmm.first() else {
        return Vec::new();
    };
    let mut rows = Vec::new();
    for r in &v0.fio {
        let Some(v) = mean_iops(vmm, &r.job, &r.dir) else {
            continue;
        };
        let qemu: Vec<Option<f64>> = qemus.iter().map(|q| mean_iops(q, &r.job, &r.dir)).collect();
        let better = qemu
            .iter()
            .flatten()
            .copied()
            .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
        let per_round: Vec<f64> = vmm
            .iter()
            .enumerate()
            .filter_map(|(k, rep)| {
                let best = qemus
                    .iter()
                    .filter_map(|q| q.get(k)?.iops(&r.job, &r.dir))
                    .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))))?;
                Some(rep.iops(&r.job, &r.dir)? / best)
            })
            .collect();
        rows.push(CompareRow {
            job: r.job.clone(),
            dir: r.dir.clone(),
            vmm: v,
            qemu,
            to_better: better.map(|b| v / b),
            round_range: range(&per_round),
        });
    }
    rows
}

/// Median wall time to init over the boot-only boots, or over the fio boots with --boots 0.
pub(super) fn boots_median(r: &[BenchReport]) -> f64 {
    let boots: Vec<f64> = r
        .iter()
        .flat_map(|r| r.boot_wall_to_init_ms.iter().copied())
        .collect();
    if boots.is_empty() {
        median(r.iter().filter_map(|r| r.fio_wall_to_init_ms).collect())
    } else {
        median(boots)
    }
}

pub(super) fn print_compare(qemus: &[&[BenchReport]], vmm: &[BenchReport], rows: &[CompareRow]) {
    let Some(v0) = vmm.first() else {
        return;
    };
    let labels: Vec<&str> = qemus.iter().map(|q| q[0].label.as_str()).collect();
    println!();
    println!(
        "vmm against QEMU ({}), same lab session, {} round(s) (above 1.00: vmm faster for \
         IOPS, slower for boot; \"better\": the QEMU with more IOPS on the row)",
        labels.join(", "),
        v0.round.max(vmm.len())
    );
    let vb = boots_median(vmm);
    let boots: Vec<String> = qemus
        .iter()
        .map(|q| {
            let b = boots_median(q);
            format!(
                "{} {b:.0} ms (vmm/{} {:.2})",
                q[0].label,
                q[0].label,
                vb / b
            )
        })
        .collect();
    println!(
        "boot to init (wall, median): vmm {vb:.0} ms; {}",
        boots.join("; ")
    );
    let mut head = format!("{:<20} {:<5} {:>9}", "job", "dir", "vmm IOPS");
    for l in &labels {
        head.push_str(&format!(
            " {:>w$}",
            format!("{l} IOPS"),
            w = l.len().max(4) + 5
        ));
    }
    for l in &labels {
        head.push_str(&format!(" {:>w$}", format!("vmm/{l}"), w = l.len() + 4));
    }
    if labels.len() > 1 {
        head.push_str(&format!(" {:>10}", "vmm/better"));
    }
    head.push_str(&format!(" {:>12}", "round range"));
    println!("{head}");
    for r in rows {
        let mut line = format!("{:<20} {:<5} {:>9.0}", r.job, r.dir, r.vmm);
        for (l, q) in labels.iter().zip(&r.qemu) {
            let w = l.len().max(4) + 5;
            match q {
                Some(q) => line.push_str(&format!(" {q:>w$.0}")),
                None => line.push_str(&format!(" {:>w$}", "-")),
            }
        }
        for (l, q) in labels.iter().zip(&r.qemu) {
            let w = l.len() + 4;
            match q {
                Some(q) => line.push_str(&format!(" {:>w$.2}", r.vmm / q)),
                None => line.push_str(&format!(" {:>w$}", "-")),
            }
        }
        if labels.len() > 1 {
            match r.to_better {
                Some(b) => line.push_str(&format!(" {b:>10.2}")),
                None => line.push_str(&format!(" {:>10}", "-")),
            }
        }
        let range = r
            .round_range
            .map(|(lo, hi)| format!("{lo:.2}..{hi:.2}"))
            .unwrap_or_default();
        line.push_str(&format!(" {range:>12}"));
        println!("{line}");
    }
}

/// CPU per I/O, per job and variant, means over the rounds: fio's own in the guest, the
/// VMM process's while the job ran, and the share of the machine's CPUs busy meanwhile.
pub(super) fn print_cpu_compare(runs: &[Vec<BenchReport>], jobs: &[String]) {
    let mean = |v: Vec<f64>| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    println!();
    println!(
        "CPU per I/O in microseconds, means over the rounds: guest = fio's own user+system \
         time in the guest; VMM = the VMM process's (every thread, guest mode included) \
         while the job ran; busy = the lab's CPUs busy meanwhile (all of them: 100%); exits = \
         KVM's VM exits per I/O"
    );
    let mut head = format!("{:<20}", "job");
    for r in runs {
        head.push_str(&format!(" | {:<w$}", r[0].label, w = 26));
    }
    println!("{head}");
    let mut sub = format!("{:<20}", "");
    for _ in runs {
        sub.push_str(&format!(
            " | {:>6} {:>7} {:>5} {:>5}",
            "guest", "VMM", "busy", "exits"
        ));
    }
    println!("{sub}");
    for job in jobs {
        let mut line = format!("{job:<20}");
        for r in runs {
            let guest = mean(
                r.iter()
                    .filter_map(|rep| rep.fio_cpu.iter().find(|c| &c.job == job))
                    .filter(|c| c.ios > 0.0)
                    .map(|c| {
                        let (u, s) = c.cpu_s();
                        (u + s) / c.ios * 1e6
                    })
                    .collect(),
            );
            let per: Vec<(f64, f64, f64)> =
                r.iter().filter_map(|rep| rep.job_cpu_per_io(job)).collect();
            let vmm = mean(per.iter().map(|p| p.0).collect());
            let busy = mean(per.iter().map(|p| p.1).collect());
            let exits = mean(per.iter().map(|p| p.2).filter(|e| e.is_finite()).collect());
            let f = |v: Option<f64>, w: usize, p: usize| match v {
                Some(v) => format!("{v:>w$.p$}"),
                None => format!("{:>w$}", "-"),
            };
            line.push_str(&format!(
                " | {} {} {}% {}",
                f(guest, 6, 1),
                f(vmm, 7, 1),
                f(busy, 4, 0),
                f(exits, 5, 1)
            ));
        }
        println!("{line}");
    }
}

pub(super) fn write_compare_chart(
    path: &Path,
    labels: &[String],
    rows: &[CompareRow],
    a: &BenchArgs,
) -> Result<()> {
    let names: Vec<String> = rows
        .iter()
        .map(|r| format!("{} {}", r.job, r.dir))
        .collect();
    let series: Vec<chart::Series> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| chart::Series {
            name: format!("vmm / {l} ({})", qemu_words(l)),
            values: rows
                .iter()
                .map(|r| r.qemu.get(i).copied().flatten().map(|q| r.vmm / q))
                .collect(),
        })
        .collect();
    let title = format!(
        "vmm IOPS / QEMU IOPS, {} vCPU, {} round(s), fio {} s per job",
        a.opts.vcpus, a.rounds, a.opts.fio_runtime
    );
    chart::write_ratio_chart(path, &title, "vmm IOPS / QEMU IOPS", &names, &series, 1.0)
}

/// How a QEMU configuration's data disk is set up, in words for the chart's legend.
pub(super) fn qemu_words(label: &str) -> &'static str {
    if label == Backend::QemuIoUring.name() {
        "aio=io_uring, iothread"
    } else {
        "aio=threads"
    }
}

/// `new` against `base`, same lab session: boot time and IOPS ratios, with the lowest and
/// highest ratio of a single round when there were several.
/// One row of a variant against a base variant of the same session.
#[derive(Debug, PartialEq)]
pub(super) struct RatioRow {
    pub(super) job: String,
    pub(super) dir: String,
    /// Mean IOPS of each over the rounds where both have the row.
    pub(super) new_iops: f64,
    pub(super) base_iops: f64,
    /// Lowest and highest ratio of a single round, with two rounds or more.
    pub(super) range: Option<(f64, f64)>,
    /// The rounds where both have the row, of all the rounds.
    pub(super) rounds: usize,
}

/// `new` against `base`, job by job, round by round: a round where either failed (a guest
/// that hung, say) is left out of that row's means, and the row says how many it has.
pub(super) fn ratio_rows(base: &[BenchReport], new: &[BenchReport]) -> Vec<RatioRow> {
    let mut out: Vec<RatioRow> = Vec::new();
    let jobs = new.iter().chain(base).flat_map(|r| &r.fio);
    for f in jobs {
        if out.iter().any(|o| o.job == f.job && o.dir == f.dir) {
            continue;
        }
        let pairs: Vec<(f64, f64)> = new
            .iter()
            .zip(base)
            .filter_map(|(n, b)| Some((n.iops(&f.job, &f.dir)?, b.iops(&f.job, &f.dir)?)))
            .collect();
        if pairs.is_empty() {
            continue;
        }
        let count = pairs.len() as f64;
        let per_round: Vec<f64> = pairs.iter().map(|(n, b)| n / b).collect();
        out.push(RatioRow {
            job: f.job.clone(),
            dir: f.dir.clone(),
            new_iops: pairs.iter().map(|p| p.0).sum::<f64>() / count,
            base_iops: pairs.iter().map(|p| p.1).sum::<f64>() / count,
            range: range(&per_round),
            rounds: pairs.len(),
        });
    }
    out
}

pub(super) fn print_ratios(title: &str, base: &[BenchReport], new: &[BenchReport]) {
    let (Some(b0), Some(n0)) = (base.first(), new.first()) else {
        return;
    };
    let (bb, nb) = (boots_median(base), boots_median(new));
    println!();
    println!(
        "{title}, same lab session, {} round(s) (above 1.00: faster for IOPS, slower for boot)",
        base.len()
    );
    println!(
        "boot to init (wall, median): {} {nb:.0} ms, {} {bb:.0} ms, ratio {:.2}",
        n0.label,
        b0.label,
        nb / bb
    );
    println!(
        "{:<20} {:<5} {:>18} {:>18} {:>7} {:>12}",
        "job",
        "dir",
        format!("{} IOPS", n0.label),
        format!("{} IOPS", b0.label),
        "ratio",
        "round range"
    );
    let all = new.len().min(base.len());
    for r in ratio_rows(base, new) {
        let range = r
            .range
            .map(|(lo, hi)| format!("{lo:.2}..{hi:.2}"))
            .unwrap_or_default();
        let partial = if r.rounds < all {
            format!(" ({} of {all} rounds)", r.rounds)
        } else {
            String::new()
        };
        println!(
            "{:<20} {:<5} {:>18.0} {:>18.0} {:>7.2} {:>12}{partial}",
            r.job,
            r.dir,
            r.new_iops,
            r.base_iops,
            r.new_iops / r.base_iops,
            range
        );
    }
}

/// Prints the VMM process's CPU over a stretch of a run, by thread, and the machine's.
pub(super) fn print_cpu(what: &str, process: &str, c: &cpu::ProcessCpu, iops: f64) {
    let ios = iops * c.wall_s;
    let per_io = if ios > 0.0 {
        format!(" = {:.1} us per I/O", c.total_s() / ios * 1e6)
    } else {
        String::new()
    };
    println!(
        "cpu {what}: {:.1} s, the lab's {} CPUs {:.0}% busy ({:.0}% in their kernel); \
         {process} {:.2} s (user {:.2}, system {:.2}){per_io}",
        c.wall_s,
        c.cpus,
        c.machine_busy_pct(),
        c.machine_kernel_pct(),
        c.total_s(),
        c.user_s,
        c.sys_s
    );
    for t in &c.threads {
        if t.user_s + t.sys_s + t.guest_s < 0.005 {
            continue;
        }
        println!(
            "    {:<16} x{:<3} guest {:>6.2} s  system {:>6.2} s  user {:>6.2} s",
            t.name, t.count, t.guest_s, t.sys_s, t.user_s
        );
    }
    if !c.kvm.is_empty() && ios > 0.0 {
        let k = |name: &str| c.kvm.get(name).copied().unwrap_or(0.0) / ios;
        println!(
            "    KVM per I/O: {:.2} exits (mmio {:.2}, io {:.2}, irq {:.2}, halt {:.2}), {:.2} \
             interrupts injected, {:.2} shadow page faults fixed, {:.2} guest page faults, \
             {:.2} instructions emulated",
            k("exits"),
            k("mmio_exits"),
            k("io_exits"),
            k("irq_exits"),
            k("halt_exits"),
            k("irq_injections"),
            k("pf_fixed"),
            k("pf_guest"),
            k("insn_emulation")
        );
    }
    if iops > 0.0 && c.total_s() < 0.3 * c.wall_s {
        println!(
            "    (under 30% of a CPU: the job's end marker may have come late on the guest's \
             console, so this window may have missed the job)"
        );
    }
    if c.unsampled_s.abs() >= 0.005 {
        println!(
            "    not sampled (threads' last 250 ms, short-lived threads): {:.2} s",
            c.unsampled_s
        );
    }
}
