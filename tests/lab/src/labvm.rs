//! Runs a command inside the lab VM: QEMU in software emulation with an emulated AMD SVM
//! CPU, booting Debian's kernel with the real `kvm_amd`, the host's root filesystem over 9p
//! and a tmpfs on /tmp. The command runs chrooted into the host's filesystem, so the host's
//! binaries (our `vmm`, QEMU, this harness) run in there unchanged.

use crate::console::field;
use crate::lines::forward_lines;
use crate::paths;
use anyhow::{bail, Context, Result};
use std::io::{IsTerminal, Write};

/// Where a command inside the lab finds the input piped to the outer `lab` (a file).
pub const INPUT_ENV: &str = "VMM_LAB_INPUT";
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Prefix of the lab init's lines for the harness.
pub const LAB_MARKER: &str = "@@LAB@@";
/// The lab's tmpfs for disk images (TMPDIR of commands inside the lab). A dedicated path,
/// so a checkout under the host's /tmp stays visible.
pub const LAB_TMPFS: &str = "/tmp/.vmm-lab-tmpfs";
/// Set in the environment of commands running inside the lab.
pub const INSIDE_ENV: &str = "VMM_LAB_INSIDE";

#[derive(Clone, Debug)]
pub struct LabOptions {
    pub timeout: Duration,
    pub mem_mib: u32,
    pub cpus: u32,
    /// Connect the lab's console to this process's stdin (for `shell`).
    pub interactive: bool,
    /// Print the command's output as it comes (otherwise only collect it).
    pub echo: bool,
    /// Silence (no line, no heartbeat) after which the lab counts as wedged and the run is
    /// repeated (`VMM_LAB_SILENCE_S` overrides the default of 60 s).
    pub silence_limit: Duration,
    /// Time from start to the lab's `ready` line after which its boot counts as wedged and
    /// the run is repeated (`VMM_LAB_BOOT_S` overrides the default of 120 s; it is ready
    /// after about 4 s). Before `ready` there is no heartbeat, so silence cannot tell.
    pub boot_limit: Duration,
    /// Files the command changes (writable data disks): copied before the first attempt and
    /// put back before a retry, so a repeated run starts from what the first one saw.
    pub restore_on_retry: Vec<PathBuf>,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            timeout: Duration::from_secs(1800),
            mem_mib: 4096,
            cpus: 2,
            interactive: false,
            echo: true,
            silence_limit: Duration::from_secs(env_secs("VMM_LAB_SILENCE_S", 60)),
            boot_limit: Duration::from_secs(env_secs("VMM_LAB_BOOT_S", 120)),
            restore_on_retry: Vec::new(),
        }
    }
}

fn env_secs(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Clone, Debug)]
pub struct LabOutcome {
    /// The command's exit status; None when it never finished (timeout, lab failure).
    pub rc: Option<i32>,
    /// What the command printed (stdout and stderr).
    pub output: String,
    /// The lab's whole console, kept for diagnosis.
    pub console_log: PathBuf,
    /// Lab VM uptime when it was ready to run the command.
    pub ready_uptime_s: Option<f64>,
    pub wall: Duration,
    pub timed_out: bool,
    /// The lab VM's own kernel locked up or panicked (its console said so, or it fell silent,
    /// heartbeat included). Our code runs in the lab's userspace and cannot cause that: it
    /// is a fault of the emulated stack.
    pub lab_fault: Option<String>,
}

/// Runs per command when the lab VM's kernel faults (docs/lab.md, "Known limits").
pub const LAB_ATTEMPTS: usize = 3;

/// The lab's init prints this every 5 s while a command runs.
pub const LAB_HEARTBEAT: &str = "@@LAB@@ alive";
/// How long a silent lab has, after a byte on its console, to show it runs again.
const NUDGE_WAIT: Duration = Duration::from_secs(15);

/// Where lab-init leaves the heartbeat's PID (inside the lab), so a test can freeze it.
pub const LAB_HEARTBEAT_PID: &str = "/tmp/.vmm-lab-tmpfs/lab-heartbeat.pid";

/// True for a lab-kernel console line saying it locked up or panicked. Guest consoles reach
/// the lab console prefixed (`guest| `), so only the lab kernel's own lines match.
pub fn is_lab_kernel_fault(line: &str) -> bool {
    line.starts_with('[')
        && [
            "watchdog: BUG: soft lockup",
            "rcu: INFO: rcu_preempt self-detected stall",
            "rcu: INFO: rcu_preempt detected stalls",
            "Kernel panic - not syncing",
        ]
        .iter()
        .any(|m| line.contains(m))
}

/// Quotes a word for bash.
pub fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

fn run_dir() -> Result<PathBuf> {
    run_dir_named("")
}

