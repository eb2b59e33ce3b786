//! The lab kernel's own timers, from `/proc/timer_list`, for the report of a guest that
//! runs past its limit. A halted vCPU waits for KVM's hrtimer of its TSC deadline, which
//! lives in the queue of the lab CPU its thread last ran on; if that CPU lost its own timer
//! interrupt (the lab's CPUs are emulated), every timer in its queue stays overdue while
//! the other CPU keeps the lab alive. So: per CPU, the most overdue active timer and when
//! its clock event device is next due, against the lab's clock.

/// One CPU's timers as `/proc/timer_list` shows them.
#[derive(Debug, Default, PartialEq)]
pub struct CpuTimers {
    pub cpu: u32,
    /// The active timer due first (most overdue): its function and how far its soft
    /// expiry is from now, in ns (negative: overdue).
    pub first: Option<(String, i64)>,
    /// KVM's timers of its guests' local APICs (`apic_timer_fn`: a vCPU's TSC deadline or
    /// APIC timer), each due in so many ns.
    pub guest_timers: Vec<i64>,
    /// The clock event device and its next event from now, in ns.
    pub device: Option<String>,
    pub next_event_in: Option<i64>,
}

/// Parses `/proc/timer_list`.
pub fn parse(text: &str) -> Vec<CpuTimers> {
    let mut now: Option<i64> = None;
    let mut cpus: Vec<CpuTimers> = Vec::new();
    let mut func: Option<String> = None;
    // Which CPU the tick-device section that follows is about.
    let mut tick_cpu: Option<u32> = None;
    for line in text.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("now at ") {
            now = v.split_whitespace().next().and_then(|n| n.parse().ok());
        } else if let Some(v) = t.strip_prefix("cpu: ") {
            if let Ok(cpu) = v.trim().parse() {
                cpus.push(CpuTimers {
                    cpu,
                    ..CpuTimers::default()
                });
            }
        } else if t.starts_with('#') && t.contains(": <") {
            // ` #0: <000000001234abcd>, tick_sched_timer, S:01`
            func = t.split(", ").nth(1).map(str::to_string);
        } else if let Some(rest) = t.strip_prefix("# expires at ") {
            // `# expires at A-B nsecs [in C to D nsecs]`
            let due = rest
                .split("[in ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse::<i64>().ok());
            if let (Some(due), Some(c)) = (due, cpus.last_mut()) {
                if func
                    .as_deref()
                    .is_some_and(|f| f.starts_with("apic_timer_fn"))
                {
                    c.guest_timers.push(due);
                }
                if c.first.as_ref().is_none_or(|(_, d)| due < *d) {
                    c.first = Some((func.clone().unwrap_or_else(|| "?".into()), due));
                }
            }
        } else if let Some(v) = t.strip_prefix("Per CPU device: ") {
            tick_cpu = v.trim().parse().ok();
        } else if t.starts_with("Broadcast device") {
            tick_cpu = None;
        } else if let Some(v) = t.strip_prefix("Clock Event Device: ") {
            if let Some(c) = tick_cpu.and_then(|n| cpus.iter_mut().find(|c| c.cpu == n)) {
                c.device = Some(v.trim().to_string());
            }
        } else if let Some(v) = t.strip_prefix("next_event:") {
            let at: Option<i64> = v.split_whitespace().next().and_then(|n| n.parse().ok());
            if let (Some(c), Some(at), Some(now)) = (
                tick_cpu.and_then(|n| cpus.iter_mut().find(|c| c.cpu == n)),
                at,
                now,
            ) {
                c.next_event_in = Some(at.saturating_sub(now));
            }
        }
    }
    cpus
}

/// How late a timer may be before the report calls it overdue (the emulated lab is slow,
/// not this slow).
const LATE_NS: i64 = 1_000_000_000;

