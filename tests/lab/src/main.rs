//! `lab`: run real guests under real KVM, directly on a host with hardware KVM or inside
//! the nested lab VM otherwise.
//!
//!   lab detect                       which mode this host needs, and why
//!   lab exec -- CMD ARGS..           run a command inside the lab VM
//!   lab guest --task "selftest"      boot the guest once and check its report
//!   lab bench                        boot time (median of N) and the fio table
//!   lab pair --a-task .. --b-task ..  two guests under vmm on one bridge, at once

mod chart;
mod cpu;
mod netbench;
mod pair;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};
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
    /// Boot two guests under vmm at once, their cards on one bridge (10.0.0.1/24 on the
    /// bridge's side; the guests take 10.0.0.2 and 10.0.0.3 in their tasks).
    Pair(PairArgs),
    /// iperf3 TCP through a guest's card: vmm against QEMU (virtio-net-pci, vhost=off and
    /// on) guest to host, host to guest and guest to guest, and vmm with frame encryption,
    /// in one lab session; a table, a chart and JSON.
    Netbench(netbench::NetBenchArgs),
}

#[derive(Args, Debug)]
struct PairArgs {
    /// Guest A's task words (its card: tap vmtapa, MAC 52:54:00:00:00:0a).
    #[arg(long)]
    a_task: String,
    /// Guest B's task words (tap vmtapb, MAC 52:54:00:00:00:0b).
    #[arg(long)]
    b_task: String,
    /// `[[interceptor]]` entries for A's card.
    #[arg(long)]
    a_net_interceptors: Option<PathBuf>,
    #[arg(long)]
    b_net_interceptors: Option<PathBuf>,
    /// API steps against A's vmm (as `--control`).
    #[arg(long)]
    a_control: Option<String>,
    #[arg(long)]
    b_control: Option<String>,
    /// A shell command run on the bridge's side once both cards are on it.
    #[arg(long)]
    host_cmd: Option<String>,
    /// Capture everything on the bridge with tcpdump into this file.
    #[arg(long)]
    capture: Option<PathBuf>,
    /// Write both runs as JSON (`{"a": .., "b": .., "host": ..}`).
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    opts: GuestOpts,
}

#[derive(Args, Debug, Clone)]
struct LabArgs {
    /// Lab VM time limit in seconds.
    #[arg(long, default_value_t = 1800)]
    lab_timeout: u64,
    /// Lab VM memory in MiB (its tmpfs for disk images takes up to 75% of it).
    #[arg(long, default_value_t = 4096)]
    lab_mem_mib: u32,
    /// A file the command changes, put back as it was before a retry after a lab fault
    /// (repeatable; `guest` and `bench` add their writable `--data-disk` files themselves).
    #[arg(long = "restore-on-retry")]
    restore_on_retry: Vec<std::path::PathBuf>,
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
    /// unset: `VMM_LAB_ENGINE` if set, else vmm's default, `auto`).
    #[arg(long)]
    engine: Option<String>,
    /// Queues of the data disks (unset: each VMM's default).
    #[arg(long)]
    num_queues: Option<u16>,
    /// A `[[block]]` setting of vmm's data disks, `KEY=VALUE` with VALUE in TOML (e.g.
    /// `coalesce_us=200`); repeatable (vmm backend).
    #[arg(long = "block-option", value_parser = parse_block_option)]
    block_options: Vec<(String, String)>,
    /// Give the guest a network card on this tap, which vmm creates (vmm backend).
    #[arg(long)]
    net_tap: Option<String>,
    /// The guest card's MAC address.
    #[arg(long, default_value = "52:54:00:12:34:56")]
    net_mac: String,
    /// The address the harness gives the tap once it exists (`A.B.C.D/N`).
    #[arg(long)]
    net_host_ip: Option<String>,
    /// A shell command run on the tap's side once it is up, beside the guest (its output
    /// is printed after the run and is `net_host` in the JSON report).
    #[arg(long)]
    net_host_cmd: Option<String>,
    /// A TOML file of `[[interceptor]]` entries to stack, in file order, on the card.
    #[arg(long)]
    net_interceptors: Option<std::path::PathBuf>,
    #[command(flatten)]
    lab: LabArgs,
}

