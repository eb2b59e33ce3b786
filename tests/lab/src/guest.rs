//! Boots the guest with a named VMM backend, under KVM that works (hardware, or inside the
//! lab), and collects what it reported on its serial console.

use crate::console::{self, GuestConsole};
use crate::fio::{self, FioRow};
use crate::lines::forward_lines;
use crate::paths::GuestImage;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// The VMM that runs the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// QEMU with `-enable-kvm`, the peer our VMM is compared against: data disks with
    /// `aio=threads` (QEMU's thread pool), served from QEMU's main loop.
    Qemu,
    /// The same QEMU with the data disks on `aio=io_uring`, each served by its own iothread
    /// (`-object iothread` and virtio-blk's `iothread=`).
    #[value(name = "qemu-io_uring")]
    #[serde(rename = "qemu-io_uring")]
    QemuIoUring,
    /// QEMU shaped like vmm, as a control: `-M pc,acpi=off,hpet=off`, so the guest finds
    /// its CPU and IOAPIC in the MP table and has the local APIC's timer as its only clock
    /// event device, as under vmm (its disks are still virtio-blk-pci).
    #[value(name = "qemu-noacpi")]
    #[serde(rename = "qemu-noacpi")]
    QemuNoAcpi,
    /// Our `vmm` (built next to this harness binary).
    Vmm,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Qemu => "qemu",
            Backend::QemuIoUring => "qemu-io_uring",
            Backend::QemuNoAcpi => "qemu-noacpi",
            Backend::Vmm => "vmm",
        }
    }

    /// Whether this is one of the QEMU configurations.
    pub fn is_qemu(self) -> bool {
        matches!(
            self,
            Backend::Qemu | Backend::QemuIoUring | Backend::QemuNoAcpi
        )
    }
}

/// Waits for the tap vmm creates, gives it `host_ip` and sets it up, then runs `host_cmd`:
/// its output (or what went wrong).
fn tap_side(net: &NetSpec) -> String {
    let dev = Path::new("/sys/class/net").join(&net.tap);
    let t0 = Instant::now();
    while !dev.exists() {
        if t0.elapsed() > Duration::from_secs(60) {
            return format!("tap {} never appeared", net.tap);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Some(bridge) = &net.bridge {
        let args = [
            "link",
            "set",
            net.tap.as_str(),
            "master",
            bridge.as_str(),
            "up",
        ];
        match Command::new("ip").args(args).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => return format!("ip {args:?}: {}", String::from_utf8_lossy(&o.stderr)),
            Err(e) => return format!("ip: {e}"),
        }
    }
    if let Some(ip) = &net.host_ip {
        for args in [
            vec!["addr", "add", ip.as_str(), "dev", net.tap.as_str()],
            vec!["link", "set", net.tap.as_str(), "up"],
        ] {
            match Command::new("ip").args(&args).output() {
                Ok(o) if o.status.success() => {}
                Ok(o) => return format!("ip {args:?}: {}", String::from_utf8_lossy(&o.stderr)),
                Err(e) => return format!("ip: {e}"),
            }
        }
    }
    let Some(cmd) = &net.host_cmd else {
        return String::new();
    };
    match Command::new("sh").arg("-c").arg(cmd).output() {
        Ok(o) => format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => format!("sh -c {cmd:?}: {e}"),
    }
}

/// How the guest gets its root filesystem.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RootFs {
    /// Read-only ext4 image as the first virtio disk (/dev/vda); data disks follow.
    Ext4,
    /// The same tree as an initramfs; data disks start at /dev/vda.
    Initramfs,
}

#[derive(Clone, Debug)]
pub struct DataDisk {
    pub path: PathBuf,
    pub read_only: bool,
}