/// One line per CPU, and a line naming each CPU whose timers are over a second late.
pub fn render(cpus: &[CpuTimers]) -> String {
    let ms = |ns: i64| ns as f64 / 1e6;
    let mut out = String::new();
    for c in cpus {
        out.push_str(&format!("lab cpu {}: ", c.cpu));
        match &c.first {
            Some((f, due)) => out.push_str(&format!("first timer {f} due in {:.1} ms", ms(*due))),
            None => out.push_str("no active timer"),
        }
        if let Some(d) = &c.device {
            out.push_str(&format!("; {d}"));
        }
        if let Some(n) = c.next_event_in {
            out.push_str(&format!(" next event in {:.1} ms", ms(n)));
        }
        for due in &c.guest_timers {
            out.push_str(&format!(
                "; a guest's APIC timer (KVM) due in {:.1} ms",
                ms(*due)
            ));
        }
        out.push('\n');
    }
    for c in cpus {
        if let Some((f, due)) = c.first.as_ref().filter(|(_, d)| *d < -LATE_NS) {
            out.push_str(&format!(
                "OVERDUE: lab cpu {}'s timers are {:.1} s late ({f} first): that CPU is not taking its timer interrupts\n",
                c.cpu,
                -ms(*due) / 1e3
            ));
        }
    }
    out
}

/// The lab kernel's timers now, or why they cannot be read.
pub fn snapshot() -> String {
    match std::fs::read_to_string("/proc/timer_list") {
        Ok(text) => render(&parse(&text)),
        Err(e) => format!("(/proc/timer_list: {e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "Timer List Version: v0.9
HRTIMER_MAX_CLOCK_BASES: 8
now at 50000000000 nsecs

cpu: 0
 clock 0:
  .base:       00000000a1b2c3d4
  .index:      0
active timers:
 #0: <00000000deadbeef>, tick_sched_timer, S:01
 # expires at 50001000000-50001000000 nsecs [in 1000000 to 1000000 nsecs]
 #1: <00000000deadbee0>, hrtimer_wakeup, S:01
 # expires at 50100000000-50100050000 nsecs [in 100000000 to 100050000 nsecs]
 clock 1:
active timers:
  .expires_next   : 50001000000 nsecs

cpu: 1
 clock 0:
active timers:
 #0: <00000000cafef00d>, apic_timer_fn [kvm], S:01
 # expires at 20000000000-20000000000 nsecs [in -30000000000 to -30000000000 nsecs]
 #1: <00000000cafef00e>, tick_sched_timer, S:01
 # expires at 20004000000-20004000000 nsecs [in -29996000000 to -29996000000 nsecs]

Tick Device: mode:     1
Broadcast device
Clock Event Device: <NULL>
tick_broadcast_mask: 0

Tick Device: mode:     1
Per CPU device: 0
Clock Event Device: lapic-deadline
 max_delta_ns:   1101273695028
 next_event:     50001000000 nsecs

Tick Device: mode:     1
Per CPU device: 1
Clock Event Device: lapic-deadline
 next_event:     20000000000 nsecs
";

    #[test]
    fn a_cpu_whose_timers_are_all_late_is_named() {
        let cpus = parse(SAMPLE);
        assert_eq!(cpus.len(), 2);
        assert_eq!(cpus[0].first, Some(("tick_sched_timer".into(), 1_000_000)));
        assert_eq!(cpus[0].device.as_deref(), Some("lapic-deadline"));
        assert_eq!(cpus[0].next_event_in, Some(1_000_000));
        assert_eq!(
            cpus[1].first,
            Some(("apic_timer_fn [kvm]".into(), -30_000_000_000))
        );
        assert_eq!(cpus[1].next_event_in, Some(-30_000_000_000));
        assert_eq!(cpus[1].guest_timers, vec![-30_000_000_000]);
        assert!(cpus[0].guest_timers.is_empty());
        let text = render(&cpus);
        assert!(text.contains("lab cpu 0: first timer tick_sched_timer due in 1.0 ms; lapic-deadline next event in 1.0 ms"), "{text}");
        assert!(
            text.contains(
                "OVERDUE: lab cpu 1's timers are 30.0 s late (apic_timer_fn [kvm] first)"
            ),
            "{text}"
        );
        assert!(!text.contains("OVERDUE: lab cpu 0"), "{text}");
    }

    #[test]
    fn this_machines_timer_list_reads_when_it_is_there() {
        if std::path::Path::new("/proc/timer_list").exists() {
            let s = snapshot();
            assert!(
                s.starts_with("lab cpu 0: ") || s.starts_with("(/proc/timer_list"),
                "{s}"
            );
        }
    }
}
