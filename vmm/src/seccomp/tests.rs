use super::*;
use std::process::Command;

/// The child's scenario (see `child`); unset in the ordinary test run.
const CHILD_ENV: &str = "VMM_SECCOMP_TEST_CHILD";

/// Runs `child` in a new process of this test binary with `scenario`; returns its exit
/// status and stderr.
fn run_child(scenario: &str) -> (Option<i32>, String) {
    let exe = std::env::current_exe().expect("the test binary");
    let out = Command::new(exe)
        .args(["--exact", "seccomp::tests::child", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(CHILD_ENV, scenario)
        .output()
        .expect("running the child");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code(), err)
}

fn report(thread: &str, nr: i64, name: &str, kind: &str) -> String {
    format!(
        "vmm: seccomp: thread {thread} made forbidden syscall {nr} ({name}) under the \
         {kind} filter; the vmm stops (exit 159, docs/security.md)\n"
    )
}

/// Starts `io-test0`, which applies `kind`'s filter in `mode` and runs `f`, and waits
/// for it; the process then exits 0 (a trapped call exits 159 before that).
fn on_filtered_thread(mode: SeccompMode, kind: ThreadKind, f: impl FnOnce() + Send + 'static) {
    let filters = Filters::build(mode).expect("filters");
    let t = std::thread::Builder::new()
        .name("io-test0".into())
        .spawn(move || {
            filters.apply(kind).expect("apply");
            f();
        })
        .expect("spawn");
    let ok = t.join().is_ok();
    std::process::exit(if ok { 0 } else { 3 });
}

fn socket_inet() -> i32 {
    // SAFETY: plain syscall, no pointers.
    unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) }
}

/// The body of the child processes: one scenario per run, chosen by the parent.
#[test]
fn child() {
    let Ok(scenario) = std::env::var(CHILD_ENV) else {
        return; // the ordinary run: nothing to do
    };
    match scenario.as_str() {
        "device-allowed-then-socket" => {
            on_filtered_thread(SeccompMode::Trap, ThreadKind::Device, || {
                // What a plugin hook may do: file I/O on open files, reading a file,
                // random bytes, time, memory (never executable).
                let mut f = std::fs::File::open("/proc/self/stat").expect("open read-only");
                let mut s = String::new();
                std::io::Read::read_to_string(&mut f, &mut s).expect("read");
                let mut b = [0u8; 16];
                // SAFETY: a buffer we own.
                let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
                assert_eq!(n, 16);
                let v: Vec<u8> = vec![1; 1 << 20];
                drop(v);
                let _ = std::time::Instant::now();
                // SAFETY: an anonymous mapping, unmapped again.
                unsafe {
                    let p = libc::mmap(
                        std::ptr::null_mut(),
                        4096,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    );
                    assert_ne!(p, libc::MAP_FAILED);
                    libc::munmap(p, 4096);
                }
                eprintln!("allowed calls passed");
                let fd = socket_inet();
                eprintln!("socket returned {fd}");
            })
        }
        "device-open-for-writing" => {
            on_filtered_thread(SeccompMode::Trap, ThreadKind::Device, || {
                let path = std::env::temp_dir().join("vmm-seccomp-test-write");
                let r = std::fs::File::create(path);
                eprintln!("create returned {}", r.is_ok());
            })
        }
        "vcpu-tty-ioctl" => on_filtered_thread(SeccompMode::Trap, ThreadKind::Vcpu, || {
            let mut n: libc::c_int = 0;
            // SAFETY: FIONREAD writes one int.
            let r = unsafe { libc::ioctl(0, libc::FIONREAD, &mut n) };
            eprintln!("ioctl returned {r}");
        }),
        "vcpu-exec-mapping" | "device-exec-mapping" => {
            let kind = if scenario.starts_with("vcpu") {
                ThreadKind::Vcpu
            } else {
                ThreadKind::Device
            };
            on_filtered_thread(SeccompMode::Trap, kind, || {
                // SAFETY: an anonymous mapping.
                let p = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        4096,
                        libc::PROT_READ | libc::PROT_EXEC,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                eprintln!("mmap returned {p:?}");
            })
        }
        "api-fork" => on_filtered_thread(SeccompMode::Trap, ThreadKind::Api, || {
            // SAFETY: the child, if there were one, exits at once.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: leaving the forked child.
                unsafe { libc::_exit(0) };
            }
            eprintln!("fork returned {pid}");
        }),
        "api-threads-inherit" => {
            let filters = Filters::build(SeccompMode::Trap).expect("filters");
            on_filtered_thread(SeccompMode::Trap, ThreadKind::Api, move || {
                // The API thread may start threads (clone3 answers ENOSYS, clone with
                // CLONE_THREAD passes); they inherit its filter, so applying another fails.
                let inner = std::thread::Builder::new()
                    .name("api-edit".into())
                    .spawn(move || filters.apply(ThreadKind::Device))
                    .expect("spawn under the API filter")
                    .join()
                    .expect("join");
                eprintln!("inner apply: {inner:?}");
            })
        }
        "log-socket" => on_filtered_thread(SeccompMode::Log, ThreadKind::Device, || {
            let fd = socket_inet();
            eprintln!(
                "socket returned {}",
                if fd >= 0 { "a descriptor" } else { "an error" }
            );
        }),
        "off-socket" => on_filtered_thread(SeccompMode::Off, ThreadKind::Device, || {
            let fd = socket_inet();
            eprintln!(
                "socket returned {}",
                if fd >= 0 { "a descriptor" } else { "an error" }
            );
        }),
        "every-kind-closes-a-descriptor" => {
            // Any thread can drop the last owner of a descriptor (the stdin thread can end
            // holding the serial console when the VM ends); the standard
            // library's debug check (fcntl F_GETFD) and the close run under its filter.
            let filters = std::sync::Arc::new(Filters::build(SeccompMode::Trap).expect("filters"));
            for kind in ThreadKind::ALL {
                let fd = std::fs::File::open("/proc/self/stat").expect("open");
                let filters = filters.clone();
                std::thread::Builder::new()
                    .name("io-test0".into())
                    .spawn(move || {
                        filters.apply(kind).expect("apply");
                        drop(fd);
                    })
                    .expect("spawn")
                    .join()
                    .expect("join");
                eprintln!("{kind:?} closed a descriptor");
            }
        }
        other => panic!("unknown scenario {other}"),
    }
}

