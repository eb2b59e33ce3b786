//! `lab bench`: fio jobs in guests under each variant (QEMU, vmm, vmm through interceptor
//! chains or with block options), rounds in alternating order, the VMMs' CPU per job, and
//! the comparison tables, ratios and chart.

use super::*;

mod report;
use report::*;
fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The VMM's CPU while one fio job ran.
#[derive(serde::Serialize)]
struct JobCpu {
    job: String,
    /// The window measured: from `runtime` seconds before the guest's marker that the job
    /// ended (`fio-begin`, printed once fio exits) to `JOB_TAIL` before it.
    cpu: cpu::ProcessCpu,
}

/// The end of a job's window before its end marker arrives: fio's report and exit, and the
/// marker's way out, are not I/O.
const JOB_TAIL: Duration = Duration::from_millis(500);

#[derive(serde::Serialize)]
struct BenchReport {
    /// What ran: `qemu`, `qemu-io_uring`, `vmm`, or `vmm+interceptors`.
    label: String,
    /// Which round of `--rounds` this run was, from 1.
    round: usize,
    backend: Backend,
    /// The `--interceptors` file stacked on the data disk, if any.
    interceptors: Option<PathBuf>,
    rootfs: RootFs,
    vcpus: u32,
    mem_mib: u32,
    num_queues: Option<u16>,
    boot_wall_to_init_ms: Vec<f64>,
    boot_uptime_at_init_s: Vec<f64>,
    median_wall_to_init_ms: f64,
    median_uptime_at_init_s: f64,
    fio_runtime_s: u32,
    fio: Vec<fio::FioRow>,
    /// Wall time to init of the fio boot (the boot figure when --boots is 0).
    fio_wall_to_init_ms: Option<f64>,
    /// fio's own CPU use in the guest, per job.
    fio_cpu: Vec<cpu::FioCpu>,
    /// The VMM process's CPU over the whole fio boot.
    fio_boot_cpu: cpu::ProcessCpu,
    /// The VMM process's and the machine's CPU while each job ran.
    job_cpu: Vec<JobCpu>,
    /// Each interceptor's stats when the fio boot's vmm exited.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    layers: Vec<vmm_lab::layers::LayerStats>,
    /// What `vmm-img info` said of the data disk after the fio boot (with interceptors).
    #[serde(skip_serializing_if = "Option::is_none")]
    image_info: Option<String>,
}

impl BenchReport {
    fn iops(&self, job: &str, dir: &str) -> Option<f64> {
        self.fio
            .iter()
            .find(|p| p.job == job && p.dir == dir)
            .map(|p| p.iops)
    }

    /// The VMM's CPU per I/O of `job` in microseconds, the machine's CPUs busy meanwhile
    /// (percent), and KVM's exits per I/O (NaN without KVM's counters).
    fn job_cpu_per_io(&self, job: &str) -> Option<(f64, f64, f64)> {
        let c = &self.job_cpu.iter().find(|c| c.job == job)?.cpu;
        let iops: f64 = self
            .fio
            .iter()
            .filter(|r| r.job == job)
            .map(|r| r.iops)
            .sum();
        let ios = iops * c.wall_s;
        let exits = c.kvm.get("exits").map_or(f64::NAN, |e| e / ios);
        (ios > 0.0).then(|| (c.total_s() / ios * 1e6, c.machine_busy_pct(), exits))
    }
}