#[derive(Clone, Debug)]
pub struct GuestSpec {
    pub backend: Backend,
    pub image: GuestImage,
    pub rootfs: RootFs,
    pub vcpus: u32,
    pub mem_mib: u32,
    pub data_disks: Vec<DataDisk>,
    /// A scratch file the harness attaches as the last disk; the guest writes its report
    /// there (fio's JSON included) before it resets. Recreated empty on every boot.
    pub results_disk: Option<PathBuf>,
    /// The guest init's task words (`selftest`, `fio=JOB,..`, `boot`, `shell`, options).
    pub task: String,
    pub timeout: Duration,
    /// Connect the guest's console to our stdin/stdout (for `shell`).
    pub interactive: bool,
    /// Print the guest's console lines as they come (stderr, prefixed `guest| `).
    pub echo: bool,
    /// Boot the ELF vmlinux instead of the bzImage (vmm backend only).
    pub elf_kernel: bool,
    /// Interceptors stacked on the first data disk (vmm backend only).
    pub interceptors: Option<InterceptorChain>,
    /// Steps a client of the vmm's REST API runs while the guest runs (`control.rs`).
    pub control: Option<String>,
    /// The block I/O engine of every disk (`engine` in vmm's `[[block]]`; vmm backend).
    pub engine: Option<String>,
    /// Queues of the data disks (`num_queues`; vmm backend: its `[[block]]`, QEMU:
    /// virtio-blk's `num-queues`). Unset: each VMM's default.
    pub num_queues: Option<u16>,
    /// More `[[block]]` settings of the data disks, `(key, TOML value)` (vmm backend).
    pub block_options: Vec<(String, String)>,
    /// The vmm binary to run (vmm backend); unset: the one beside the harness.
    pub vmm_binary: Option<PathBuf>,
    /// A network card on a tap of the lab (vmm backend).
    pub net: Option<NetSpec>,
    /// vmm's API socket (default: `control::socket_path()`): two guests of one harness
    /// need two.
    pub control_sock: Option<PathBuf>,
}

impl GuestSpec {
    /// Where this run's vmm serves its API.
    pub fn control_socket(&self) -> PathBuf {
        self.control_sock
            .clone()
            .unwrap_or_else(crate::control::socket_path)
    }
}

/// The guest's network card and what the harness does on the tap's side.
#[derive(Clone, Debug, Default)]
pub struct NetSpec {
    /// The tap (vmm creates it).
    pub tap: String,
    pub mac: String,
    /// The address the harness gives the tap once it exists (`A.B.C.D/N`).
    pub host_ip: Option<String>,
    /// A shell command the harness runs once the tap is up, beside the guest; its output
    /// is the run's `net_host`.
    pub host_cmd: Option<String>,
    /// A bridge the harness puts the tap on once it exists (instead of an address).
    pub bridge: Option<String>,
    /// Interceptors stacked on the card (vmm backend).
    pub interceptors: Option<InterceptorChain>,
    /// QEMU backends: the card's frames go through vhost-net in the host kernel
    /// (`vhost=on`) instead of QEMU's own I/O thread.
    pub vhost: bool,
}

/// `[[interceptor]]` entries (TOML) and their ids, top to bottom.
#[derive(Clone, Debug)]
pub struct InterceptorChain {
    pub toml: String,
    pub ids: Vec<String>,
    /// Each entry's plugin file, absolute.
    pub plugins: Vec<PathBuf>,
}

