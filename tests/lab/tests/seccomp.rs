//! The vmm's seccomp filters (docs/security.md, "Seccomp") with the real guest: they are on
//! by default (`--seccomp trap`), so every other guest test runs under them too; a plugin
//! whose hook makes a system call no plugin may make stops the vmm with one line naming the
//! thread and the call, and the documented exit status.

mod common;

use common::{out_file, output};
use vmm_lab::plugins::plugins;

/// `vmm::seccomp::EXIT_SECCOMP`: 128 + SIGSYS.
const EXIT_SECCOMP: i64 = 159;

#[test]
fn filters_are_on_unless_the_operator_says_otherwise() {
    let line = common::option_help("--seccomp");
    for word in ["trap", "log", "off", "[default: trap]"] {
        assert!(line.contains(word), "--seccomp: no `{word}` in: {line}");
    }
}

/// The faulty plugin's `forbidden-syscall` mode opens an IPv4 socket in its pre hook, on the
/// disk's I/O thread: the first request the guest sends that disk (its partition table at
/// boot) stops the vmm.
#[test]
fn a_forbidden_syscall_in_a_plugin_hook_stops_the_vmm_naming_thread_and_call() {
    let p = plugins().expect("building the plugins");
    let disk = out_file("seccomp-forbidden.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let toml = out_file("seccomp-forbidden.toml");
    std::fs::write(
        &toml,
        format!(
            "[[interceptor]]\nid = \"bad\"\npath = {:?}\n\
             config = {{ mode = \"forbidden-syscall\", from = 0, to = 1099511627776 }}\n",
            p.faulty
        ),
    )
    .unwrap();
    let (disk_arg, toml_arg) = (
        disk.to_string_lossy().into_owned(),
        toml.to_string_lossy().into_owned(),
    );
    let args = [
        "--backend",
        "vmm",
        "--task",
        "boot",
        "--data-disk",
        &disk_arg,
        "--interceptors",
        &toml_arg,
    ];
    let Some((out, r)) = common::guest_run("seccomp-forbidden", &args) else {
        return;
    };
    let text = output(&out);
    assert!(!out.status.success(), "the run must fail: {text}");
    assert_eq!(
        r["vmm_exit"]["status"], EXIT_SECCOMP,
        "vmm must end with 128 + SIGSYS: {r}"
    );
    // The harness shows the line live (`guest| `) and again among the last console lines
    // (`  | `): one report, however often it is shown.
    let mut lines: Vec<&str> = text
        .lines()
        .filter_map(|l| l.find("vmm: seccomp: ").map(|at| &l[at..]))
        .collect();
    lines.sort_unstable();
    lines.dedup();
    assert_eq!(lines.len(), 1, "one report line: {text}");
    let line = lines[0];
    // The disk's I/O thread is named after the disk (`io-data0`).
    let thread = line
        .split("vmm: seccomp: thread ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or("");
    assert!(thread.contains("data0"), "the disk's thread: {line}");
    assert!(
        line.contains(&format!(
            "made forbidden syscall {} (socket) under the device filter",
            41
        )),
        "{line}"
    );
    assert!(
        !text.contains("vmm: interceptor bad on data0:"),
        "the vmm stopped at once, before its exit report: {text}"
    );
}