/// The configurations a bench runs, in order, each with its label.
pub(super) fn bench_variants(a: &BenchArgs) -> Result<Vec<(String, GuestOpts)>> {
    let with = |backend: Backend, chain: Option<&Path>| {
        let mut o = a.opts.clone();
        o.backend = backend;
        o.interceptors = chain.map(Path::to_path_buf);
        if backend.is_qemu() {
            // vmm's settings; QEMU has none of them.
            o.block_options.clear();
        }
        o
    };
    if !a.compare {
        if !a.also_interceptors.is_empty()
            || !a.also_block_options.is_empty()
            || !a.also_vmm_binaries.is_empty()
        {
            bail!("--also-interceptors, --also-block-option and --also-vmm-binary need --compare");
        }
        if a.chart.is_some() {
            bail!("--chart needs --compare");
        }
        if a.qemu_aio != [QemuAio::Threads] {
            bail!("--qemu-aio needs --compare (one QEMU alone: --backend qemu-io_uring)");
        }
        let label = match (&a.opts.interceptors, a.opts.backend) {
            (Some(_), b) => format!("{}+interceptors", b.name()),
            (None, b) => b.name().to_string(),
        };
        return Ok(vec![(label, a.opts.clone())]);
    }
    let mut v: Vec<(String, GuestOpts)> = Vec::new();
    for q in &a.qemu_aio {
        let b = q.backend();
        if !v.iter().any(|(_, o)| o.backend == b) {
            v.push((b.name().to_string(), with(b, None)));
        }
    }
    v.push(("vmm".to_string(), with(Backend::Vmm, None)));
    if let Some(chain) = &a.opts.interceptors {
        v.push((
            "vmm+interceptors".to_string(),
            with(Backend::Vmm, Some(chain)),
        ));
    }
    for chain in &a.also_interceptors {
        let stem = chain.file_stem().unwrap_or_default().to_string_lossy();
        v.push((format!("vmm+{stem}"), with(Backend::Vmm, Some(chain))));
    }
    // Each setting again for every vmm variant so far: plain, and each interceptor file.
    let vmms: Vec<(String, GuestOpts)> = v
        .iter()
        .filter(|(_, o)| o.backend == Backend::Vmm)
        .cloned()
        .collect();
    for (k, val) in &a.also_block_options {
        for (label, o) in &vmms {
            let mut o = o.clone();
            o.block_options.retain(|(ok, _)| ok != k);
            o.block_options.push((k.clone(), val.clone()));
            v.push((format!("{label}[{k}={val}]"), o));
        }
    }
    for (name, binary) in &a.also_vmm_binaries {
        let own: Vec<(String, GuestOpts)> = v
            .iter()
            .filter(|(l, o)| o.backend == Backend::Vmm && !l.contains('@'))
            .map(|(l, o)| {
                let mut o = o.clone();
                o.vmm_binary = Some(binary.clone());
                (format!("{l}@{name}"), o)
            })
            .collect();
        v.extend(own);
    }
    Ok(v)
}

/// The fio jobs of `--jobs`, with `all` read from benches/fio/all.list.
fn job_list(jobs: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for j in jobs.split(',').map(str::trim).filter(|j| !j.is_empty()) {
        if j == "all" {
            let path = paths::repo_root().join("benches/fio/all.list");
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            out.extend(text.split_whitespace().map(String::from));
        } else {
            out.push(j.to_string());
        }
    }
    if out.is_empty() {
        bail!("--jobs names no fio job");
    }
    Ok(out)
}

/// The order of the variants in round `round` (from 0): forward, then reversed, and so on.
fn round_order(n: usize, round: usize) -> Vec<usize> {
    if round.is_multiple_of(2) {
        (0..n).collect()
    } else {
        (0..n).rev().collect()
    }
}