impl InterceptorChain {
    /// Reads a TOML file of `[[interceptor]]` entries; the chain is their file order.
    pub fn from_file(path: &Path) -> Result<InterceptorChain> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut table: toml::Table =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        // Plugin paths are relative to the file, which the generated guest.toml is not next to.
        // Absolute, because the VMM does not run in our working directory.
        let file =
            std::fs::canonicalize(path).with_context(|| format!("resolving {}", path.display()))?;
        let base = file.parent().unwrap_or(Path::new("/"));
        let mut ids = Vec::new();
        let mut plugins = Vec::new();
        for entry in table
            .get_mut("interceptor")
            .and_then(|v| v.as_array_mut())
            .into_iter()
            .flatten()
        {
            if let Some(id) = entry.get("id").and_then(|v| v.as_str()) {
                ids.push(id.to_string());
            }
            // The plugin's path, and a key file an instance's config names.
            let absolute = |v: Option<&mut toml::Value>| {
                if let Some(toml::Value::String(p)) = v {
                    if Path::new(p.as_str()).is_relative() {
                        *p = base.join(&*p).to_string_lossy().into_owned();
                    }
                }
            };
            absolute(entry.get_mut("path"));
            if let Some(p) = entry.get("path").and_then(|v| v.as_str()) {
                plugins.push(PathBuf::from(p));
            }
            absolute(
                entry
                    .get_mut("config")
                    .and_then(|c| c.as_table_mut())
                    .and_then(|c| c.get_mut("key_file")),
            );
        }
        let toml =
            toml::to_string(&table).with_context(|| format!("re-writing {}", path.display()))?;
        Ok(InterceptorChain { toml, ids, plugins })
    }

    /// Fails naming the first plugin file that is not there (not built yet), so that a
    /// session of many boots stops before its first one rather than failing each.
    pub fn require_plugins(&self, file: &Path) -> Result<()> {
        if let Some(p) = self.plugins.iter().find(|p| !p.is_file()) {
            bail!(
                "{}: plugin {} is not there (`cargo build --release --workspace` builds the shipped plugins)",
                file.display(),
                p.display()
            );
        }
        Ok(())
    }
}

/// How the VMM process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VmmExit {
    /// Exited with this status (0: the guest reset, which is how it exits).
    Status(i32),
    /// Killed by a signal.
    Signal,
    /// Killed by us at the time limit.
    Timeout,
    /// Killed by us: no init after `INIT_DEADLINE` (a multi-vCPU boot in the lab).
    Stalled,
}

#[derive(Clone, Debug, Serialize)]
pub struct GuestRun {
    pub backend: Backend,
    /// Wall time from starting the VMM to the guest init's first line.
    pub wall_to_init_ms: Option<f64>,
    pub wall_total_ms: f64,
    pub vmm_exit: VmmExit,
    pub console: GuestConsole,
    /// fio results, one row per job and direction.
    pub fio: Vec<FioRow>,
    /// Bytes each data disk's file holds on the host after the run (its allocated blocks:
    /// a guest's discard shrinks a sparse image).
    pub data_allocated: Vec<u64>,
    /// What the API client of `--control` saw, step by step.
    pub control: Option<serde_json::Value>,
    /// The output of the tap side's command (`--net-host-cmd`).
    pub net_host: Option<String>,
    /// Everything that went wrong, in words; empty when the run is a success.
    pub problems: Vec<String>,
    #[serde(skip)]
    pub transcript: String,
}

impl GuestRun {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Size of the results disk: room for every job's fio JSON many times over.
pub const RESULTS_DISK_BYTES: u64 = 4 << 20;

/// The guest's report from the results disk: the text before the first NUL byte.
fn read_results(path: &Path) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(0);
    (end > 0).then(|| String::from_utf8_lossy(&bytes[..end]).into_owned())
}

/// Console lines worth showing live even when not echoing everything: the guest's own
/// markers (progress) and kernel messages (panics, oopses) but not fio's JSON.
/// What the guest's shell prints first, from its own session (guest-kernel/rootfs/init).
const SHELL_MARKER: &str = "@@GUEST@@ shell-ready";

/// Our stdin when it is not a terminal (inside the lab VM: the file the outer `lab` wrote
/// it to), read whole the first time it is asked for: every attempt of a run (a retry
/// after a lab fault, a boot after a stall) replays it all.
pub fn piped_input() -> &'static [u8] {
    static INPUT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    INPUT.get_or_init(|| {
        if let Some(file) = std::env::var_os(crate::labvm::INPUT_ENV) {
            return std::fs::read(file).unwrap_or_default();
        }
        let mut all = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut all);
        all
    })
}

/// Waits for `ready` (the guest's shell is up, or the command inside the lab VM started),
/// then writes our piped input to `pipe` and closes it. Gone without a word if `ready`
/// never comes.
pub fn feed_when_ready(ready: &mpsc::Receiver<()>, mut pipe: impl std::io::Write) {
    // Read now, while waiting: the input is whole before the first byte goes.
    piped_input();
    if ready.recv().is_err() {
        return;
    }
    // The shell prints its prompt after the marker: let it reach its first read.
    std::thread::sleep(Duration::from_millis(500));
    let _ = pipe.write_all(piped_input());
}

