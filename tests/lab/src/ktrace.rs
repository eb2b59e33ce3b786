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

/// A trace being recorded; stopped when dropped.
pub struct KvmTrace {
    root: PathBuf,
}

impl KvmTrace {
    /// Starts recording, from an empty buffer, when asked for inside the lab.
    pub fn start() -> Option<KvmTrace> {
        if std::env::var(ENV).ok().as_deref() != Some("1")
            || std::env::var_os(crate::labvm::INSIDE_ENV).is_none()
        {
            return None;
        }
        let root = Path::new(TRACEFS);
        if !root.join("events").exists() {
            let (src, dst, fs) = (c"tracefs", c"/sys/kernel/tracing", c"tracefs");
            // SAFETY: NUL-terminated literals; no data argument.
            unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) };
        }
        let trace = KvmTrace {
            root: root.to_path_buf(),
        };
        match trace.arm() {
            Ok(()) => Some(trace),
            Err(e) => {
                eprintln!("lab: no KVM trace for this run: {e}");
                trace.disarm();
                None
            }
        }
    }

    fn write(&self, file: &str, value: &str) -> std::io::Result<()> {
        std::fs::write(self.root.join(file), value)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{file}: {e}")))
    }

    fn arm(&self) -> std::io::Result<()> {
        self.write("tracing_on", "0")?;
        self.write("buffer_size_kb", "512")?;
        self.write("trace", "")?;
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

    /// Empties the buffer and records again: what comes after says whether the guest ran.
    pub fn restart(&self) {
        let _ = self.write("tracing_on", "0");
        let _ = self.write("trace", "");
        let _ = self.write("tracing_on", "1");
    }

    /// The event lines recorded since the start or the last [`KvmTrace::restart`], up to
    /// `lines` of the first ones (tracing goes on).
    pub fn first_events(&self, lines: usize) -> Vec<String> {
        match std::fs::read_to_string(self.root.join("trace")) {
            Ok(text) => text
                .lines()
                .filter(|l| !l.starts_with('#'))
                .take(lines)
                .map(str::to_string)
                .collect(),
            Err(_) => Vec::new(),
        }
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

    /// The last `lines` events recorded (tracing stops first, so they are the last ones
    /// before the harness asked).
    pub fn tail(&self, lines: usize) -> String {
        let _ = self.write("tracing_on", "0");
        match std::fs::read_to_string(self.root.join("trace")) {
            Ok(text) => last_events(&text, lines),
            Err(e) => format!("(reading the trace: {e})"),
        }
    }
}

impl Drop for KvmTrace {
    fn drop(&mut self) {
        self.disarm();
    }
}

/// The last `n` event lines of a trace file (its `#` header left out), and what the
/// TSC-deadline writes among them mean.
fn last_events(text: &str, n: usize) -> String {
    let events: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    if events.is_empty() {
        return "(no events recorded)".to_string();
    }
    let tail = &events[events.len().saturating_sub(n)..];
    let mut out = tail.join("\n");
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

    #[test]
    fn the_tail_keeps_the_last_events_and_names_the_last_deadline() {
        let text = "# tracer: nop\n#\n\
            vcpu0-1 [000] 1.0: kvm_msr: msr_write 6e0 = 0x1234\n\
            vcpu0-1 [000] 1.1: kvm_inj_virq: IRQ 0xec\n\
            vcpu0-1 [000] 1.2: kvm_msr: msr_write 6e0 = 0x5678\n\
            vcpu0-1 [000] 1.3: kvm_vcpu_wakeup: wait time 10 ns, polling valid\n";
        let out = last_events(text, 2);
        assert!(!out.contains("0x1234 "), "{out}");
        assert!(out.contains("kvm_vcpu_wakeup"));
        assert!(out.ends_with("last TSC-deadline write: 0x5678 (0 disarms the timer)"));
        assert_eq!(last_events("# tracer: nop\n", 5), "(no events recorded)");
    }

    #[test]
    fn outside_the_lab_or_unasked_nothing_is_traced() {
        // The test process is neither inside the lab nor asked (ENV unset in unit tests).
        if std::env::var_os(crate::labvm::INSIDE_ENV).is_none() {
            assert!(KvmTrace::start().is_none());
        }
    }
}