/// `KEY=VALUE` of `--block-option`: a lower-case TOML key, and a value TOML accepts.
fn parse_block_option(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected KEY=VALUE"))?;
    let (k, v) = (k.trim(), v.trim());
    if k.is_empty() || !k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
        return Err(format!("{k:?}: a key is lower-case letters and _"));
    }
    toml::from_str::<toml::Table>(&format!("k = {v}"))
        .map_err(|e| format!("{v:?} is not a TOML value: {e}"))?;
    Ok((k.to_string(), v.to_string()))
}

#[derive(Args, Debug)]
struct GuestArgs {
    /// The guest's task, words in the order to run them: `selftest`, `fio=JOB[,JOB..]` (or
    /// `fio=all`), `boot`, `shell`, `hostcheck` (write a pattern at block B+1000 of the data
    /// disk, report the sha256 at B+2000; B is `hostcheck.base=`), `readcheck=N[,N..]` (read
    /// 4 KiB blocks, report each one's sha256 or EIO), `rocheck=/dev/vdX` (try to write a
    /// read-only disk), `rebind` (unbind and rebind the data disk's driver through sysfs),
    /// `stamp` (write numbered blocks until stopped), `queues` (how many request queues the
    /// data disk has), `discard` (blkdiscard the data disk), `tarcopy=M` (a tar of the
    /// guest's own files at MiB M), `zerofill=M,N` (N MiB of zeroes at MiB M).
    /// guest-kernel/rootfs/init has them all.
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
    /// With --compare: vmm again with this `[[block]]` setting on its data disks
    /// (`KEY=VALUE`, as --block-option), as its own variant `vmm[KEY=VALUE]` (repeatable).
    #[arg(long = "also-block-option", value_parser = parse_block_option)]
    also_block_options: Vec<(String, String)>,
    /// With --compare: the QEMU configurations to run, comma-separated: `threads` (label
    /// `qemu`: `aio=threads`) and `io_uring` (label `qemu-io_uring`: `aio=io_uring` and an
    /// iothread per data disk). vmm's ratios are to the better of them, row by row.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "threads")]
    qemu_aio: Vec<QemuAio>,
    /// With --compare: write an SVG chart of vmm's IOPS over each QEMU configuration's, per
    /// job, to this file (default: build/bench/vmm-vs-qemu.svg).
    #[arg(long)]
    chart: Option<PathBuf>,
    #[command(flatten)]
    opts: GuestOpts,
}

/// QEMU's configurations for `bench --compare --qemu-aio`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum QemuAio {
    /// `aio=threads`, requests on QEMU's thread pool (the `qemu` backend).
    Threads,
    /// `aio=io_uring` with an iothread (the `qemu-io_uring` backend).
    #[value(name = "io_uring")]
    IoUring,
}

impl QemuAio {
    fn backend(self) -> Backend {
        match self {
            QemuAio::Threads => Backend::Qemu,
            QemuAio::IoUring => Backend::QemuIoUring,
        }
    }
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
            if let Some(code) = maybe_reexec_in_lab(&a.opts, shell)? {
                return Ok(code);
            }
            cmd_guest(a)
        }
        Cmd::Bench(a) => {
            // Before the lab boots: a plugin not built would fail each of its boots.
            for (_, o) in bench_variants(&a)? {
                if let Some(file) = &o.interceptors {
                    guest::InterceptorChain::from_file(file)?.require_plugins(file)?;
                }
            }
            if let Some(code) = maybe_reexec_in_lab(&a.opts, false)? {
                return Ok(code);
            }
            cmd_bench(a)
        }
        Cmd::Pair(a) => {
            if let Some(code) = maybe_reexec_in_lab(&a.opts, false)? {
                return Ok(code);
            }
            cmd_pair(a)
        }
        Cmd::Netbench(a) => {
            // Built out here: the lab VM has no toolchain.
            vmm_lab::plugins::plugins()?;
            if let Some(code) = maybe_reexec_in_lab(&a.opts, false)? {
                return Ok(code);
            }
            netbench::run(a)
        }
    }
}