fn is_progress_line(line: &str) -> bool {
    (line.contains(console::GUEST_MARKER) && !line.contains("fio-stderr"))
        || line.trim_start().starts_with("[ ")
        || line.starts_with("vmm: ")
}

/// Boots the guest, waits for it to reset (or the time limit) and checks what it reported.
/// How long a multi-vCPU guest inside the lab may take to reach init before the boot counts
/// as stalled; boots there take 4 to 10 s.
pub const INIT_DEADLINE: Duration = Duration::from_secs(90);

/// Attempts for a multi-vCPU boot in the lab that stalls before init.
const STALLED_BOOT_ATTEMPTS: u32 = 3;

/// Boots the guest, runs its task and judges the run.
///
/// Inside the lab, a guest with several vCPUs now and then hangs silently before its init
/// (seen once in about a hundred such boots, under QEMU: the emulated SVM CPU losing the
/// second vCPU's start-up, docs/lab.md). Such a boot is stopped after `INIT_DEADLINE` and
/// started again, at most `STALLED_BOOT_ATTEMPTS` times in all, with a `lab: RETRY` line; a
/// boot that fails any other way, or stalls every time, is reported as it is.
pub fn boot(spec: &GuestSpec) -> Result<GuestRun> {
    let inside_lab = std::env::var_os(crate::labvm::INSIDE_ENV).is_some();
    let deadline = (inside_lab && spec.vcpus > 1 && !spec.interactive).then_some(INIT_DEADLINE);
    let mut attempt = 1;
    loop {
        let run = boot_once(spec, deadline)?;
        if run.vmm_exit != VmmExit::Stalled || attempt >= STALLED_BOOT_ATTEMPTS {
            return Ok(run);
        }
        eprintln!(
            "lab: RETRY: the {} guest with {} vCPUs did not reach init in {} s (attempt {attempt} of {STALLED_BOOT_ATTEMPTS}; a known fault of the lab's emulated SVM, docs/lab.md)",
            spec.backend.name(),
            spec.vcpus,
            INIT_DEADLINE.as_secs()
        );
        attempt += 1;
    }
}

