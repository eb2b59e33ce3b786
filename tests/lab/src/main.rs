//! `lab`: run real guests under real KVM, directly on a host with hardware KVM or inside
//! the nested lab VM otherwise.
//!
//!   lab detect                       which mode this host needs, and why
//!   lab exec -- CMD ARGS..           run a command inside the lab VM
//!   lab guest --task "selftest"      boot the guest once and check its report
//!   lab bench                        boot time (median of N) and the fio table

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::time::Duration;
use vmm_lab::detect::{self, KvmMode};
use vmm_lab::fio;
use vmm_lab::guest::{self, Backend, DataDisk, GuestRun, GuestSpec, RootFs, Scratch};
use vmm_lab::labvm::{self, LabOptions};
use vmm_lab::paths;

#[derive(Parser, Debug)]
#[command(about = "Run real guests under real KVM (directly or inside the nested lab VM)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Print whether this host has usable hardware KVM or needs the lab VM.
    Detect,
    /// Run a command inside the lab VM and exit with its status.
    Exec(ExecArgs),
    /// Boot the guest once with a task and check what it reports.
    Guest(GuestArgs),
    /// Measure boot time to init (median of N boots) and run the fio jobs.
    Bench(BenchArgs),
}

#[derive(Args, Debug, Clone)]
struct LabArgs {
    /// Lab VM time limit in seconds.
    #[arg(long, default_value_t = 1800)]
    lab_timeout: u64,
    /// Lab VM memory in MiB (its tmpfs for disk images takes up to 75% of it).
    #[arg(long, default_value_t = 4096)]
    lab_mem_mib: u32,
}

#[derive(Args, Debug)]
struct ExecArgs {
    #[command(flatten)]
    lab: LabArgs,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, required = true)]
    command: Vec<String>,
}

#[derive(Args, Debug, Clone)]
struct GuestOpts {
    /// The VMM that runs the guest.
    #[arg(long, value_enum, default_value = "qemu")]
    backend: Backend,
    #[arg(long, value_enum, default_value = "ext4")]
    rootfs: RootFs,
    /// Guest vCPUs. In the lab, I/O load on a guest with 2 vCPUs can crash the emulated
    /// SVM stack (docs/lab.md), so the default is 1.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    #[arg(long, default_value_t = 512)]
    mem_mib: u32,
    /// Size of the (fresh, sparse) data disk in MiB.
    #[arg(long, default_value_t = 1024)]
    disk_mib: u64,
    /// Use this image file as a data disk instead of a fresh one (repeatable, in order;
    /// append `:ro` for a read-only disk).
    #[arg(long = "data-disk")]
    data_disks: Vec<String>,
    /// Seconds each timed fio job runs (after 1 s of ramp).
    #[arg(long, default_value_t = 5)]
    fio_runtime: u32,
    /// Print the guest's console as it comes (stderr, prefixed `guest| `).
    #[arg(long)]
    show_console: bool,
    /// Boot the ELF vmlinux instead of the bzImage (vmm backend).
    #[arg(long)]
    elf_kernel: bool,
    /// A TOML file of `[[interceptor]]` entries to stack, in file order, on the first data
    /// disk (vmm backend).
    #[arg(long)]
    interceptors: Option<std::path::PathBuf>,
    /// Steps for a client of the vmm's REST API to run beside the guest (vmm backend), e.g.
    /// `garbage:1000; toggle:enc,cache:20` (see tests/lab/src/control.rs).
    #[arg(long)]
    control: Option<String>,
    /// Guest time limit in seconds, per boot.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// vmm's block I/O engine for every disk: `auto`, `io_uring` or `sync` (vmm backend;
    /// unset: vmm's default, `auto`).
    #[arg(long)]
    engine: Option<String>,
    /// Queues of the data disks (unset: each VMM's default).
    #[arg(long)]
    num_queues: Option<u16>,
    #[command(flatten)]
    lab: LabArgs,
}