/// A fresh directory under build/lab-runs (host disk, where the host sees what the lab
/// wrote), its name a time stamp, our PID and `suffix`.
fn run_dir_named(suffix: &str) -> Result<PathBuf> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let dir = paths::build_dir()
        .join("lab-runs")
        .join(format!("{stamp}-{}{suffix}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::canonicalize(&dir).context("canonicalizing the lab run directory")
}

fn write_script(dir: &Path, argv: &[String], env: &[(String, String)]) -> Result<()> {
    let cwd = std::env::current_dir().context("current directory")?;
    let mut s = String::from("#!/bin/bash\n");
    s.push_str("export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n");
    s.push_str(&format!("export HOME=/root TMPDIR={LAB_TMPFS}\n"));
    s.push_str(&format!("export {INSIDE_ENV}=1\n"));
    for (k, v) in env {
        s.push_str(&format!("export {k}={}\n", shell_quote(v)));
    }
    s.push_str(&format!("cd {}\n", shell_quote(&cwd.to_string_lossy())));
    let words: Vec<String> = argv.iter().map(|a| shell_quote(a)).collect();
    s.push_str(&format!("exec {}\n", words.join(" ")));
    std::fs::write(dir.join("cmd.sh"), s).context("writing cmd.sh")
}

/// Runs `argv` inside the lab VM and waits for it (or for the time limit). When the lab
/// VM's own kernel faults before the command has finished, the run is repeated (up to
/// LAB_ATTEMPTS), loudly, from the same files (`restore_on_retry`); a command that fails,
/// or one that finished before the fault, is never repeated.
pub fn run_in_lab(
    argv: &[String],
    env: &[(String, String)],
    opts: &LabOptions,
) -> Result<LabOutcome> {
    let snapshot = Snapshot::take(&opts.restore_on_retry)?;
    for attempt in 1..=LAB_ATTEMPTS {
        if attempt > 1 {
            snapshot.restore()?;
        }
        let out = run_once(argv, env, opts)?;
        let Some(fault) = &out.lab_fault else {
            return Ok(out);
        };
        eprintln!(
            "lab: RETRY: the lab VM's own kernel faulted ({fault}) on attempt {attempt} of \
             {LAB_ATTEMPTS}, before the command finished; a fault of the emulated SVM stack \
             (docs/lab.md), not of the command. {}Console: {}",
            if snapshot.files.is_empty() || attempt == LAB_ATTEMPTS {
                String::new()
            } else {
                format!(
                    "Its {} changed file(s) are put back as they were. ",
                    snapshot.files.len()
                )
            },
            out.console_log.display()
        );
    }
    bail!("lab: the lab VM's kernel faulted on all {LAB_ATTEMPTS} attempts")
}

/// Copies of files taken before a command's first attempt; removed when dropped.
struct Snapshot {
    dir: Option<PathBuf>,
    /// (the file, its copy)
    files: Vec<(PathBuf, PathBuf)>,
}

impl Snapshot {
    fn take(paths: &[PathBuf]) -> Result<Snapshot> {
        let mut snap = Snapshot {
            dir: None,
            files: Vec::new(),
        };
        if paths.is_empty() {
            return Ok(snap);
        }
        // Named so that no attempt's own directory can be it.
        let dir = run_dir_named("-before-retry")?;
        snap.dir = Some(dir.clone());
        for (i, p) in paths.iter().enumerate() {
            let copy = dir.join(format!("{i}.img"));
            sparse_copy(p, &copy)?;
            snap.files.push((p.clone(), copy));
        }
        Ok(snap)
    }

    fn restore(&self) -> Result<()> {
        for (p, copy) in &self.files {
            sparse_copy(copy, p)?;
        }
        Ok(())
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Copies `from` over `to` keeping holes (images are sparse; a plain copy would fill them).
fn sparse_copy(from: &Path, to: &Path) -> Result<()> {
    let status = Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .status()
        .context("running cp")?;
    if !status.success() {
        bail!("cp {} {}: {status}", from.display(), to.display());
    }
    Ok(())
}

fn run_once(argv: &[String], env: &[(String, String)], opts: &LabOptions) -> Result<LabOutcome> {
    if argv.is_empty() {
        bail!("no command to run in the lab");
    }
    let image = paths::lab_image()?;
    let dir = run_dir()?;
    // Input piped in (a script, not a person) goes in a file beside the command instead of
    // through the lab's console, where early bytes are lost: the command inside reads it
    // from there and hands it to its guest once the guest is ready (guest.rs).
    let piped = opts.interactive && !std::io::stdin().is_terminal();
    let mut env = env.to_vec();
    if piped {
        let input = dir.join("input");
        std::fs::write(&input, crate::guest::piped_input()).context("writing the input")?;
        env.push((INPUT_ENV.to_string(), input.to_string_lossy().into_owned()));
    }
    write_script(&dir, argv, &env)?;
    let console_log = dir.join("console.log");
    let mut log = std::fs::File::create(&console_log).context("creating console.log")?;

    // no5lvl: -cpu max offers LA57 under TCG, and nested SVM under emulated 5-level paging
    // wedged or crashed the lab VM in about one guest boot in five (docs/lab.md).
    let mut append = format!(
        "console=ttyS0 panic=-1 quiet no5lvl lab.run={}",
        dir.display()
    );
    // Parameters for the lab's kvm_amd, comma-separated; VMM_LAB_KVM overrides (empty: none).
    // npt=0: with nested paging emulated by TCG, guest I/O hung in about 2 of 7 fio runs;
    // with shadow paging 8 of 8 passed at the same speed (docs/lab.md).
    let params = std::env::var("VMM_LAB_KVM").unwrap_or_else(|_| "npt=0".to_string());
    if !params.is_empty() {
        append.push_str(&format!(" lab.kvm={params}"));
    }
    // VMM_LAB_CMDLINE: more parameters for the lab kernel (e.g. `tsc=reliable`, to test
    // whether its unstable TSC matters: docs/lab.md, "The halted guest").
    if let Ok(extra) = std::env::var("VMM_LAB_CMDLINE") {
        for word in extra.split_whitespace() {
            append.push(' ');
            append.push_str(word);
        }
    }
    // VMM_LAB_ACCEL: QEMU's -accel value for the lab VM (e.g. "tcg,thread=single").
    let accel = std::env::var("VMM_LAB_ACCEL").unwrap_or_else(|_| "tcg".to_string());
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", &accel, "-cpu", "max"])
        .args(crate::qemu_base_args(opts.cpus, opts.mem_mib))
        .arg("-kernel")
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initrd)
        .args(["-append", &append])
        .args([
            "-virtfs",
            "local,path=/,mount_tag=host,security_model=passthrough,id=host,multidevs=remap",
        ])
        // Otherwise the lab's console input is a pipe the harness holds: a lab that falls
        // silent gets a byte there (an interrupt) before it counts as wedged.
        .stdin(if opts.interactive && !piped {
            Stdio::inherit()
        } else {
            Stdio::piped()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .context("cannot start qemu-system-x86_64 for the lab VM (run scripts/setup.sh)")?;
    let mut console_in = child.stdin.take();
    // When the lab fell silent and was sent a byte on its console.
    let mut nudged: Option<Instant> = None;
    let (tx, rx) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        forward_lines(out, tx.clone());
    }
    if let Some(err) = child.stderr.take() {
        forward_lines(err, tx);
    }

    let mut outcome = LabOutcome {
        rc: None,
        output: String::new(),
        console_log: console_log.clone(),
        ready_uptime_s: None,
        wall: Duration::ZERO,
        timed_out: false,
        lab_fault: None,
    };
    let mut inside = false;
    let mut lab_error = None;
    let mut last_line = Instant::now();
    let stdout = std::io::stdout();
    loop {
        let left = opts.timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            outcome.timed_out = true;
            let _ = child.kill();
            break;
        }
        // Not ready long after a boot that takes seconds: the lab kernel wedged before its
        // init ran (a CI run of 2026-12-03 sat out a 600 s limit with an empty console).
        if outcome.ready_uptime_s.is_none() && start.elapsed() > opts.boot_limit {
            outcome.lab_fault = Some(format!(
                "not ready after {} s: its boot is wedged",
                opts.boot_limit.as_secs()
            ));
            let _ = child.kill();
            break;
        }
        let line = match rx.recv_timeout(left.min(Duration::from_secs(1))) {
            // A blank line is no sign of life: the lab's console echoes the byte it is sent.
            Ok((_, line)) if line.trim().is_empty() => continue,
            Ok((at, line)) => {
                last_line = at;
                if let Some(when) = nudged.take() {
                    let text = format!(
                        "lab: the lab VM ran again {:.1} s after a byte on its console, silent \
                         {} s before it: its CPUs were idle, waiting for a timer interrupt that \
                         did not come (docs/lab.md, \"The halted guest\")",
                        when.elapsed().as_secs_f64(),
                        opts.silence_limit.as_secs()
                    );
                    eprintln!("{text}");
                    let _ = writeln!(log, "{text}");
                }
                line
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // Nothing printed, not even the heartbeat: the lab kernel is stuck, and waiting
                // for the time limit would only waste it.
                if outcome.ready_uptime_s.is_some() && last_line.elapsed() > opts.silence_limit {
                    if outcome.rc.is_some() {
                        // The command had finished; only the lab's shutdown is stuck.
                        let _ = child.kill();
                        break;
                    }
                    // First an interrupt: a lab whose CPUs only wait for a lost timer
                    // interrupt runs on after it; one that does not is wedged.
                    if nudged.is_none() {
                        if let Some(pipe) = console_in.as_mut() {
                            if pipe.write_all(b"\n").and_then(|_| pipe.flush()).is_ok() {
                                nudged = Some(Instant::now());
                                continue;
                            }
                        }
                    }
                    if nudged.is_some_and(|n| n.elapsed() < NUDGE_WAIT) {
                        continue;
                    }
                    outcome.lab_fault = Some(format!(
                        "no output for {} s, not even its heartbeat, nor {} s after a byte on its console: its kernel is wedged",
                        opts.silence_limit.as_secs(),
                        NUDGE_WAIT.as_secs()
                    ));
                    let _ = child.kill();
                    break;
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        if line.contains(LAB_HEARTBEAT) {
            continue;
        }
        let _ = writeln!(log, "{line}");
        if is_lab_kernel_fault(&line) {
            // After the command's end marker its result is whole: keep it, do not repeat it.
            if outcome.rc.is_some() {
                eprintln!(
                    "lab: the lab VM's kernel faulted ({line}) after the command had finished; \
                     its result stands"
                );
            } else {
                outcome.lab_fault = Some(line.clone());
            }
            let _ = child.kill();
            break;
        }
        match line.find(LAB_MARKER) {
            Some(pos) if inside && line[pos..].starts_with("@@LAB@@ end") => {
                let before = &line[..pos];
                if !before.is_empty() {
                    outcome.output.push_str(before);
                    outcome.output.push('\n');
                }
                outcome.rc = field(&line[pos..], "rc").and_then(|v| v.parse().ok());
                inside = false;
            }
            Some(pos) if !inside => {
                let rest = &line[pos + LAB_MARKER.len()..];
                if rest.trim_start().starts_with("ready") {
                    outcome.ready_uptime_s = field(rest, "uptime").and_then(|v| v.parse().ok());
                    if field(rest, "kvm") == Some("no") {
                        lab_error =
                            Some("the lab VM has no /dev/kvm (kvm_amd did not load)".to_string());
                    }
                } else if rest.trim_start().starts_with("begin") {
                    inside = true;
                } else if let Some(msg) = rest.trim_start().strip_prefix("error") {
                    lab_error = Some(msg.trim().to_string());
                }
            }
            _ if inside => {
                if opts.echo {
                    let mut out = stdout.lock();
                    let _ = writeln!(out, "{line}");
                    let _ = out.flush();
                }
                outcome.output.push_str(&line);
                outcome.output.push('\n');
            }
            _ => {}
        }
    }
    let _ = child.wait();
    outcome.wall = start.elapsed();
    if outcome.rc.is_none() && outcome.lab_fault.is_none() {
        let console = std::fs::read_to_string(&console_log).unwrap_or_default();
        let tail: Vec<&str> = console.lines().rev().take(25).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        let why = if outcome.timed_out {
            format!("timed out after {:?}", opts.timeout)
        } else if let Some(e) = lab_error {
            e
        } else {
            "the lab VM stopped before the command finished".to_string()
        };
        bail!(
            "lab: {why}; console log {}; its last lines:\n{}",
            console_log.display(),
            tail.join("\n")
        );
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_quotes_and_spaces() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn lab_kernel_faults_are_recognized_but_not_guest_lines() {
        for l in [
            "[  768.944345] watchdog: BUG: soft lockup - CPU#0 stuck for 693s! [qemu-system-x86:134]",
            "[  805.233102] rcu: INFO: rcu_preempt self-detected stall on CPU",
            "[   84.816588] Kernel panic - not syncing: Fatal exception in interrupt",
        ] {
            assert!(is_lab_kernel_fault(l), "{l}");
        }
        for l in [
            "guest| [   12.1] watchdog: BUG: soft lockup - CPU#0 stuck for 23s!",
            "[    6.3] kvm [124]: vcpu0, guest rIP: 0xffffffff81002ad6 Unhandled WRMSR",
            "Kernel panic - not syncing: printed by a command",
        ] {
            assert!(!is_lab_kernel_fault(l), "{l}");
        }
    }

    #[test]
    fn fields_are_read_from_marker_lines() {
        assert_eq!(field("@@LAB@@ end rc=17", "rc"), Some("17"));
        assert_eq!(
            field("@@LAB@@ ready uptime=3.2 kvm=yes", "kvm"),
            Some("yes")
        );
        assert_eq!(field("@@LAB@@ ready", "kvm"), None);
    }
}
