//! Real guests under real KVM: inside the lab VM on this machine kind, directly on a host
//! with hardware KVM. Each test boots the lab once.

mod common;

use common::output;

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn on_pvm_host() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

#[test]
fn detect_names_this_hosts_mode() {
    let out = common::lab(&["detect"]);
    assert!(out.status.success());
    let text = stdout(&out);
    if on_pvm_host() {
        assert!(text.starts_with("lab ("), "{text}");
        assert!(text.contains("kvm_pvm"), "{text}");
    } else {
        assert!(
            text.starts_with("hardware (") || text.starts_with("lab ("),
            "{text}"
        );
    }
}

#[test]
fn lab_exec_passes_output_status_and_real_kvm() {
    if common::images_or_skip().is_none() {
        return;
    }
    let script = "echo lab-says-hello; test -c /dev/kvm && echo dev-kvm-ok; \
                  stat -f -c fs=%T \"$TMPDIR\"; grep -qw svm /proc/cpuinfo && echo svm-ok; \
                  test -f Cargo.toml && echo host-fs-ok; exit 7";
    let out = common::lab(&["exec", "--", "bash", "-c", script]);
    assert_eq!(
        out.status.code(),
        Some(7),
        "the command's status must come back"
    );
    let text = stdout(&out);
    for want in [
        "lab-says-hello",
        "dev-kvm-ok",
        "fs=tmpfs",
        "svm-ok",
        "host-fs-ok",
    ] {
        assert!(text.contains(want), "missing {want} in:\n{text}");
    }
}

#[test]
fn lab_time_limit_stops_a_hung_command() {
    if common::images_or_skip().is_none() {
        return;
    }
    let out = common::lab(&["exec", "--lab-timeout", "25", "--", "sleep", "600"]);
    assert!(!out.status.success());
    assert!(output(&out).contains("timed out"), "{}", output(&out));
}