fn cmd_pair(a: PairArgs) -> Result<i32> {
    if a.opts.backend != Backend::Vmm {
        bail!("lab pair runs both guests under vmm (--backend vmm)");
    }
    let bridge = pair::Bridge::up()?;
    let mut capture = match &a.capture {
        Some(file) => {
            let child = std::process::Command::new("tcpdump")
                .args(["-i", pair::BRIDGE, "-U", "-s", "0", "-w"])
                .arg(file)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .context("starting tcpdump (scripts/setup.sh installs it)")?;
            std::thread::sleep(Duration::from_secs(1));
            Some(child)
        }
        None => None,
    };
    let (scratch_a, scratch_b) = (Scratch::new("pair-a")?, Scratch::new("pair-b")?);
    let mut specs = Vec::new();
    for (name, task, chain, control, scratch) in [
        (
            "a",
            &a.a_task,
            &a.a_net_interceptors,
            &a.a_control,
            &scratch_a,
        ),
        (
            "b",
            &a.b_task,
            &a.b_net_interceptors,
            &a.b_control,
            &scratch_b,
        ),
    ] {
        let mut spec = spec_for(&a.opts, task, scratch)?;
        spec.net = Some(guest::NetSpec {
            interceptors: chain
                .as_deref()
                .map(guest::InterceptorChain::from_file)
                .transpose()?,
            ..pair::card(name)
        });
        spec.control = control.clone();
        spec.control_sock = Some(scratch.path().join("api.sock"));
        specs.push(spec);
    }
    eprintln!(
        "lab: booting two guests under vmm on bridge {}",
        pair::BRIDGE
    );
    let (runs, host_out) = pair::boot_all(&specs, a.host_cmd.clone());
    if let Some(child) = capture.as_mut() {
        // SIGINT: tcpdump flushes and closes the file.
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let _ = child.wait();
    }
    drop(bridge);
    let mut ok = true;
    let mut report = serde_json::Map::new();
    for (name, run) in ["a", "b"].iter().zip(runs) {
        let run = run?;
        for line in run.transcript.lines() {
            if line.contains(vmm_lab::console::GUEST_MARKER) || line.starts_with("vmm: ") {
                println!("{name}| {line}");
            }
        }
        for p in &run.problems {
            println!("{name}| problem: {p}");
        }
        ok &= run.ok();
        report.insert(name.to_string(), serde_json::to_value(&run)?);
    }
    if let Some(text) = &host_out {
        for line in text.lines() {
            println!("host| {line}");
        }
        report.insert("host".into(), serde_json::Value::String(text.clone()));
    }
    write_json(&a.json, &serde_json::Value::Object(report))?;
    Ok(if ok { 0 } else { 1 })
}

