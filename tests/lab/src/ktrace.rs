//! KVM's trace events while a guest runs in the lab, for the report of a guest that runs
//! past its limit: the vCPU's last writes of its TSC-deadline timer, the interrupts its
//! local APIC accepted and KVM injected, the guest's EOIs (also the paravirtual ones), the
//! vCPU's wake-ups from halt, rewrites of its TSC offset and kvmclock, and asynchronous
//! page faults. A guest that hangs with every device queue answered and its vCPU halted
//! waits for an interrupt that never comes; these events say whether its timer was set,
//! to when, and whether KVM delivered it.
//!
//! Only inside the lab VM (the machine is ours alone) and only when `VMM_LAB_KVM_TRACE=1`
//! (scripts/test.sh sets it): tracing costs the emulated CPU, so benches run without it.
//! Each guest records in a tracefs instance of its own, limited to its VMM's vCPU threads,
//! so that two guests at once keep their histories apart.
//! Anything that fails (no tracefs, an event this kernel lacks) leaves tracing off and the
//! run goes on.

use std::path::{Path, PathBuf};

/// The variable that turns the trace on.
pub const ENV: &str = "VMM_LAB_KVM_TRACE";

const TRACEFS: &str = "/sys/kernel/tracing";

/// MSR_IA32_TSC_DEADLINE: a guest arms its local APIC timer by writing it.
const TSC_DEADLINE_MSR: u32 = 0x6e0;

/// The events recorded, with their filters. An event this kernel lacks is left out.
const EVENTS: [(&str, Option<&str>); 11] = [
    ("kvm/kvm_msr", Some("ecx == 0x6e0")),
    ("kvm/kvm_apic_accept_irq", None),
    ("kvm/kvm_inj_virq", None),
    ("kvm/kvm_eoi", None),
    ("kvm/kvm_pv_eoi", None),
    ("kvm/kvm_vcpu_wakeup", None),
    ("kvm/kvm_write_tsc_offset", None),
    ("kvm/kvm_pvclock_update", None),
    ("kvm/kvm_async_pf_not_present", None),
    ("kvm/kvm_async_pf_ready", None),
    ("kvm/kvm_async_pf_completed", None),
];

/// Traces started by this process so far (each guest's instance gets its own name).
static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A guest's own trace: a tracefs instance (its own buffer) that records only its VMM's
/// vCPU threads, so that two guests of one lab session (`lab soak --parallel 2`) keep
/// their histories apart. Removed when dropped.
pub struct KvmTrace {
    root: PathBuf,
}

