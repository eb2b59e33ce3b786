//! What a guest that ran past its limit was doing, read before its VMM is killed, in an
//! order that disturbs it as little as possible for as long as possible: the VMM's threads
//! (from /proc), KVM's VM-wide state (vmm's `GET /vm/kvm`: the IOAPIC's pins, the PICs,
//! the clock), the devices' queues, KVM's last events (ktrace.rs); then each vCPU, which
//! leaves KVM_RUN to be read (`GET /vm/vcpus`: its LAPIC, timer MSRs, RIP and RFLAGS);
//! then a byte on the serial input, an interrupt. After each of the last two steps the
//! harness watches for a sign that the guest ran (a console line, or KVM injecting an
//! interrupt or seeing a timer write) and says which step woke it, if any.

use super::*;
use crate::ktrace::KvmTrace;
use serde_json::Value;
use std::process::ChildStdin;

/// How long a killed VMM may take to exit before the harness goes on without it.
pub(super) const REAP_LIMIT: Duration = Duration::from_secs(30);

/// How long the harness watches for the guest to run after a step that may wake it.
const WATCH: Duration = Duration::from_secs(3);

/// Waits for a killed VMM; `None` if it is still there after [`REAP_LIMIT`] (stuck in the
/// kernel: the run is reported, not waited on forever).
pub(super) fn reap_killed(
    child: &mut std::process::Child,
) -> Result<Option<std::process::ExitStatus>> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().context("waiting for the VMM")? {
            return Ok(Some(status));
        }
        if start.elapsed() > REAP_LIMIT {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `f` on a thread of its own and gives it `limit`: a process that does not answer
/// cannot hold up the kill.
fn bounded<T: Send + 'static>(
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).ok()
}

/// Where the report's steps reach the guest.
pub(super) struct HangProbe<'a> {
    pub pid: u32,
    pub backend: &'static str,
    /// vmm's API (None for QEMU).
    pub sock: Option<PathBuf>,
    pub trace: Option<&'a KvmTrace>,
    /// The guest's serial input (the VMM's stdin).
    pub serial: Option<&'a mut ChildStdin>,
    /// The console's lines as they come.
    pub lines: &'a mpsc::Receiver<(Instant, String)>,
}

/// The report of a guest past its limit: one section per step, in the order taken; the
/// last says which step woke the guest, if any.
pub(super) fn hang_report(p: HangProbe<'_>, transcript: &mut String) -> Vec<String> {
    let mut out = Vec::new();
    let pid = p.pid;
    // Its vCPU threads' events, out of a trace another guest may share.
    let vcpus = crate::ktrace::vcpu_threads(pid);
    let threads = bounded(Duration::from_secs(20), move || {
        crate::threads::snapshot(pid)
    })
    .unwrap_or_else(|| "(reading /proc took over 20 s)".into());
    out.push(format!(
        "{}'s threads when it was stopped (tid name state wchan syscall cpu last_cpu):\n{threads}",
        p.backend
    ));
    // The lab kernel's own timers: a halted vCPU's deadline is an hrtimer on the lab CPU
    // its thread last ran on.
    let timers = bounded(Duration::from_secs(10), crate::timers::snapshot)
        .unwrap_or_else(|| "(reading /proc/timer_list took over 10 s)".into());
    out.push(format!(
        "the {}'s timers (/proc/timer_list: per CPU, the active timer due first and the clock event device's next event):\n{timers}",
        if std::env::var_os(crate::labvm::INSIDE_ENV).is_some() { "lab kernel" } else { "host kernel" }
    ));
    if let Some(sock) = p.sock.clone() {
        let s = sock.clone();
        let kvm = bounded(Duration::from_secs(10), move || {
            crate::control::get(&s, "/vm/kvm")
        });
        out.push(format!(
            "KVM's VM-wide state, read first (GET /vm/kvm: IOAPIC pins set up or pending, \
             PICs, clock):\n{}",
            answer(kvm)
        ));
        let queues = bounded(Duration::from_secs(20), move || queue_figures(&sock))
            .unwrap_or_else(|| "(the API did not answer in 20 s)".into());
        out.push(format!("vmm's devices when it was stopped:\n{queues}"));
    }
    if let Some(trace) = p.trace {
        out.push(format!(
            "KVM's last events before it was stopped (TSC-deadline writes, interrupts \
             accepted and injected, EOIs, wake-ups from halt, TSC offset and kvmclock \
             updates, async page faults; {}):\n{}",
            crate::ktrace::ENV,
            trace.tail(60, &vcpus)
        ));
    }
    let mark = p.trace.and_then(KvmTrace::mark);
    let seen = Watch {
        trace: p.trace,
        mark,
        vcpus: &vcpus,
        lines: p.lines,
    };
    let mut woke = None;
    if let Some(sock) = p.sock.clone() {
        let vcpus = bounded(Duration::from_secs(10), move || {
            crate::control::get(&sock, "/vm/vcpus")
        });
        out.push(format!(
            "vmm's vCPUs, each kicked out of KVM_RUN to be read (GET /vm/vcpus):\n{}",
            vcpu_lines(vcpus)
        ));
        woke = seen.watch(transcript).map(|w| ("its vCPU left KVM_RUN", w));
    }
    if woke.is_none() {
        if let Some(pipe) = p.serial {
            let sent = pipe.write_all(b"\n").and_then(|_| pipe.flush());
            if sent.is_ok() {
                woke = seen
                    .watch(transcript)
                    .map(|w| ("a byte on its serial input", w));
            }
        }
    }
    out.push(match woke {
        Some((step, sign)) => format!("the guest ran again after {step}: {sign}"),
        None => format!(
            "the guest did not run again: not after {}a byte on its serial input \
             ({} s watched after each)",
            if p.sock.is_some() {
                "its vCPU left KVM_RUN, nor after "
            } else {
                ""
            },
            WATCH.as_secs()
        ),
    });
    out
}

