//! `lab`: run real guests under real KVM, directly on a host with hardware KVM or inside
//! the nested lab VM otherwise.
//!
//!   lab detect                       which mode this host needs, and why
//!   lab exec -- CMD ARGS..           run a command inside the lab VM
//!   lab guest --task "selftest"      boot the guest once and check its report
//!   lab bench                        boot time (median of N) and the fio table
//!   lab pair --a-task .. --b-task ..  two guests under vmm on one bridge, at once
//!   lab soak --boots 100             many short boots per variant, counting hangs

mod bench;
mod chart;
mod cpu;
mod netbench;
mod pair;
mod soak;

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
    /// Many short boots of each variant (vmm, QEMU, QEMU without ACPI, each optionally with
    /// guest kernel parameters) in one lab session, alternating, optionally with the host
    /// or the lab kept busy: counts the guests that hang and keeps each hang's report
    /// (docs/lab.md, "The halted guest").
    Soak(soak::SoakArgs),
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
    /// Lab VM time limit in seconds (`lab soak` raises the default to fit its boots).
    #[arg(long, default_value_t = DEFAULT_LAB_TIMEOUT)]
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
    /// The vmm binary to run (vmm backend; default: the `vmm` beside this harness), e.g.
    /// one built from another commit.
    #[arg(long, value_parser = parse_binary)]
    vmm_binary: Option<PathBuf>,
    #[command(flatten)]
    lab: LabArgs,
}

/// An existing file, made absolute (the lab runs commands from another directory).
fn parse_binary(s: &str) -> Result<PathBuf, String> {
    std::fs::canonicalize(s).map_err(|e| format!("{s}: {e}"))
}

/// `NAME=PATH`: a vmm binary and the name its bench variants carry (`vmm@NAME`).
fn parse_named_binary(s: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=PATH"))?;
    let name = name.trim();
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(format!("{name:?}: a name is letters, digits, - _ and ."));
    }
    Ok((name.to_string(), parse_binary(path.trim())?))
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
    /// With --compare: every vmm variant (plain, and with each interceptor file) again with
    /// this `[[block]]` setting on its data disks (`KEY=VALUE`, as --block-option), as its
    /// own variants `vmm[KEY=VALUE]`, `vmm+FILE[KEY=VALUE]` (repeatable).
    #[arg(long = "also-block-option", value_parser = parse_block_option)]
    also_block_options: Vec<(String, String)>,
    /// With --compare: every vmm variant again (plain and each interceptor file) run by
    /// another vmm binary, `NAME=PATH` (e.g. one built from the commit before a change),
    /// as variants `vmm@NAME`, `vmm+FILE@NAME`; each of those is also compared with
    /// `vmm@NAME`. Repeatable. One lab session then measures two builds side by side.
    #[arg(long = "also-vmm-binary", value_parser = parse_named_binary)]
    also_vmm_binaries: Vec<(String, PathBuf)>,
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
            for (_, o) in bench::bench_variants(&a)? {
                if let Some(file) = &o.interceptors {
                    guest::InterceptorChain::from_file(file)?.require_plugins(file)?;
                }
            }
            if let Some(code) = maybe_reexec_in_lab(&a.opts, false)? {
                return Ok(code);
            }
            bench::cmd_bench(a)
        }
        Cmd::Pair(a) => {
            if let Some(code) = maybe_reexec_in_lab(&a.opts, false)? {
                return Ok(code);
            }
            cmd_pair(a)
        }
        Cmd::Soak(mut a) => {
            if let Some(file) = &a.opts.interceptors {
                guest::InterceptorChain::from_file(file)?.require_plugins(file)?;
            }
            fit_lab_timeout(&mut a);
            if std::env::var_os(labvm::INSIDE_ENV).is_none() {
                soak::name_progress();
                soak::hog_host(&a);
            }
            if let Some(code) = maybe_reexec_in_lab(&a.opts, false)? {
                return Ok(code);
            }
            soak::run(a)
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

/// The lab VM's time limit unless `--lab-timeout` says otherwise.
const DEFAULT_LAB_TIMEOUT: u64 = 1800;

/// A soak of many boots outlasts the default limit (a 200-boot session ended at boot 183,
/// 30 minutes in): unless `--lab-timeout` was given, the limit fits the boots at 45 s each
/// (a slow boot of a contended lab), plus 10 minutes.
fn fit_lab_timeout(a: &mut soak::SoakArgs) {
    let lab = &mut a.opts.lab;
    let boots = a.boots.saturating_mul(a.variants.len().max(1)) as u64;
    let need = boots.saturating_mul(45) / u64::from(a.parallel.max(1)) + 600;
    if lab.lab_timeout == DEFAULT_LAB_TIMEOUT && need > lab.lab_timeout {
        eprintln!("lab soak: the lab's time limit is {need} s for {boots} boots");
        lab.lab_timeout = need;
    }
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
        vmm_binary: o.vmm_binary.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn soak_args(extra: &[&str]) -> soak::SoakArgs {
        let mut argv = vec!["lab", "soak"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().cmd {
            Cmd::Soak(a) => a,
            _ => panic!("not a soak"),
        }
    }

    #[test]
    fn a_long_soak_gets_a_lab_time_limit_that_fits_it() {
        let mut a = soak_args(&["--boots", "200", "--variants", "vmm", "--parallel", "2"]);
        fit_lab_timeout(&mut a);
        assert_eq!(a.opts.lab.lab_timeout, 200 * 45 / 2 + 600);
        let mut short = soak_args(&["--boots", "10", "--variants", "vmm"]);
        fit_lab_timeout(&mut short);
        assert_eq!(short.opts.lab.lab_timeout, DEFAULT_LAB_TIMEOUT);
        let mut given = soak_args(&["--boots", "200", "--lab-timeout", "900"]);
        fit_lab_timeout(&mut given);
        assert_eq!(given.opts.lab.lab_timeout, 900, "what the operator said");
    }
}