#[test]
fn a_lab_vm_that_falls_silent_is_retried_from_the_same_files_not_waited_for() {
    if common::images_or_skip().is_none() {
        return;
    }
    // Freeze the lab's heartbeat (as a wedged lab kernel would): the harness must notice the
    // silence and repeat the run, three times, long before the 10-minute time limit. Each
    // attempt first appends to a file the harness was told to put back before a retry: it
    // must end with one line, not three (a retried guest session must see its data disk as
    // the first attempt found it).
    let file = common::out_file("lab-retry-restores.txt");
    std::fs::write(&file, "before\n").unwrap();
    let freeze = format!(
        "echo attempt >> {}; kill -STOP $(cat {}); sleep 600",
        file.display(),
        vmm_lab::labvm::LAB_HEARTBEAT_PID
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lab"))
        .args(["exec", "--lab-timeout", "600", "--restore-on-retry"])
        .arg(&file)
        .args(["--", "sh", "-c", &freeze])
        .env("VMM_LAB_SILENCE_S", "15")
        .current_dir(common::repo())
        .output()
        .expect("running the lab binary");
    let text = output(&out);
    assert!(!out.status.success(), "{text}");
    assert_eq!(text.matches("not even its heartbeat").count(), 3, "{text}");
    assert_eq!(text.matches("put back as they were").count(), 2, "{text}");
    assert!(text.contains("faulted on all 3 attempts"), "{text}");
    assert!(!text.contains("timed out"), "{text}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "before\nattempt\n");
}

#[test]
fn a_silent_lab_gets_a_byte_on_its_console_before_it_counts_as_wedged() {
    if common::images_or_skip().is_none() {
        return;
    }
    // A lab whose CPUs only wait for an interrupt (as a lost timer interrupt leaves them)
    // is silent but not wedged: the harness sends it a byte on its console first, and a
    // lab that runs on after it is not started again. Here the heartbeat is frozen and the
    // command waits for a line on the console, which only that byte gives it.
    let script = format!(
        "kill -STOP $(cat {pid}); read line; kill -CONT $(cat {pid}); echo woke-by-console",
        pid = vmm_lab::labvm::LAB_HEARTBEAT_PID
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lab"))
        .args(["exec", "--lab-timeout", "300", "--", "sh", "-c", &script])
        .env("VMM_LAB_SILENCE_S", "10")
        .current_dir(common::repo())
        .output()
        .expect("running the lab binary");
    let text = output(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("woke-by-console"), "{text}");
    assert!(text.contains("lab: the lab VM ran again"), "{text}");
    assert!(!text.contains("RETRY"), "{text}");
}

#[test]
fn a_lab_vm_that_is_not_ready_in_time_is_retried_not_waited_for() {
    if common::images_or_skip().is_none() {
        return;
    }
    // A lab kernel can wedge before its init runs and prints nothing at all, and before the
    // init there is no heartbeat: the boot limit (1 s here, far under the ~4 s a boot takes)
    // must stop each attempt and report the fault after three, not wait out the time limit.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lab"))
        .args(["exec", "--lab-timeout", "600", "--", "true"])
        .env("VMM_LAB_BOOT_S", "1")
        .current_dir(common::repo())
        .output()
        .expect("running the lab binary");
    let text = output(&out);
    assert!(!out.status.success(), "{text}");
    assert_eq!(text.matches("not ready after 1 s").count(), 3, "{text}");
    assert!(text.contains("faulted on all 3 attempts"), "{text}");
    assert!(!text.contains("timed out"), "{text}");
}

#[test]
fn qemu_guest_boots_passes_selftest_and_fio_verify() {
    let args = [
        "--backend",
        "qemu",
        "--vcpus",
        "1",
        "--task",
        "selftest fio=verify-crc32c,randread-4k-qd1",
        "--fio-runtime",
        "2",
    ];
    let Some((out, report)) = common::guest_run("qemu-selftest-verify", &args) else {
        return;
    };
    let err = output(&out);
    if on_pvm_host() {
        assert!(err.contains("kvm mode: lab"), "{err}");
        assert!(
            err.contains("kvm mode: hardware, inside the lab VM"),
            "{err}"
        );
    }
    assert!(out.status.success(), "guest run failed:\n{err}");
    assert!(stdout(&out).contains("selftest: PASS"));

    assert_eq!(report["backend"], "qemu");
    assert_eq!(report["vmm_exit"]["status"], 0, "{report}");
    let console = &report["console"];
    assert_eq!(console["selftest"], true);
    assert_eq!(console["exit_rc"], 0);
    assert_eq!(console["init_cpus"], 1);
    assert!(console["init_uptime_s"].as_f64().unwrap() > 0.0);
    assert!(report["wall_to_init_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(report["problems"].as_array().unwrap().len(), 0, "{report}");

    let rows = report["fio"].as_array().unwrap();
    let has = |job: &str, dir: &str| {
        rows.iter()
            .any(|r| r["job"] == job && r["dir"] == dir && r["iops"].as_f64().unwrap_or(0.0) > 0.0)
    };
    assert!(
        has("verify-crc32c", "write"),
        "verify wrote nothing: {rows:?}"
    );
    assert!(
        has("verify-crc32c", "read"),
        "verify read nothing back: {rows:?}"
    );
    assert!(has("randread-4k-qd1", "read"), "{rows:?}");
}

#[test]
fn guest_failures_are_reported_not_hidden() {
    let Some((out, r)) = common::guest_run("qemu-bad-job", &["--task", "fio=no-such-job"]) else {
        return;
    };
    assert!(
        !out.status.success(),
        "an unknown fio job must fail the run"
    );
    assert!(
        output(&out).contains("unknown job no-such-job"),
        "{}",
        output(&out)
    );
    assert_eq!(
        r["console"]["exit_rc"], 1,
        "the guest still reached its reset"
    );
}

#[test]
fn a_guest_that_runs_past_its_limit_is_reported_with_vmms_threads_and_queues() {
    // fio outlasts the guest's time limit: the harness stops vmm, and first reads what its
    // threads were doing and where each disk's queue stood, so that a hung guest can be
    // told from a busy one (and a lost kick from a stuck backend) after the fact.
    let args = [
        "--backend",
        "vmm",
        "--task",
        "fio=randread-4k-qd1",
        "--fio-runtime",
        "600",
        "--timeout",
        "45",
    ];
    // With KVM's trace on (scripts/test.sh turns it on for the suite), the report also has
    // the vCPU's last timer writes and injected interrupts.
    let env = [("VMM_LAB_KVM_TRACE", "1")];
    let Some((out, _)) = common::guest_run_env("vmm-past-limit", &args, &env) else {
        return;
    };
    let text = output(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("timed out after 45s"), "{text}");
    assert!(text.contains("vmm's threads when it was stopped"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains(" vcpu0 ") && l.contains("cpu=")),
        "{text}"
    );
    assert!(text.lines().any(|l| l.contains(" io-data0 ")), "{text}");
    assert!(
        text.contains("KVM's last events before it was stopped"),
        "{text}"
    );
    assert!(
        text.contains("kvm_inj_virq") && text.contains("last TSC-deadline write: 0x"),
        "{text}"
    );
    // The lab kernel's timers per CPU (a halted vCPU's deadline is an hrtimer there).
    assert!(
        text.contains("the lab kernel's timers") && text.contains("lab cpu 0: "),
        "{text}"
    );
    // Read first, without touching the vCPU: the IOAPIC with the pins the guest set up (its
    // disks' edge-triggered lines among them) and KVM's clock.
    let vm_wide = text
        .lines()
        .skip_while(|l| !l.contains("KVM's VM-wide state, read first"))
        .nth(1)
        .unwrap_or_else(|| panic!("no VM-wide state in:\n{text}"));
    let vm_wide: serde_json::Value = serde_json::from_str(vm_wide).unwrap();
    assert!(vm_wide["clock"]["ns"].as_u64().unwrap() > 0, "{vm_wide}");
    let pins = vm_wide["ioapic"]["pins"].as_array().unwrap();
    assert!(
        pins.iter()
            .any(|p| p["masked"] == false && p["level"] == false),
        "{vm_wide}"
    );
    // Then the vCPU, kicked out of KVM_RUN: its local APIC's timer in TSC-deadline mode (the
    // guest's only clock event device) and the MSRs it set.
    let vcpu = text
        .lines()
        .find(|l| l.starts_with("vcpu0: "))
        .unwrap_or_else(|| panic!("no vCPU state in:\n{text}"));
    assert!(
        vcpu.contains("timer=tsc-deadline 0xec masked=false"),
        "{vcpu}"
    );
    assert!(text.contains("\"kvm_pv_eoi_en\":\"0x"), "{text}");
    // This guest was busy, so it ran on right after the kick.
    assert!(
        text.contains("the guest ran again after its vCPU left KVM_RUN"),
        "{text}"
    );
    // fio had been reading the data disk: its queue took many requests, all answered
    // (this guest was busy, not hung).
    let lines: Vec<&str> = text.lines().collect();
    let queue = lines
        .iter()
        .position(|l| l.starts_with("data0: requests="))
        .and_then(|i| lines.get(i + 1))
        .filter(|l| l.contains("queue 0:"))
        .unwrap_or_else(|| panic!("no figures of data0's queue in:\n{text}"));
    let figure = |name: &str| -> u64 {
        queue
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {queue}"))
    };
    assert!(figure("next_avail") > 100, "{queue}");
    assert!(figure("kicks") > 0, "{queue}");
    assert!(figure("in_flight") <= 1, "queue depth 1: {queue}");
}

#[test]
fn qemu_guest_with_two_vcpus_sees_both() {
    // Boot only: I/O load on 2 nested vCPUs can crash the lab VM's kernel (docs/lab.md).
    let args = ["--vcpus", "2", "--task", "boot"];
    let Some((out, r)) = common::guest_run("qemu-2vcpu", &args) else {
        return;
    };
    assert!(out.status.success(), "{}", output(&out));
    assert_eq!(
        r["console"]["init_cpus"], 2,
        "the guest must see both vCPUs"
    );
    assert_eq!(r["console"]["exit_rc"], 0);
}

/// Input piped into `lab guest --task shell` reaches the guest's shell whole, with both
/// backends: it is held until the shell says it is ready (bytes sent earlier were lost).
#[test]
fn piped_shell_input_arrives_whole() {
    use std::io::Write;
    if common::images_or_skip().is_none() {
        return;
    }
    for backend in ["vmm", "qemu"] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lab"))
            .args(["guest", "--backend", backend, "--task", "shell"])
            .current_dir(common::repo())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("running the lab binary");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"echo MARK-$((6*7))\nexit\n")
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let text = common::output(&out);
        assert!(text.contains("MARK-42"), "{backend}: {text}");
        assert!(
            !text.contains("sh: "),
            "the shell saw no cut command: {backend}: {text}"
        );
    }
}