#[derive(Args, Debug)]
struct GuestArgs {
    /// The guest's task, words in the order to run them: `selftest`, `fio=JOB[,JOB..]` (or
    /// `fio=all`), `boot`, `shell`, `hostcheck` (write a pattern at block B+1000 of the data
    /// disk, report the sha256 at B+2000; B is `hostcheck.base=`), `readcheck=N[,N..]` (read
    /// 4 KiB blocks, report each one's sha256 or EIO), `rocheck=/dev/vdX` (try to write a
    /// read-only disk), `rebind` (unbind and rebind the data disk's driver through sysfs),
    /// `stamp` (write numbered blocks until stopped), `queues` (how many request queues the
    /// data disk has). guest-kernel/rootfs/init has them all.
    #[arg(long, default_value = "selftest")]
    task: String,
    /// Write the run's report as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    #[command(flatten)]
    opts: GuestOpts,
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// Boots measured for the boot time (the median is reported).
    #[arg(long, default_value_t = 5)]
    boots: usize,
    /// fio jobs to run (names from benches/fio, comma-separated), or `all`.
    #[arg(long, default_value = "all")]
    jobs: String,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Run QEMU and our vmm side by side in this session and print vmm/QEMU ratios
    /// (ignores --backend); with --interceptors, also vmm with them, and its ratios to vmm
    /// without.
    #[arg(long)]
    compare: bool,
    /// With --compare: another interceptor file to run as its own vmm variant, named after
    /// the file (repeatable).
    #[arg(long = "also-interceptors")]
    also_interceptors: Vec<std::path::PathBuf>,
    /// Run the variants this many times, in alternating order (forward, then reversed), so
    /// that an effect of running first or last in the lab session does not pass for a
    /// difference between them; figures are means over the rounds.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    #[command(flatten)]
    opts: GuestOpts,
}

fn main() {
    let cli = Cli::parse();
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lab: error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> Result<i32> {
    match cli.cmd {
        Cmd::Detect => {
            let d = detect::detect();
            println!("{} ({})", d.mode, d.reason);
            Ok(0)
        }
        Cmd::Exec(a) => {
            let out = labvm::run_in_lab(&a.command, &forwarded_env(), &lab_options(&a.lab))?;
            eprintln!(
                "lab: command exited {} after {:.1} s (lab ready at {:.1} s uptime)",
                out.rc.unwrap_or(-1),
                out.wall.as_secs_f64(),
                out.ready_uptime_s.unwrap_or(f64::NAN)
            );
            Ok(out.rc.unwrap_or(1))
        }
        Cmd::Guest(a) => {
            let shell = a.task.split_whitespace().any(|w| w == "shell");
            if let Some(code) = maybe_reexec_in_lab(&a.opts.lab, shell)? {
                return Ok(code);
            }
            cmd_guest(a)
        }
        Cmd::Bench(a) => {
            if let Some(code) = maybe_reexec_in_lab(&a.opts.lab, false)? {
                return Ok(code);
            }
            cmd_bench(a)
        }
    }
}

fn lab_options(a: &LabArgs) -> LabOptions {
    LabOptions {
        timeout: Duration::from_secs(a.lab_timeout),
        mem_mib: a.lab_mem_mib,
        ..LabOptions::default()
    }
}

/// Environment passed into the lab: the project's own settings and Rust's diagnostics.
fn forwarded_env() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with("VMM_") || k == "RUST_BACKTRACE" || k == "RUST_LOG")
        .filter(|(k, _)| k != labvm::INSIDE_ENV)
        .collect()
}

/// On a host without usable hardware KVM, runs this same command inside the lab VM and
/// returns its exit status; on a host with hardware KVM (the lab VM included), returns None.
/// `interactive` connects our stdin through the lab's console to the guest (`shell`).
fn maybe_reexec_in_lab(lab: &LabArgs, interactive: bool) -> Result<Option<i32>> {
    let d = detect::detect();
    let inside = std::env::var_os(labvm::INSIDE_ENV).is_some();
    match (d.mode, inside) {
        (KvmMode::Hardware, true) => {
            eprintln!("lab: kvm mode: hardware, inside the lab VM ({})", d.reason);
            Ok(None)
        }
        (KvmMode::Hardware, false) => {
            eprintln!(
                "lab: kvm mode: hardware, running guests directly ({})",
                d.reason
            );
            Ok(None)
        }
        (KvmMode::Lab, true) => bail!("inside the lab VM and still no usable KVM: {}", d.reason),
        (KvmMode::Lab, false) => {
            eprintln!(
                "lab: kvm mode: lab, running guests inside the lab VM ({})",
                d.reason
            );
            let exe = std::env::current_exe().context("locating the lab binary")?;
            let mut argv = vec![exe.to_string_lossy().into_owned()];
            argv.extend(std::env::args().skip(1));
            let opts = LabOptions {
                interactive,
                ..lab_options(lab)
            };
            let out = labvm::run_in_lab(&argv, &forwarded_env(), &opts)?;
            eprintln!(
                "lab: lab VM finished in {:.1} s (ready after {:.1} s)",
                out.wall.as_secs_f64(),
                out.ready_uptime_s.unwrap_or(f64::NAN)
            );
            Ok(Some(out.rc.unwrap_or(1)))
        }
    }
}