impl KvmTrace {
    /// Starts an empty trace when asked for inside the lab; [`KvmTrace::follow`] names the
    /// VMM whose vCPUs it records.
    pub fn start() -> Option<KvmTrace> {
        if std::env::var(ENV).ok().as_deref() != Some("1")
            || std::env::var_os(crate::labvm::INSIDE_ENV).is_none()
        {
            return None;
        }
        let top = Path::new(TRACEFS);
        if !top.join("instances").exists() {
            let (src, dst, fs) = (c"tracefs", c"/sys/kernel/tracing", c"tracefs");
            // SAFETY: NUL-terminated literals; no data argument.
            unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) };
        }
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let root = top
            .join("instances")
            .join(format!("vmm-lab-{}-{n}", std::process::id()));
        if let Err(e) = std::fs::create_dir(&root) {
            eprintln!("lab: no KVM trace for this run: {}: {e}", root.display());
            return None;
        }
        let trace = KvmTrace { root };
        match trace.arm() {
            Ok(()) => Some(trace),
            Err(e) => {
                eprintln!("lab: no KVM trace for this run: {e}");
                None
            }
        }
    }

    /// Records the vCPU threads of process `pid` from when they appear (looked for on a
    /// thread of its own for up to 60 s; a vCPU started later than the first is added
    /// within that time).
    pub fn follow(&self, pid: u32) {
        let file = self.root.join("set_event_pid");
        std::thread::spawn(move || {
            let mut known: Vec<u32> = Vec::new();
            let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while std::time::Instant::now() < until {
                for tid in vcpu_threads(pid) {
                    if !known.contains(&tid) {
                        let mut f = match std::fs::OpenOptions::new().append(true).open(&file) {
                            Ok(f) => f,
                            Err(_) => return,
                        };
                        let _ = std::io::Write::write_all(&mut f, format!("{tid} ").as_bytes());
                        known.push(tid);
                    }
                }
                if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        });
    }

    fn write(&self, file: &str, value: &str) -> std::io::Result<()> {
        std::fs::write(self.root.join(file), value)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{file}: {e}")))
    }

    fn arm(&self) -> std::io::Result<()> {
        self.write("tracing_on", "0")?;
        self.write("buffer_size_kb", "1024")?;
        // Nothing until follow() names the vCPU threads: this process fires none of these
        // events.
        self.write("set_event_pid", &std::process::id().to_string())?;
        let mut armed = 0;
        for (event, filter) in EVENTS {
            if !self.root.join("events").join(event).exists() {
                continue;
            }
            if let Some(f) = filter {
                self.write(&format!("events/{event}/filter"), f)?;
            }
            self.write(&format!("events/{event}/enable"), "1")?;
            armed += 1;
        }
        if armed == 0 {
            return Err(std::io::Error::other("none of KVM's trace events exist"));
        }
        self.write("tracing_on", "1")
    }

    fn disarm(&self) {
        let _ = self.write("tracing_on", "0");
        for (event, filter) in EVENTS {
            let _ = self.write(&format!("events/{event}/enable"), "0");
            if filter.is_some() {
                let _ = self.write(&format!("events/{event}/filter"), "0");
            }
        }
    }

    fn events(&self) -> Result<Vec<String>, String> {
        std::fs::read_to_string(self.root.join("trace"))
            .map(|text| {
                text.lines()
                    .filter(|l| !l.starts_with('#'))
                    .map(str::to_string)
                    .collect()
            })
            .map_err(|e| format!("(reading the trace: {e})"))
    }

    /// The last `lines` events of the VMM whose vCPU threads are `vcpus` (their events,
    /// and the events of kernel workers, which inject a device's interrupts for any VM),
    /// and its last TSC-deadline write. Tracing goes on.
    pub fn tail(&self, lines: usize, vcpus: &[u32]) -> String {
        match self.events() {
            Ok(events) => last_events(&events, lines, vcpus),
            Err(e) => e,
        }
    }

    /// Where the trace stands now: [`KvmTrace::since`] gives what comes after.
    pub fn mark(&self) -> Option<f64> {
        self.events().ok()?.iter().rev().find_map(|l| timestamp(l))
    }

    /// The events of `vcpus` after `mark`, at most `lines` of the first ones.
    pub fn since(&self, mark: Option<f64>, vcpus: &[u32], lines: usize) -> Vec<String> {
        let Ok(events) = self.events() else {
            return Vec::new();
        };
        events_after(events, mark, vcpus, lines)
    }
}

impl Drop for KvmTrace {
    fn drop(&mut self) {
        self.disarm();
        let _ = std::fs::remove_dir(&self.root);
    }
}

/// The thread id of an event line's task (`   vcpu0-144     [001] ...`; a QEMU thread's
/// name has spaces: `CPU 0/KVM-3012 [000] ...`).
fn task_tid(line: &str) -> Option<u32> {
    let task = line.split(" [").next()?.trim();
    task.rsplit_once('-')?.1.parse().ok()
}

/// An event line's time stamp in seconds (`... [001] .....    49.284793: kvm_...`).
fn timestamp(line: &str) -> Option<f64> {
    let after_cpu = line.split_once("] ")?.1;
    let (head, _) = after_cpu.split_once(": ")?;
    head.split_whitespace().last()?.parse().ok()
}

/// The thread ids of a process's vCPU threads (vmm's `vcpuN`, QEMU's `CPU N/KVM`).
pub fn vcpu_threads(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|t| {
            let tid: u32 = t.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            let comm = comm.trim();
            (comm.starts_with("vcpu") || comm.ends_with("/KVM")).then_some(tid)
        })
        .collect()
}