#[test]
fn a_forbidden_call_on_a_device_thread_stops_the_process_with_one_line() {
    let (code, err) = run_child("device-allowed-then-socket");
    assert_eq!(code, Some(EXIT_SECCOMP), "{err}");
    assert!(err.contains("allowed calls passed\n"), "{err}");
    assert!(!err.contains("socket returned"), "{err}");
    assert!(
        err.ends_with(&report("io-test0", libc::SYS_socket, "socket", "device")),
        "{err}"
    );
}

#[test]
fn every_thread_may_close_a_descriptor_it_ends_up_owning() {
    let (code, err) = run_child("every-kind-closes-a-descriptor");
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("Stdin closed a descriptor\n"), "{err}");
}

#[test]
fn plugins_open_files_read_only() {
    let (code, err) = run_child("device-open-for-writing");
    assert_eq!(code, Some(EXIT_SECCOMP), "{err}");
    assert!(
        err.ends_with(&report("io-test0", libc::SYS_openat, "openat", "device")),
        "{err}"
    );
}

#[test]
fn a_vcpu_makes_kvm_ioctls_only() {
    let (code, err) = run_child("vcpu-tty-ioctl");
    assert_eq!(code, Some(EXIT_SECCOMP), "{err}");
    assert!(
        err.ends_with(&report("io-test0", libc::SYS_ioctl, "ioctl", "vcpu")),
        "{err}"
    );
}

#[test]
fn vcpus_and_plugin_hooks_map_no_code() {
    for kind in ["vcpu", "device"] {
        let (code, err) = run_child(&format!("{kind}-exec-mapping"));
        assert_eq!(code, Some(EXIT_SECCOMP), "{kind}: {err}");
        assert!(
            err.ends_with(&report("io-test0", libc::SYS_mmap, "mmap", kind)),
            "{kind}: {err}"
        );
    }
}

#[test]
fn the_api_thread_starts_threads_but_no_process() {
    let (code, err) = run_child("api-fork");
    assert_eq!(code, Some(EXIT_SECCOMP), "{err}");
    assert!(
        err.ends_with(&report("io-test0", libc::SYS_clone, "clone", "api")),
        "{err}"
    );
}