fn spec_for(o: &GuestOpts, task: &str, scratch: &Scratch) -> Result<GuestSpec> {
    let image = paths::guest_image()?;
    let data_disks = if o.data_disks.is_empty() {
        vec![DataDisk {
            path: scratch.disk("data0.img", o.disk_mib)?,
            read_only: false,
        }]
    } else {
        o.data_disks
            .iter()
            .map(|d| match d.strip_suffix(":ro") {
                Some(p) => DataDisk {
                    path: p.into(),
                    read_only: true,
                },
                None => DataDisk {
                    path: d.into(),
                    read_only: false,
                },
            })
            .collect()
    };
    let results = scratch.path().join("results.img");
    let spec = GuestSpec {
        backend: o.backend,
        image,
        rootfs: o.rootfs,
        vcpus: o.vcpus,
        mem_mib: o.mem_mib,
        data_disks,
        results_disk: Some(results),
        task: format!("{task} fio.runtime={}", o.fio_runtime),
        timeout: Duration::from_secs(o.timeout),
        interactive: task.split_whitespace().any(|w| w == "shell"),
        echo: o.show_console,
        elf_kernel: o.elf_kernel,
        interceptors: o
            .interceptors
            .as_deref()
            .map(guest::InterceptorChain::from_file)
            .transpose()?,
        control: o.control.clone(),
        engine: o.engine.clone(),
        num_queues: o.num_queues,
    };
    guest::check_spec(&spec)?;
    Ok(spec)
}

fn print_problems(run: &GuestRun) {
    for p in &run.problems {
        eprintln!("lab: FAILED: {p}");
    }
    if !run.ok() {
        let tail: Vec<&str> = run.transcript.lines().rev().take(20).collect();
        eprintln!("lab: last console lines:");
        for l in tail.into_iter().rev() {
            eprintln!("  | {l}");
        }
    }
}

fn write_json(path: &Option<std::path::PathBuf>, value: &impl serde::Serialize) -> Result<()> {
    if let Some(path) = path {
        let text = serde_json::to_string_pretty(value)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn cmd_guest(a: GuestArgs) -> Result<i32> {
    let scratch = Scratch::new("guest")?;
    let spec = spec_for(&a.opts, &a.task, &scratch)?;
    eprintln!(
        "lab: booting the guest with {} ({} vCPU, {} MiB, {:?} root): {}",
        spec.backend.name(),
        spec.vcpus,
        spec.mem_mib,
        spec.rootfs,
        a.task
    );
    let run = guest::boot(&spec)?;
    if let Some(ok) = run.console.selftest {
        println!(
            "selftest: {} {}",
            if ok { "PASS" } else { "FAIL" },
            run.console.selftest_detail
        );
    }
    if !run.fio.is_empty() {
        print!("{}", fio::render_table(&run.fio));
    }
    println!(
        "boot to init: {:.0} ms wall, guest uptime at init {:.2} s; total {:.1} s",
        run.wall_to_init_ms.unwrap_or(f64::NAN),
        run.console.init_uptime_s.unwrap_or(f64::NAN),
        run.wall_total_ms / 1e3
    );
    write_json(&a.json, &run)?;
    print_problems(&run);
    Ok(if run.ok() { 0 } else { 1 })
}

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

#[derive(serde::Serialize)]
struct BenchReport {
    /// What ran: `qemu`, `vmm`, or `vmm+interceptors`.
    label: String,
    /// Which round of `--rounds` this run was, from 1.
    round: usize,
    backend: Backend,
    /// The `--interceptors` file stacked on the data disk, if any.
    interceptors: Option<std::path::PathBuf>,
    rootfs: RootFs,
    vcpus: u32,
    mem_mib: u32,
    boot_wall_to_init_ms: Vec<f64>,
    boot_uptime_at_init_s: Vec<f64>,
    median_wall_to_init_ms: f64,
    median_uptime_at_init_s: f64,
    fio_runtime_s: u32,
    fio: Vec<fio::FioRow>,
}

/// The configurations a bench runs, in order, each with its label.
fn bench_variants(a: &BenchArgs) -> Result<Vec<(String, GuestOpts)>> {
    let with = |backend: Backend, chain: Option<&std::path::Path>| {
        let mut o = a.opts.clone();
        o.backend = backend;
        o.interceptors = chain.map(std::path::Path::to_path_buf);
        o
    };
    if !a.compare {
        if !a.also_interceptors.is_empty() {
            bail!("--also-interceptors needs --compare");
        }
        let label = match (&a.opts.interceptors, a.opts.backend) {
            (Some(_), b) => format!("{}+interceptors", b.name()),
            (None, b) => b.name().to_string(),
        };
        return Ok(vec![(label, a.opts.clone())]);
    }
    let mut v = vec![
        ("qemu".to_string(), with(Backend::Qemu, None)),
        ("vmm".to_string(), with(Backend::Vmm, None)),
    ];
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
    Ok(v)
}

/// The order of the variants in round `round` (from 0): forward, then reversed, and so on.
fn round_order(n: usize, round: usize) -> Vec<usize> {
    if round.is_multiple_of(2) {
        (0..n).collect()
    } else {
        (0..n).rev().collect()
    }
}

fn cmd_bench(a: BenchArgs) -> Result<i32> {
    if a.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let variants = bench_variants(&a)?;
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
            let (report, ok) = bench_one(&a, label, opts, round + 1)?;
            if !ok {
                code = 1;
            }
            runs[i].push(report);
        }
    }
    if let [q, v, rest @ ..] = runs.as_slice() {
        print_ratios("vmm / QEMU", q, v);
        for i in rest {
            print_ratios(&format!("{} / vmm", i[0].label), v, i);
        }
    }
    write_json(&a.json, &runs.into_iter().flatten().collect::<Vec<_>>())?;
    Ok(code)
}