/// The events of `vcpus` after `mark` (all when `mark` is None), at most `lines`.
fn events_after(
    events: Vec<String>,
    mark: Option<f64>,
    vcpus: &[u32],
    lines: usize,
) -> Vec<String> {
    events
        .into_iter()
        .filter(|l| mark.is_none_or(|m| timestamp(l).is_some_and(|t| t > m)))
        .filter(|l| task_tid(l).is_some_and(|t| vcpus.contains(&t)))
        .take(lines)
        .collect()
}

/// The last `n` event lines of `vcpus` and the kernel's workers (all of them when `vcpus`
/// is empty), and what the last TSC-deadline write of `vcpus` means.
fn last_events(events: &[String], n: usize, vcpus: &[u32]) -> String {
    let ours = |l: &&String| {
        vcpus.is_empty()
            || task_tid(l).is_some_and(|t| vcpus.contains(&t))
            || l.trim_start().starts_with("kworker")
    };
    let events: Vec<&String> = events.iter().filter(ours).collect();
    if events.is_empty() {
        return "(no events recorded)".to_string();
    }
    let tail = &events[events.len().saturating_sub(n)..];
    let mut out = tail
        .iter()
        .map(|l| l.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    let msr = format!("msr_write {TSC_DEADLINE_MSR:x} = ");
    if let Some(last) = events.iter().rev().find(|l| l.contains(&msr)) {
        let value = last.split(&msr).nth(1).unwrap_or("").trim();
        out.push_str(&format!(
            "\nlast TSC-deadline write: {value} (0 disarms the timer)"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn the_tail_keeps_the_last_events_and_names_the_last_deadline() {
        let text = "# tracer: nop\n#\n\
            vcpu0-1 [000] 1.0: kvm_msr: msr_write 6e0 = 0x1234\n\
            vcpu0-1 [000] 1.1: kvm_inj_virq: IRQ 0xec\n\
            vcpu0-1 [000] 1.2: kvm_msr: msr_write 6e0 = 0x5678\n\
            vcpu0-1 [000] 1.3: kvm_vcpu_wakeup: wait time 10 ns, polling valid\n";
        let out = last_events(&lines(text), 2, &[]);
        assert!(!out.contains("0x1234 "), "{out}");
        assert!(out.contains("kvm_vcpu_wakeup"));
        assert!(out.ends_with("last TSC-deadline write: 0x5678 (0 disarms the timer)"));
        assert_eq!(last_events(&[], 5, &[]), "(no events recorded)");
    }

    #[test]
    fn with_two_guests_each_report_keeps_its_own_vcpu_and_the_kernels_workers() {
        let text = "           vcpu0-144     [001] .....    49.10: kvm_msr: msr_write 6e0 = 0x11\n\
            CPU 0/KVM-3012 [000] .....    49.20: kvm_msr: msr_write 6e0 = 0x22\n\
            kworker/1:1-35      [001] ...1.    49.30: kvm_apic_accept_irq: apicid 0 vec 34\n\
            vcpu0-144     [001] .....    49.40: kvm_inj_virq: IRQ 0x22\n";
        let ev = lines(text);
        assert_eq!(task_tid(&ev[1]), Some(3012));
        assert_eq!(timestamp(&ev[2]), Some(49.30));
        let ours = last_events(&ev, 10, &[144]);
        assert!(
            !ours.contains("CPU 0/KVM") && ours.contains("kworker"),
            "{ours}"
        );
        assert!(ours.ends_with("last TSC-deadline write: 0x11 (0 disarms the timer)"));
        let qemu = last_events(&ev, 10, &[3012]);
        assert!(qemu.ends_with("last TSC-deadline write: 0x22 (0 disarms the timer)"));
        // After a mark, only the later events of the named vCPU.
        let after = events_after(ev.clone(), Some(49.15), &[144], 10);
        assert_eq!(after.len(), 1);
        assert!(after[0].contains("kvm_inj_virq"));
    }

    #[test]
    fn outside_the_lab_or_unasked_nothing_is_traced() {
        // The test process is neither inside the lab nor asked (ENV unset in unit tests).
        if std::env::var_os(crate::labvm::INSIDE_ENV).is_none() {
            assert!(KvmTrace::start().is_none());
        }
    }
}