#[test]
fn a_thread_started_under_a_filter_cannot_apply_another() {
    let (code, err) = run_child("api-threads-inherit");
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("inner apply: Err(\"seccomp: thread api-edit already runs under the filter of the thread that started it"),
        "{err}"
    );
}

#[test]
fn log_and_off_let_the_call_run() {
    for scenario in ["log-socket", "off-socket"] {
        let (code, err) = run_child(scenario);
        assert_eq!(code, Some(0), "{scenario}: {err}");
        assert!(
            err.contains("socket returned a descriptor"),
            "{scenario}: {err}"
        );
    }
}

#[test]
fn every_filter_builds_in_every_mode() {
    for mode in [SeccompMode::Trap, SeccompMode::Log, SeccompMode::Off] {
        let f = Filters::build(mode).unwrap();
        assert_eq!(f.mode(), mode);
    }
    assert_eq!(SeccompMode::default(), SeccompMode::Trap);
}

#[test]
fn no_thread_may_start_programs_open_sockets_or_trace() {
    for kind in ThreadKind::ALL {
        let list = allowed(kind).unwrap();
        for bad in [
            "socket",
            "socketpair",
            "connect",
            "bind",
            "listen",
            "execve",
            "execveat",
            "fork",
            "vfork",
            "ptrace",
            "process_vm_readv",
            "process_vm_writev",
            "kill",
            "mount",
            "chroot",
            "pivot_root",
            "init_module",
            "finit_module",
            "bpf",
            "setuid",
            "unshare",
            "setns",
            "seccomp",
        ] {
            assert!(
                !list.iter().any(|s| s.trim_end_matches('*') == bad),
                "{} allows {bad}",
                kind.name()
            );
        }
        // KVM_RUN and the probe's reads on a vCPU, TUNSETOFFLOAD on a device thread (a net
        // card's tap), the VM's irqchip and clock reads on the API's (`GET /vm/kvm`).
        let ioctl = list.iter().any(|s| s.starts_with("ioctl"));
        assert_eq!(
            ioctl,
            matches!(
                kind,
                ThreadKind::Vcpu | ThreadKind::Device | ThreadKind::Api
            ),
            "{}: ioctl",
            kind.name()
        );
        // Plugins load (a sealed memfd, then dlopen maps code) on the API's threads only.
        for loader in ["memfd_create", "mmap", "mprotect"] {
            assert_eq!(
                list.iter().any(|s| s == loader),
                kind == ThreadKind::Api,
                "{}: {loader} without conditions",
                kind.name()
            );
        }
    }
}

/// docs/security.md lists every filter's syscalls (section "Seccomp", a `text` block of
/// `kind: name name*...` lines, continued on indented lines): they must be this code's.
#[test]
fn the_documented_lists_are_the_filters() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/security.md"))
        .expect("docs/security.md");
    let section = doc
        .split("\n## Seccomp\n")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("a Seccomp section");
    let block = section
        .split("```text\n")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .expect("a text block in the Seccomp section");
    let mut lists: Vec<(String, Vec<String>)> = Vec::new();
    for line in block.lines() {
        match (line.starts_with(' '), line.split_once(':')) {
            (false, Some((kind, rest))) => lists.push((
                kind.trim().to_string(),
                rest.split_whitespace().map(String::from).collect(),
            )),
            _ => {
                if let Some(last) = lists.last_mut() {
                    last.1.extend(line.split_whitespace().map(String::from));
                }
            }
        }
    }
    let mut expected = String::new();
    for kind in ThreadKind::ALL {
        expected.push_str(&format!(
            "{}: {}\n",
            kind.name(),
            allowed(kind).unwrap().join(" ")
        ));
    }
    for kind in ThreadKind::ALL {
        let documented = lists
            .iter()
            .find(|(k, _)| k == kind.name())
            .map(|(_, l)| l.clone());
        assert_eq!(
            documented,
            Some(allowed(kind).unwrap()),
            "docs/security.md, the {} list; the filters are:\n{expected}",
            kind.name()
        );
    }
}

#[test]
fn every_syscall_of_every_list_has_a_name() {
    for kind in ThreadKind::ALL {
        for s in allowed(kind).unwrap() {
            assert!(!s.starts_with('?'), "{}: {s}", kind.name());
        }
    }
    assert_eq!(syscall_name(libc::SYS_socket), Some("socket"));
    assert_eq!(syscall_name(100_000), None);
}