/// What shows that the guest ran again after a step.
struct Watch<'a> {
    trace: Option<&'a KvmTrace>,
    /// Where the trace stood before the first step.
    mark: Option<f64>,
    /// The VMM's vCPU threads (whose events count).
    vcpus: &'a [u32],
    lines: &'a mpsc::Receiver<(Instant, String)>,
}

impl Watch<'_> {
    /// Watches for [`WATCH`]: the first console line, or KVM events of this VMM's vCPUs that
    /// only a running guest causes (a timer write, an injected interrupt, an EOI). Kicks and
    /// re-entries alone (wake-ups, TSC offset and kvmclock updates) do not count.
    fn watch(&self, transcript: &mut String) -> Option<String> {
        let until = Instant::now() + WATCH;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            if let Ok((_, line)) = self
                .lines
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                transcript.push_str(&line);
                transcript.push('\n');
                return Some(format!("the console printed {line:?}"));
            }
            if let Some(t) = self.trace {
                let ran: Vec<String> = t
                    .since(self.mark, self.vcpus, 400)
                    .into_iter()
                    .filter(|l| {
                        ["kvm_msr:", "kvm_inj_virq:", "kvm_eoi:", "kvm_pv_eoi:"]
                            .iter()
                            .any(|e| l.contains(e))
                    })
                    .take(4)
                    .collect();
                if !ran.is_empty() {
                    return Some(format!("KVM saw it run:\n{}", ran.join("\n")));
                }
            }
        }
        None
    }
}

fn answer(v: Option<Result<Value, String>>) -> String {
    match v {
        None => "(the API did not answer in 10 s)".into(),
        Some(Err(e)) => format!("({e})"),
        Some(Ok(v)) => v.to_string(),
    }
}

/// One summary line per vCPU (what decides whether it can wake), then its whole state.
fn vcpu_lines(v: Option<Result<Value, String>>) -> String {
    let Some(Ok(Value::Array(vcpus))) = v else {
        return answer(v);
    };
    let mut out = String::new();
    for c in &vcpus {
        let l = &c["lapic"];
        out.push_str(&format!(
            "vcpu{}: {} rip={} IF={} timer={} {} masked={} deadline-tsc={} irr={} isr={}\n  {c}\n",
            c["id"],
            c["mp_state"].as_str().unwrap_or("?"),
            c["rip"].as_str().unwrap_or("?"),
            c["interrupts_enabled"],
            l["lvt_timer"]["mode"].as_str().unwrap_or("?"),
            l["lvt_timer"]["vector"].as_str().unwrap_or("?"),
            l["lvt_timer"]["masked"],
            c["msrs"]["tsc_deadline_minus_tsc"],
            l["irr"],
            l["isr"],
        ));
    }
    out
}

/// Each disk's device counters and queues, one line per queue, and each card's counters,
/// from vmm's API.
pub(super) fn queue_figures(sock: &Path) -> String {
    let devices = match crate::control::devices(sock) {
        Ok(d) => d,
        Err(e) => return format!("(the API did not answer: {e})"),
    };
    let mut out = String::new();
    for d in devices.as_array().into_iter().flatten() {
        if d["kind"] == "net" {
            let counters: Vec<String> = d
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, v)| v.is_u64() && k.as_str() != "id")
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let id = d["id"].as_str().unwrap_or("?");
            out.push_str(&format!("{id} (net): {}\n", counters.join(" ")));
            continue;
        }
        out.push_str(&format!(
            "{}: requests={} errors={} refused={}\n",
            d["id"].as_str().unwrap_or("?"),
            d["requests"],
            d["errors"],
            d["refused"]
        ));
        for (i, q) in d["queues"].as_array().into_iter().flatten().enumerate() {
            let fields: Vec<String> = q
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            out.push_str(&format!("  queue {i}: {}\n", fields.join(" ")));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_vcpu_reads_as_one_line_of_what_decides_whether_it_wakes() {
        let v = json!([{
            "id": 0, "mp_state": "halted", "rip": "0xffffffff81000000",
            "interrupts_enabled": true,
            "lapic": {"lvt_timer": {"mode": "tsc-deadline", "vector": "0xec", "masked": false},
                      "irr": [], "isr": ["0xf3"]},
            "msrs": {"tsc_deadline_minus_tsc": "disarmed"}
        }]);
        let text = vcpu_lines(Some(Ok(v)));
        let first = text.lines().next().unwrap();
        assert_eq!(
            first,
            "vcpu0: halted rip=0xffffffff81000000 IF=true timer=tsc-deadline 0xec masked=false \
             deadline-tsc=\"disarmed\" irr=[] isr=[\"0xf3\"]"
        );
        assert!(vcpu_lines(Some(Err("GET /vm/vcpus: 409".into()))).contains("409"));
        assert!(vcpu_lines(None).contains("did not answer"));
    }
}