pub(super) fn cmd_bench(a: BenchArgs) -> Result<i32> {
    if a.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let variants = bench_variants(&a)?;
    let jobs = job_list(&a.jobs)?;
    // runs[variant][round]
    let mut runs: Vec<Vec<BenchReport>> = variants.iter().map(|_| Vec::new()).collect();
    let mut code = 0;
    for round in 0..a.rounds {
        for i in round_order(variants.len(), round) {
            let (label, opts) = &variants[i];
            if a.rounds > 1 {
                println!();
                println!("== round {}/{}: {label}", round + 1, a.rounds);
            }
            let (report, ok) = bench_one(&a, &jobs, label, opts, round + 1)?;
            if !ok {
                code = 1;
            }
            runs[i].push(report);
        }
    }
    let mut compared = None;
    if a.compare {
        let qemus: Vec<&[BenchReport]> = variants
            .iter()
            .zip(&runs)
            .filter(|((_, o), _)| o.backend.is_qemu())
            .map(|(_, r)| r.as_slice())
            .collect();
        let vmm_at = variants
            .iter()
            .position(|(l, _)| l == "vmm")
            .context("--compare without a plain vmm variant")?;
        let vmm = &runs[vmm_at];
        let rows = compare_rows(&qemus, vmm);
        print_compare(&qemus, vmm, &rows);
        for r in &runs[vmm_at + 1..] {
            print_ratios(&format!("{} / vmm", r[0].label), vmm, r);
            // A variant of another binary is also compared with that binary's plain vmm.
            let Some((_, name)) = r[0].label.split_once('@') else {
                continue;
            };
            let base = format!("vmm@{name}");
            if r[0].label != base {
                if let Some(b) = variants.iter().position(|(l, _)| *l == base) {
                    print_ratios(&format!("{} / {base}", r[0].label), &runs[b], r);
                }
            }
        }
        print_cpu_compare(&runs, &jobs);
        print_layers(&runs);
        let labels: Vec<String> = qemus.iter().map(|q| q[0].label.clone()).collect();
        compared = Some((labels, rows));
    }
    write_json(&a.json, &runs.iter().flatten().collect::<Vec<_>>())?;
    if let Some((labels, rows)) = compared {
        let path = a
            .chart
            .clone()
            .unwrap_or_else(|| paths::build_dir().join("bench/vmm-vs-qemu.svg"));
        match write_compare_chart(&path, &labels, &rows, &a) {
            Ok(()) => println!("chart: {}", path.display()),
            Err(e) => {
                eprintln!("lab: error: the chart: {e:#}");
                code = 1;
            }
        }
    }
    Ok(code)
}

/// A guest console line, as `guest::boot` prints it, saying that a fio job has ended.
fn is_fio_end_marker(line: &str) -> bool {
    line.contains(vmm_lab::console::GUEST_MARKER) && line.contains(" fio-begin job=")
}