fn lab_options(a: &LabArgs) -> LabOptions {
    LabOptions {
        timeout: Duration::from_secs(a.lab_timeout),
        mem_mib: a.lab_mem_mib,
        restore_on_retry: a.restore_on_retry.clone(),
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
fn maybe_reexec_in_lab(o: &GuestOpts, interactive: bool) -> Result<Option<i32>> {
    let lab = &o.lab;
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
            let mut opts = LabOptions {
                interactive,
                ..lab_options(lab)
            };
            // A retry after a lab fault must see the disks as this run found them.
            opts.restore_on_retry.extend(
                o.data_disks
                    .iter()
                    .filter(|d| !d.ends_with(":ro"))
                    .map(std::path::PathBuf::from),
            );
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
    let net_chain = o
        .net_interceptors
        .as_deref()
        .map(guest::InterceptorChain::from_file)
        .transpose()?;
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
        // VMM_LAB_ENGINE: the same for a whole test suite (tests pass VMM_* into the lab).
        engine: o.engine.clone().or_else(|| {
            std::env::var("VMM_LAB_ENGINE")
                .ok()
                .filter(|e| !e.is_empty())
        }),
        num_queues: o.num_queues,
        block_options: o.block_options.clone(),
        net: o.net_tap.as_ref().map(|tap| guest::NetSpec {
            tap: tap.clone(),
            mac: o.net_mac.clone(),
            host_ip: o.net_host_ip.clone(),
            host_cmd: o.net_host_cmd.clone(),
            bridge: None,
            interceptors: net_chain.clone(),
            vhost: false,
        }),
        control_sock: None,
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
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // A bench's results must not be lost to a missing directory after its run.
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
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
    if let Some(text) = &run.net_host {
        for line in text.lines() {
            println!("net host: {line}");
        }
    }
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
fn bench_variants(a: &BenchArgs) -> Result<Vec<(String, GuestOpts)>> {
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
        if !a.also_interceptors.is_empty() || !a.also_block_options.is_empty() {
            bail!("--also-interceptors and --also-block-option need --compare");
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
    for (k, val) in &a.also_block_options {
        let mut o = with(Backend::Vmm, None);
        o.block_options.retain(|(ok, _)| ok != k);
        o.block_options.push((k.clone(), val.clone()));
        v.push((format!("vmm[{k}={val}]"), o));
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

fn cmd_bench(a: BenchArgs) -> Result<i32> {
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

/// After the tables: what each interceptor of each variant did in its last round, and what
/// `vmm-img info` said of its disk.
fn print_layers(runs: &[Vec<BenchReport>]) {
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
fn mean_iops(reports: &[BenchReport], job: &str, dir: &str) -> Option<f64> {
    let v: Vec<f64> = reports.iter().filter_map(|r| r.iops(job, dir)).collect();
    (v.len() == reports.len() && !v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Lowest and highest of several figures, when there are several.
fn range(v: &[f64]) -> Option<(f64, f64)> {
    (v.len() > 1).then(|| {
        (
            v.iter().copied().fold(f64::INFINITY, f64::min),
            v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        )
    })
}

/// One row of vmm against the QEMU configurations.
#[derive(Debug, PartialEq)]
struct CompareRow {
    job: String,
    dir: String,
    /// Mean IOPS over the rounds: vmm's, and each QEMU's (None: it has no such row).
    vmm: f64,
    qemu: Vec<Option<f64>>,
    /// vmm over the better QEMU (the one with more mean IOPS on this row).
    to_better: Option<f64>,
    /// vmm over the better QEMU of each round: lowest and highest.
    round_range: Option<(f64, f64)>,
}

fn compare_rows(qemus: &[&[BenchReport]], vmm: &[BenchReport]) -> Vec<CompareRow> {
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
fn boots_median(r: &[BenchReport]) -> f64 {
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

fn print_compare(qemus: &[&[BenchReport]], vmm: &[BenchReport], rows: &[CompareRow]) {
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
fn print_cpu_compare(runs: &[Vec<BenchReport>], jobs: &[String]) {
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

fn write_compare_chart(
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
fn qemu_words(label: &str) -> &'static str {
    if label == Backend::QemuIoUring.name() {
        "aio=io_uring, iothread"
    } else {
        "aio=threads"
    }
}

/// `new` against `base`, same lab session: boot time and IOPS ratios, with the lowest and
/// highest ratio of a single round when there were several.
fn print_ratios(title: &str, base: &[BenchReport], new: &[BenchReport]) {
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
            .filter_map(|(x, y)| Some(x.iops(&r.job, &r.dir)? / y.iops(&r.job, &r.dir)?))
            .collect();
        let range = range(&per_round)
            .map(|(lo, hi)| format!("{lo:.2}..{hi:.2}"))
            .unwrap_or_default();
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

/// Prints the VMM process's CPU over a stretch of a run, by thread, and the machine's.
fn print_cpu(what: &str, process: &str, c: &cpu::ProcessCpu, iops: f64) {
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