/// Mean IOPS of one job direction over the rounds of one variant.
fn mean_iops(reports: &[BenchReport], job: &str, dir: &str) -> Option<f64> {
    let v: Vec<f64> = reports
        .iter()
        .filter_map(|r| r.fio.iter().find(|p| p.job == job && p.dir == dir))
        .map(|p| p.iops)
        .collect();
    (v.len() == reports.len() && !v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// `new` against `base`, same lab session: boot time and IOPS ratios, with the lowest and
/// highest ratio of a single round when there were several.
fn print_ratios(title: &str, base: &[BenchReport], new: &[BenchReport]) {
    let (Some(b0), Some(n0)) = (base.first(), new.first()) else {
        return;
    };
    let boots = |r: &[BenchReport]| {
        median(
            r.iter()
                .flat_map(|r| r.boot_wall_to_init_ms.iter().copied())
                .collect(),
        )
    };
    let (bb, nb) = (boots(base), boots(new));
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
    for r in &n0.fio {
        let (Some(n), Some(b)) = (
            mean_iops(new, &r.job, &r.dir),
            mean_iops(base, &r.job, &r.dir),
        ) else {
            continue;
        };
        let per_round: Vec<f64> = new
            .iter()
            .zip(base)
            .filter_map(|(x, y)| {
                let f = |rep: &BenchReport| {
                    rep.fio
                        .iter()
                        .find(|p| p.job == r.job && p.dir == r.dir)
                        .map(|p| p.iops)
                };
                Some(f(x)? / f(y)?)
            })
            .collect();
        let range = if per_round.len() > 1 {
            let lo = per_round.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = per_round.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            format!("{lo:.2}..{hi:.2}")
        } else {
            String::new()
        };
        println!(
            "{:<20} {:<5} {:>18.0} {:>18.0} {:>7.2} {:>12}",
            r.job,
            r.dir,
            n,
            b,
            n / b,
            range
        );
    }
}

/// Boots and fio for one configuration; everything about the guest comes from `opts`.
fn bench_one(
    a: &BenchArgs,
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
    let spec = spec_for(opts, &format!("fio={}", a.jobs), &scratch)?;
    eprintln!(
        "lab: {label}: running fio jobs {} ({} s each)",
        a.jobs, opts.fio_runtime
    );
    let run = guest::boot(&spec)?;
    if run.backend != opts.backend {
        bail!("{label}: fio ran under {} instead", run.backend.name());
    }
    let report = BenchReport {
        label: label.to_string(),
        round,
        backend: opts.backend,
        interceptors: opts.interceptors.clone(),
        rootfs: opts.rootfs,
        vcpus: opts.vcpus,
        mem_mib: opts.mem_mib,
        median_wall_to_init_ms: median(walls.clone()),
        median_uptime_at_init_s: median(uptimes.clone()),
        boot_wall_to_init_ms: walls,
        boot_uptime_at_init_s: uptimes,
        fio_runtime_s: opts.fio_runtime,
        fio: run.fio.clone(),
    };
    println!();
    println!(
        "{label}: {} vCPU, {} MiB, {:?} root; data disk {} MiB raw file on tmpfs{}",
        opts.vcpus,
        opts.mem_mib,
        opts.rootfs,
        opts.disk_mib,
        opts.interceptors
            .as_ref()
            .map(|p| format!(", interceptors from {}", p.display()))
            .unwrap_or_default()
    );
    println!(
        "boot to init, median of {}: {:.0} ms wall (VMM start to init), guest uptime {:.2} s",
        a.boots, report.median_wall_to_init_ms, report.median_uptime_at_init_s
    );
    print!("{}", fio::render_table(&report.fio));
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
}