/// Boots and fio for one configuration; everything about the guest comes from `opts`.
fn bench_one(
    a: &BenchArgs,
    jobs: &[String],
    label: &str,
    opts: &GuestOpts,
    round: usize,
) -> Result<(BenchReport, bool)> {
    let scratch = Scratch::new("bench")?;
    let (mut walls, mut uptimes) = (Vec::new(), Vec::new());
    for i in 1..=a.boots {
        let spec = spec_for(opts, "boot", &scratch)?;
        let run = guest::boot(&spec)?;
        if !run.ok() {
            print_problems(&run);
            bail!("{label}: boot {i} failed");
        }
        let wall = run.wall_to_init_ms.unwrap_or(f64::NAN);
        let up = run.console.init_uptime_s.unwrap_or(f64::NAN);
        eprintln!(
            "lab: {label} boot {i}/{}: init after {wall:.0} ms wall, guest uptime {up:.2} s",
            a.boots
        );
        walls.push(wall);
        uptimes.push(up);
    }
    let jobs = jobs.join(",");
    let spec = spec_for(opts, &format!("fio={jobs}"), &scratch)?;
    eprintln!(
        "lab: {label}: running fio jobs {jobs} ({} s each)",
        opts.fio_runtime
    );
    let tap = cpu::StderrTap::start(is_fio_end_marker)?;
    let sampler = cpu::Sampler::start();
    let run = guest::boot(&spec);
    let (whole, trace) = sampler.finish();
    let marks = tap.finish();
    let run = run?;
    if run.backend != opts.backend {
        bail!("{label}: fio ran under {} instead", run.backend.name());
    }
    let runtime = Duration::from_secs(opts.fio_runtime.into());
    let length = runtime.saturating_sub(JOB_TAIL).max(JOB_TAIL);
    let job_cpu = marks
        .iter()
        .filter_map(|(at, line)| {
            let rest = &line[line.find(vmm_lab::console::GUEST_MARKER)?..];
            let job = vmm_lab::console::field(rest, "job")?;
            let to = at.checked_sub(JOB_TAIL)?;
            Some(JobCpu {
                job: job.to_string(),
                cpu: trace.window(to.checked_sub(length)?, to),
            })
        })
        .collect();
    let fio_cpu = run
        .console
        .fio
        .iter()
        .filter_map(|block| match cpu::fio_cpu(&block.job, &block.json) {
            Ok(c) => Some(c),
            // A bad JSON is already one of the run's problems (guest::judge).
            Err(e) => {
                eprintln!("lab: {label}: no CPU figures for {}: {e:#}", block.job);
                None
            }
        })
        .collect();
    let image_info = match (&opts.interceptors, spec.data_disks.first()) {
        (Some(chain), Some(disk)) if opts.backend == Backend::Vmm => {
            Some(vmm_lab::layers::image_info(&disk.path, chain))
        }
        _ => None,
    };
    let report = BenchReport {
        layers: vmm_lab::layers::from_transcript(&run.transcript),
        image_info,
        label: label.to_string(),
        round,
        backend: opts.backend,
        interceptors: opts.interceptors.clone(),
        rootfs: opts.rootfs,
        vcpus: opts.vcpus,
        mem_mib: opts.mem_mib,
        num_queues: opts.num_queues,
        median_wall_to_init_ms: median(walls.clone()),
        median_uptime_at_init_s: median(uptimes.clone()),
        boot_wall_to_init_ms: walls,
        boot_uptime_at_init_s: uptimes,
        fio_runtime_s: opts.fio_runtime,
        fio: run.fio.clone(),
        fio_wall_to_init_ms: run.wall_to_init_ms,
        fio_cpu,
        fio_boot_cpu: whole,
        job_cpu,
    };
    println!();
    println!(
        "{label}: {} vCPU, {} MiB, {:?} root; data disk {} MiB raw file on tmpfs{}{}",
        opts.vcpus,
        opts.mem_mib,
        opts.rootfs,
        opts.disk_mib,
        opts.num_queues
            .map(|n| format!(", {n} queues"))
            .unwrap_or_default(),
        opts.interceptors
            .as_ref()
            .map(|p| format!(", interceptors from {}", p.display()))
            .unwrap_or_default()
    );
    if a.boots > 0 {
        println!(
            "boot to init, median of {}: {:.0} ms wall (VMM start to init), guest uptime {:.2} s",
            a.boots, report.median_wall_to_init_ms, report.median_uptime_at_init_s
        );
    } else {
        println!(
            "boot to init of the fio boot: {:.0} ms wall (VMM start to init)",
            report.fio_wall_to_init_ms.unwrap_or(f64::NAN)
        );
    }
    print!("{}", fio::render_table(&report.fio));
    let process = if opts.backend.is_qemu() {
        "qemu"
    } else {
        "vmm"
    };
    for c in &report.fio_cpu {
        let (u, s) = c.cpu_s();
        println!(
            "guest cpu {}: fio {:.0}% user + {:.0}% system of a CPU, {:.1} us per I/O, {:.0} \
             context switches",
            c.job,
            c.usr_pct,
            c.sys_pct,
            if c.ios > 0.0 {
                (u + s) / c.ios * 1e6
            } else {
                f64::NAN
            },
            c.ctx
        );
        if let Some(j) = report.job_cpu.iter().find(|j| j.job == c.job) {
            let iops = report
                .fio
                .iter()
                .filter(|r| r.job == c.job)
                .map(|r| r.iops)
                .sum();
            print_cpu(
                &format!("{} (last {:.1} s)", c.job, j.cpu.wall_s),
                process,
                &j.cpu,
                iops,
            );
        }
    }
    print_cpu("the whole fio boot", process, &report.fio_boot_cpu, 0.0);
    for line in run
        .transcript
        .lines()
        .filter(|l| l.contains("vmm: interceptor "))
    {
        println!("{}", line.trim_start_matches("guest| "));
    }
    print_problems(&run);
    Ok((report, run.ok()))
}

#[cfg(test)]
mod tests;
