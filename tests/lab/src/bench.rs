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
mod tests {
    use super::*;

    fn bench_args(argv: &[&str]) -> BenchArgs {
        let cli = Cli::try_parse_from(["lab", "bench"].iter().chain(argv)).unwrap();
        match cli.cmd {
            Cmd::Bench(a) => a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn rounds_alternate_the_order_of_the_variants() {
        assert_eq!(round_order(3, 0), [0, 1, 2]);
        assert_eq!(round_order(3, 1), [2, 1, 0]);
        assert_eq!(round_order(3, 2), [0, 1, 2]);
    }

    #[test]
    fn compare_runs_qemu_vmm_and_each_interceptor_file_on_vmm() {
        let a = bench_args(&[
            "--compare",
            "--interceptors",
            "x/demo.toml",
            "--also-interceptors",
            "y/count.toml",
        ]);
        let v = bench_variants(&a).unwrap();
        let labels: Vec<&str> = v.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(labels, ["qemu", "vmm", "vmm+interceptors", "vmm+count"]);
        assert_eq!(v[0].1.backend, Backend::Qemu);
        assert!(v[..2].iter().all(|(_, o)| o.interceptors.is_none()));
        assert!(v[2..].iter().all(|(_, o)| o.backend == Backend::Vmm));
        assert_eq!(
            v[3].1.interceptors.as_deref(),
            Some("y/count.toml".as_ref())
        );
        assert!(bench_variants(&bench_args(&["--also-interceptors", "y.toml"])).is_err());
    }

    #[test]
    fn compare_runs_vmm_again_with_each_block_option() {
        let a = bench_args(&[
            "--compare",
            "--block-option",
            "coalesce_us=0",
            "--also-block-option",
            "coalesce_us=200",
        ]);
        let v = bench_variants(&a).unwrap();
        let labels: Vec<&str> = v.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(labels, ["qemu", "vmm", "vmm[coalesce_us=200]"]);
        let opt = |s: &str| (s.to_string(), "200".to_string());
        assert_eq!(
            v[1].1.block_options,
            [(String::from("coalesce_us"), "0".into())]
        );
        assert_eq!(v[2].1.block_options, [opt("coalesce_us")]);
        assert!(Cli::try_parse_from(["lab", "bench", "--block-option", "Bad=1"]).is_err());
        assert!(Cli::try_parse_from(["lab", "bench", "--block-option", "k=[1"]).is_err());
        assert!(bench_variants(&bench_args(&["--also-block-option", "a=1"])).is_err());
        // With interceptor files, each of their variants runs with the setting too.
        let a = bench_args(&[
            "--compare",
            "--also-interceptors",
            "y/encrypt.toml",
            "--also-block-option",
            "hook_threads=1",
        ]);
        let v = bench_variants(&a).unwrap();
        let labels: Vec<&str> = v.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(
            labels,
            [
                "qemu",
                "vmm",
                "vmm+encrypt",
                "vmm[hook_threads=1]",
                "vmm+encrypt[hook_threads=1]"
            ]
        );
        assert_eq!(
            v[4].1.interceptors.as_deref(),
            Some("y/encrypt.toml".as_ref())
        );
        assert_eq!(
            v[4].1.block_options,
            [(String::from("hook_threads"), "1".into())]
        );
    }

    #[test]
    fn compare_runs_every_vmm_variant_again_with_another_binary() {
        let other = std::env::current_exe().unwrap();
        let arg = format!("old={}", other.display());
        let a = bench_args(&[
            "--compare",
            "--also-interceptors",
            "y/encrypt.toml",
            "--also-vmm-binary",
            &arg,
        ]);
        let v = bench_variants(&a).unwrap();
        let labels: Vec<&str> = v.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(
            labels,
            ["qemu", "vmm", "vmm+encrypt", "vmm@old", "vmm+encrypt@old"]
        );
        assert!(v[..3].iter().all(|(_, o)| o.vmm_binary.is_none()));
        assert!(v[3..]
            .iter()
            .all(|(_, o)| o.vmm_binary.as_deref() == Some(other.as_path())));
        assert_eq!(
            v[4].1.interceptors.as_deref(),
            Some("y/encrypt.toml".as_ref())
        );
        // A binary that is not there, or no name, is refused when the command is read.
        for bad in ["old=/nonexistent/vmm", "=/bin/sh", "a b=/bin/sh", "/bin/sh"] {
            let argv = ["lab", "bench", "--compare", "--also-vmm-binary", bad];
            assert!(Cli::try_parse_from(argv).is_err(), "{bad}");
        }
        assert!(bench_variants(&bench_args(&["--also-vmm-binary", &arg])).is_err());
    }

    #[test]
    fn compare_with_both_qemu_configurations_runs_them_before_vmm() {
        let a = bench_args(&[
            "--compare",
            "--qemu-aio",
            "threads,io_uring",
            "--also-interceptors",
            "y/encrypt.toml",
        ]);
        let v = bench_variants(&a).unwrap();
        let labels: Vec<&str> = v.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(labels, ["qemu", "qemu-io_uring", "vmm", "vmm+encrypt"]);
        let backends: Vec<Backend> = v.iter().map(|(_, o)| o.backend).collect();
        assert_eq!(
            backends,
            [
                Backend::Qemu,
                Backend::QemuIoUring,
                Backend::Vmm,
                Backend::Vmm
            ]
        );
        // io_uring alone, and a name given twice runs once.
        let v = bench_variants(&bench_args(&[
            "--compare",
            "--qemu-aio",
            "io_uring,io_uring",
        ]))
        .unwrap();
        let labels: Vec<&str> = v.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(labels, ["qemu-io_uring", "vmm"]);
        // One QEMU configuration alone is a backend; the compare options need --compare.
        let v = bench_variants(&bench_args(&["--backend", "qemu-io_uring"])).unwrap();
        assert_eq!(v[0].0, "qemu-io_uring");
        assert_eq!(v[0].1.backend, Backend::QemuIoUring);
        assert!(bench_variants(&bench_args(&["--qemu-aio", "io_uring"])).is_err());
        assert!(bench_variants(&bench_args(&["--chart", "x.svg"])).is_err());
        assert!(Cli::try_parse_from(["lab", "bench", "--qemu-aio", "native"]).is_err());
    }

    fn report(label: &str, backend: Backend, rows: &[(&str, f64)]) -> BenchReport {
        BenchReport {
            label: label.into(),
            round: 1,
            backend,
            interceptors: None,
            rootfs: RootFs::Ext4,
            vcpus: 1,
            mem_mib: 512,
            num_queues: None,
            boot_wall_to_init_ms: vec![1000.0],
            boot_uptime_at_init_s: vec![1.0],
            median_wall_to_init_ms: 1000.0,
            median_uptime_at_init_s: 1.0,
            fio_runtime_s: 5,
            fio: rows
                .iter()
                .map(|(job, iops)| fio::FioRow {
                    job: job.to_string(),
                    dir: "read".into(),
                    iops: *iops,
                    mb_s: 0.0,
                    lat_mean_us: 0.0,
                    lat_p99_us: 0.0,
                })
                .collect(),
            fio_wall_to_init_ms: Some(1000.0),
            layers: Vec::new(),
            image_info: None,
            fio_cpu: Vec::new(),
            fio_boot_cpu: cpu::ProcessCpu::default(),
            job_cpu: Vec::new(),
        }
    }

    /// A round where a variant failed (its guest hung: no fio rows) used to empty the whole
    /// ratio table; now each row takes the rounds where both have it and says how many.
    #[test]
    fn a_failed_round_leaves_its_rows_out_of_the_ratios_not_the_table() {
        let vmm = [
            report("vmm", Backend::Vmm, &[("a", 200.0), ("b", 100.0)]),
            report("vmm", Backend::Vmm, &[("a", 400.0), ("b", 100.0)]),
        ];
        let enc = [
            report("vmm+encrypt", Backend::Vmm, &[]),
            report("vmm+encrypt", Backend::Vmm, &[("a", 100.0), ("b", 50.0)]),
        ];
        let rows = ratio_rows(&vmm, &enc);
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].job.as_str(), rows[0].rounds), ("a", 1));
        assert_eq!((rows[0].new_iops, rows[0].base_iops), (100.0, 400.0));
        assert_eq!(rows[0].range, None);
        assert_eq!(rows[1].base_iops, 100.0);
        // With every round there, the means and the range cover them all.
        let enc = [
            report("vmm+encrypt", Backend::Vmm, &[("a", 100.0)]),
            report("vmm+encrypt", Backend::Vmm, &[("a", 100.0)]),
        ];
        let rows = ratio_rows(&vmm, &enc);
        assert_eq!(rows.len(), 1, "a row only one side has gives no ratio");
        assert_eq!((rows[0].rounds, rows[0].base_iops), (2, 300.0));
        assert_eq!(rows[0].range, Some((0.25, 0.5)));
    }

    #[test]
    fn vmm_is_compared_with_the_better_qemu_row_by_row() {
        let q1 = [
            report("qemu", Backend::Qemu, &[("a", 100.0), ("b", 50.0)]),
            report("qemu", Backend::Qemu, &[("a", 300.0), ("b", 50.0)]),
        ];
        let q2 = [
            report(
                "qemu-io_uring",
                Backend::QemuIoUring,
                &[("a", 150.0), ("b", 100.0)],
            ),
            report(
                "qemu-io_uring",
                Backend::QemuIoUring,
                &[("a", 150.0), ("b", 100.0)],
            ),
        ];
        let vmm = [
            report(
                "vmm",
                Backend::Vmm,
                &[("a", 200.0), ("b", 50.0), ("c", 1.0)],
            ),
            report(
                "vmm",
                Backend::Vmm,
                &[("a", 200.0), ("b", 150.0), ("c", 1.0)],
            ),
        ];
        let rows = compare_rows(&[&q1, &q2], &vmm);
        assert_eq!(rows.len(), 3);
        // a: QEMU threads is better on the means (200 against 150).
        assert_eq!(rows[0].qemu, [Some(200.0), Some(150.0)]);
        assert_eq!(rows[0].to_better, Some(1.0));
        let (lo, hi) = rows[0].round_range.unwrap();
        assert!((lo - 200.0 / 300.0).abs() < 1e-9 && (hi - 200.0 / 150.0).abs() < 1e-9);
        // b: io_uring is better (100 against 50); vmm's mean is 100.
        assert_eq!(rows[1].vmm, 100.0);
        assert_eq!(rows[1].to_better, Some(1.0));
        assert_eq!(rows[1].round_range, Some((0.5, 1.5)));
        // c: no QEMU ran it.
        assert_eq!(rows[2].qemu, [None, None]);
        assert_eq!(rows[2].to_better, None);
        // The chart of it names every row.
        let dir = Scratch::new("compare-chart-test").unwrap();
        let path = dir.path().join("c.svg");
        let a = bench_args(&["--compare", "--qemu-aio", "threads,io_uring"]);
        let labels = ["qemu".to_string(), "qemu-io_uring".to_string()];
        write_compare_chart(&path, &labels, &rows, &a).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        for name in [
            "a read",
            "b read",
            "c read",
            "vmm / qemu-io_uring (aio=io_uring, iothread)",
        ] {
            assert!(svg.contains(&format!("\n{name}\n")), "{name}");
        }
    }

    #[test]
    fn all_in_the_job_list_is_the_fio_set() {
        let jobs = job_list("all,randrw-4k-2jobs").unwrap();
        assert_eq!(jobs.first().map(String::as_str), Some("randread-4k-qd1"));
        assert_eq!(jobs.last().map(String::as_str), Some("randrw-4k-2jobs"));
        assert!(jobs.len() >= 3, "{jobs:?}");
        assert_eq!(job_list(" x , y ").unwrap(), ["x", "y"]);
        assert!(job_list(",").is_err());
    }
}