fn boot_once(spec: &GuestSpec, init_deadline: Option<Duration>) -> Result<GuestRun> {
    if let Some(results) = &spec.results_disk {
        let f = std::fs::File::create(results)
            .with_context(|| format!("creating {}", results.display()))?;
        f.set_len(RESULTS_DISK_BYTES)?;
    }
    let mut cmd = match spec.backend {
        Backend::Qemu | Backend::QemuIoUring | Backend::QemuNoAcpi => qemu_command(spec),
        Backend::Vmm => vmm_command(spec)?,
    };
    // Input piped in (a script, not a person at a terminal) is held until the guest's shell
    // is up: bytes that reach the serial line before then are lost.
    let held_input = spec.interactive
        && (std::env::var_os(crate::labvm::INPUT_ENV).is_some() || !std::io::stdin().is_terminal());
    // Otherwise the guest's serial input is a pipe the harness holds: a guest that runs past
    // its limit gets a byte there (an interrupt) as the last step of its report.
    cmd.stdin(if spec.interactive && !held_input {
        Stdio::inherit()
    } else {
        Stdio::piped()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    // Before the guest starts: its vCPU's timer and interrupts, should it hang.
    let ktrace = crate::ktrace::KvmTrace::start();
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start the {} backend", spec.backend.name()))?;
    if let Some(t) = &ktrace {
        t.follow(child.id());
    }
    let mut serial_in = child.stdin.take();
    let mut shell_ready = if held_input { serial_in.take() } else { None }.map(|pipe| {
        let (ready, wait) = mpsc::channel::<()>();
        std::thread::spawn(move || feed_when_ready(&wait, pipe));
        ready
    });
    let (tx, rx) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        forward_lines(out, tx.clone());
    }
    if let Some(err) = child.stderr.take() {
        forward_lines(err, tx);
    }
    // Set when the VMM has exited, so the API client stops waiting for a guest that is gone.
    let vmm_gone = Arc::new(AtomicBool::new(false));
    let control = spec.control.clone().map(|steps| {
        let (gone, sock) = (vmm_gone.clone(), spec.control_socket());
        std::thread::spawn(move || crate::control::run(&steps, &sock, &gone))
    });
    let tap_side = spec
        .net
        .clone()
        .map(|net| std::thread::spawn(move || tap_side(&net)));
    let mut transcript = String::new();
    let mut wall_to_init = None;
    let mut killed = None;
    let mut hang = Vec::new();
    let init_marker = format!("{} init ", console::GUEST_MARKER);
    loop {
        let left = spec.timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            killed = Some(VmmExit::Timeout);
            let probe = HangProbe {
                pid: child.id(),
                backend: spec.backend.name(),
                sock: (spec.backend == Backend::Vmm).then(|| spec.control_socket()),
                trace: ktrace.as_ref(),
                serial: serial_in.as_mut(),
                lines: &rx,
            };
            hang = hang_report(probe, &mut transcript);
            let _ = child.kill();
            break;
        }
        if wall_to_init.is_none() && init_deadline.is_some_and(|d| start.elapsed() >= d) {
            killed = Some(VmmExit::Stalled);
            let _ = child.kill();
            break;
        }
        match rx.recv_timeout(left.min(Duration::from_secs(1))) {
            Ok((at, line)) => {
                if wall_to_init.is_none() && line.contains(&init_marker) {
                    wall_to_init = Some(at.duration_since(start));
                }
                if line.contains(SHELL_MARKER) {
                    if let Some(ready) = shell_ready.take() {
                        let _ = ready.send(());
                    }
                }
                if spec.interactive {
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "{line}");
                    let _ = out.flush();
                } else if spec.echo || is_progress_line(&line) {
                    eprintln!("guest| {line}");
                }
                transcript.push_str(&line);
                transcript.push('\n');
            }
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = if killed.is_some() {
        reap_killed(&mut child)
    } else {
        child.wait().context("waiting for the VMM").map(Some)
    };
    vmm_gone.store(true, Ordering::SeqCst);
    let status = status?;
    let unkillable = killed.is_some() && status.is_none();
    let vmm_exit = killed.unwrap_or_else(|| {
        status
            .and_then(|s| s.code())
            .map_or(VmmExit::Signal, VmmExit::Status)
    });
    let report = spec.results_disk.as_deref().and_then(read_results);
    let mut run = judge(
        spec,
        start.elapsed(),
        wall_to_init,
        vmm_exit,
        transcript,
        report,
    );
    if unkillable {
        run.problems.push(format!(
            "{} did not exit {} s after SIGKILL (a thread stuck in the kernel); its threads:\n{}",
            spec.backend.name(),
            REAP_LIMIT.as_secs(),
            crate::threads::snapshot(child.id())
        ));
    }
    run.problems.extend(hang);
    drop(serial_in);
    drop(ktrace);
    if let Some(handle) = tap_side {
        run.net_host = Some(
            handle
                .join()
                .unwrap_or_else(|_| "the tap side panicked".into()),
        );
    }
    if let Some(handle) = control {
        match handle.join() {
            Ok((seen, problems)) => {
                run.control = Some(seen);
                run.problems.extend(problems);
            }
            Err(_) => run.problems.push("the API client panicked".into()),
        }
    }
    Ok(run)
}

fn judge(
    spec: &GuestSpec,
    total: Duration,
    wall_to_init: Option<Duration>,
    vmm_exit: VmmExit,
    transcript: String,
    report: Option<String>,
) -> GuestRun {
    let mut problems = Vec::new();
    // The results disk carries the whole report; the console only the marker lines.
    let console = match &report {
        Some(text) => console::parse(text),
        None => {
            if spec.results_disk.is_some() && vmm_exit == VmmExit::Status(0) {
                problems.push("the guest wrote no report to its results disk".to_string());
            }
            console::parse(&transcript)
        }
    };
    let mut rows = Vec::new();
    match vmm_exit {
        VmmExit::Status(0) => {}
        VmmExit::Timeout => problems.push(format!("timed out after {:?}", spec.timeout)),
        VmmExit::Stalled => problems.push(format!(
            "stopped: no init after {} s, {} times",
            INIT_DEADLINE.as_secs(),
            STALLED_BOOT_ATTEMPTS
        )),
        other => problems.push(format!("{} exited with {other:?}", spec.backend.name())),
    }
    if console.init_uptime_s.is_none() {
        problems.push("the guest never reached its init".to_string());
    }
    match console.exit_rc {
        Some(0) => {}
        Some(rc) => problems.push(format!("the guest's task ended with status {rc}")),
        None => problems.push("the guest never reached its reset (panic or hang?)".to_string()),
    }
    let words: Vec<&str> = spec.task.split_whitespace().collect();
    if words.contains(&"selftest") && console.selftest != Some(true) {
        problems.push(format!(
            "selftest did not pass: {}",
            console.selftest_detail
        ));
    }
    for block in &console.fio {
        if block.rc != Some(0) {
            problems.push(format!("fio job {} ended with {:?}", block.job, block.rc));
        }
        match fio::parse_fio_json(&block.job, &block.json) {
            Ok(r) => rows.extend(r),
            Err(e) => problems.push(format!("{e:#}")),
        }
    }
    for e in &console.errors {
        problems.push(format!("guest: {e}"));
    }
    GuestRun {
        backend: spec.backend,
        wall_to_init_ms: wall_to_init.map(|d| d.as_secs_f64() * 1e3),
        wall_total_ms: total.as_secs_f64() * 1e3,
        vmm_exit,
        console,
        fio: rows,
        data_allocated: spec
            .data_disks
            .iter()
            .map(|d| {
                use std::os::unix::fs::MetadataExt;
                std::fs::metadata(&d.path).map_or(0, |m| m.blocks() * 512)
            })
            .collect(),
        control: None,
        net_host: None,
        problems,
        transcript,
    }
}

/// A scratch directory for disk images (tmpfs inside the lab), removed on drop.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Result<Scratch> {
        let dir = std::env::temp_dir().join(format!("vmm-lab-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Scratch(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A new sparse raw disk image of `mib` MiB.
    pub fn disk(&self, name: &str, mib: u64) -> Result<PathBuf> {
        let path = self.0.join(name);
        let f =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        f.set_len(mib << 20)
            .with_context(|| format!("sizing {}", path.display()))?;
        Ok(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Refuses to start when the spec cannot work, before spending a boot on it.
pub fn check_spec(spec: &GuestSpec) -> Result<()> {
    if spec.elf_kernel && spec.backend != Backend::Vmm {
        bail!("--elf-kernel is for the vmm backend (QEMU boots the bzImage)");
    }
    if spec.control.is_some() && spec.backend != Backend::Vmm {
        bail!("--control is for the vmm backend");
    }
    if !spec.block_options.is_empty() && spec.backend != Backend::Vmm {
        bail!("--block-option is for the vmm backend");
    }
    if spec.interceptors.is_some() && spec.backend != Backend::Vmm {
        bail!("--interceptors is for the vmm backend");
    }
    if spec.net.as_ref().is_some_and(|n| n.interceptors.is_some()) && spec.backend != Backend::Vmm {
        bail!("--net-interceptors is for the vmm backend");
    }
    if spec.net.as_ref().is_some_and(|n| n.vhost) && spec.backend == Backend::Vmm {
        bail!("vhost-net is a QEMU backend's");
    }
    if spec.vcpus == 0 || spec.mem_mib < 128 {
        bail!("a guest needs at least 1 vCPU and 128 MiB");
    }
    for d in &spec.data_disks {
        if !d.path.exists() {
            bail!("data disk {} does not exist", d.path.display());
        }
    }
    Ok(())
}

mod command;
mod diagnose;
pub use command::{kernel_cmdline, vmm_config};
use command::{qemu_command, vmm_command};
use diagnose::{hang_report, reap_killed, HangProbe, REAP_LIMIT};

#[cfg(test)]
mod tests;
