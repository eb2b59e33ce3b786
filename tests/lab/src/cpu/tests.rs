use super::*;

const RANDWRITE: &str = include_str!("../../tests/fixtures/fio-randwrite-4k-qd32.json");

#[test]
fn fio_cpu_comes_from_the_job_json() {
    let c = fio_cpu("randwrite-4k-qd32", RANDWRITE).unwrap();
    assert!((c.usr_pct - 9.381238).abs() < 1e-6, "{c:?}");
    assert!((c.sys_pct - 39.620758).abs() < 1e-6, "{c:?}");
    assert_eq!(c.runtime_ms, 1002.0);
    assert!(c.ios > 1000.0, "{c:?}");
    let (u, s) = c.cpu_s();
    assert!(
        (u - 0.094).abs() < 1e-3 && (s - 0.397).abs() < 1e-3,
        "{u} {s}"
    );
    assert!(fio_cpu("x", "{\"jobs\": []}").is_err());
    assert!(fio_cpu("x", "garbage").is_err());
}

#[test]
fn stat_lines_with_spaces_and_parentheses_in_the_name() {
    // Field 3 on: state ppid ... utime(14)=7 stime(15)=3 ... guest_time(43)=5.
    let mut fields: Vec<String> = (3..=52).map(|n| n.to_string()).collect();
    fields[0] = "S".into();
    fields[14 - 3] = "7".into();
    fields[15 - 3] = "3".into();
    fields[43 - 3] = "5".into();
    let line = format!("42 (CPU 0/KVM (x)) {}", fields.join(" "));
    let t = task_ticks(&line).unwrap();
    assert_eq!(t.comm, "CPU 0/KVM (x)");
    assert_eq!((t.utime, t.stime, t.gtime), (7, 3, 5));
    assert!(task_ticks("42 (short) S 1").is_none());
    assert_eq!(thread_class("CPU 0/KVM"), "CPU N/KVM");
    assert_eq!(thread_class("iou-wrk-12345"), "iou-wrk-N");
    assert_eq!(thread_class("vcpu10"), "vcpuN");
}

#[test]
fn our_own_child_is_measured() {
    // The sampler reads a child of ours; a busy child shows in its figures and rusage.
    let sampler = Sampler::start();
    let from = Instant::now();
    let status = std::process::Command::new("sh")
        .args(["-c", "i=0; while [ $i -lt 600000 ]; do i=$((i+1)); done"])
        .status()
        .unwrap();
    assert!(status.success());
    let to = Instant::now();
    let (cpu, trace) = sampler.finish();
    assert!(cpu.total_s() > 0.0, "{cpu:?}");
    assert!(cpu.wall_s >= cpu.total_s() * 0.5, "{cpu:?}");
    assert!(cpu.cpus >= 1 && cpu.machine_busy_s > 0.0, "{cpu:?}");
    assert_eq!(cpu.threads.first().map(|t| t.name.as_str()), Some("sh"));
    let w = trace.window(from, to);
    assert!(w.total_s() <= cpu.total_s() + 0.05, "{w:?} {cpu:?}");
    assert_eq!(trace.window(to, to).total_s(), 0.0);
}

fn ticks(comm: &str, utime: u64) -> TaskTicks {
    TaskTicks {
        comm: comm.into(),
        utime,
        stime: utime / 2,
        gtime: 0,
    }
}

#[test]
fn a_window_interpolates_between_samples() {
    let t0 = Instant::now();
    let at = |s: f64| t0 + Duration::from_secs_f64(s);
    let sample = |s: f64, tasks: Vec<(u32, TaskTicks)>, busy: u64| Sample {
        at: at(s),
        tasks: tasks.into_iter().collect(),
        machine: Some(vec![busy, 0, 0, 1000 - busy, 0, 0, 0, 0]),
        kvm: Some(vec![busy * 10; KVM_STATS.len()]),
    };
    let trace = Trace {
        samples: vec![
            sample(0.0, vec![(1, ticks("vcpu0", 0))], 0),
            sample(1.0, vec![(1, ticks("vcpu0", 100))], 100),
            // Thread 2 appears: it started after the sample before.
            sample(
                2.0,
                vec![(1, ticks("vcpu0", 300)), (2, ticks("iou-wrk-7", 100))],
                300,
            ),
            // Both gone: they keep their last figures.
            sample(3.0, vec![], 300),
        ],
        hz: 100.0,
        cpus: 2,
    };
    // vcpu0: 0.5 s at 0.5, 2 s at 1.5; thread 2: from 0 at 1.0 to 1 s at 2.0.
    let w = trace.window(at(0.5), at(1.5));
    assert!((w.user_s - 2.0).abs() < 1e-9, "{w:?}");
    assert!((w.sys_s - 1.0).abs() < 1e-9, "{w:?}");
    assert!((w.machine_busy_s - 1.5).abs() < 1e-9, "{w:?}");
    assert!((w.machine_busy_pct() - 75.0).abs() < 1e-9, "{w:?}");
    assert!((w.kvm["exits"] - 1500.0).abs() < 1e-9, "{w:?}");
    let w = trace.window(at(1.5), at(3.0));
    let wrk = w.threads.iter().find(|t| t.name == "iou-wrk-N").unwrap();
    assert!((wrk.user_s - 0.5).abs() < 1e-9, "{w:?}");
    let vcpu = w.threads.iter().find(|t| t.name == "vcpuN").unwrap();
    assert!((vcpu.user_s - 1.0).abs() < 1e-9, "{w:?}");
    assert_eq!(trace.window(at(2.5), at(3.5)).total_s(), 0.0);
}

#[test]
fn the_stderr_tap_passes_lines_on_and_keeps_the_ones_asked_for() {
    let tap = StderrTap::start(|l| l.contains("@@TAP-TEST@@")).unwrap();
    // Straight to fd 2: the test harness captures eprintln!.
    let mut err = std::io::stderr();
    writeln!(err, "not kept").unwrap();
    writeln!(err, "guest| @@TAP-TEST@@ fio-begin job=x").unwrap();
    let kept = tap.finish();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(kept[0].1, "guest| @@TAP-TEST@@ fio-begin job=x");
    // stderr is back: this goes to the test's output, not a closed pipe.
    writeln!(err, "after the tap").unwrap();
}
