//! Helpers shared by the harness's integration tests.
#![allow(dead_code)]

pub mod chain;
pub mod encfmt;
pub mod openapi;
pub mod stack;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A test that cannot get what it needs says SKIPPED with the reason. Under CI=true that is
/// a failure: everything a test needs can be installed on the CI machine.
/// Returns normally only when the test should stop (skipped outside CI).
pub fn skip(reason: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("SKIPPED (a failure under CI=true): {reason}");
    }
    eprintln!("SKIPPED: {reason}");
}

pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

/// Runs one of the project's (cached) build scripts; Err with its output on failure.
pub fn build(script: &str) -> Result<String, String> {
    let out = Command::new("bash")
        .arg(repo().join(script))
        .output()
        .map_err(|e| format!("cannot run {script}: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{script} failed:\n{text}"))
    }
}

/// Builds the guest and lab images, or says why the test cannot run. None: skip.
pub fn images_or_skip() -> Option<()> {
    for tool in ["qemu-system-x86_64", "fio", "mkfs.ext4"] {
        if !on_path(tool) {
            skip(&format!(
                "{tool} is not installed (scripts/setup.sh installs it)"
            ));
            return None;
        }
    }
    if !Path::new("/usr/src/linux-source-6.1.tar.xz").exists() {
        skip("linux-source-6.1 is not installed (scripts/setup.sh installs it)");
        return None;
    }
    for script in ["guest-kernel/build.sh", "tests/lab/build-lab.sh"] {
        if let Err(e) = build(script) {
            panic!("{e}");
        }
    }
    Some(())
}

/// Runs the `lab` binary with `args` from the repository root.
pub fn lab(args: &[&str]) -> Output {
    lab_env(args, &[])
}

/// As [`lab`], with more environment variables (`VMM_*` ones reach the lab VM).
pub fn lab_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_lab"))
        .args(args)
        .envs(env.iter().copied())
        .current_dir(repo())
        .output()
        .expect("running the lab binary");
    eprintln!(
        "lab {args:?} -> {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A path on the host's disk for a test's output file: not under /tmp, which the lab VM
/// covers with its own tmpfs.
pub fn out_file(name: &str) -> PathBuf {
    let dir = repo().join("build/test-out");
    std::fs::create_dir_all(&dir).expect("creating build/test-out");
    let path = std::fs::canonicalize(&dir)
        .expect("build/test-out")
        .join(name);
    let _ = std::fs::remove_file(&path);
    path
}

/// stdout and stderr together: inside the lab, an inner run's stderr reaches us through the
/// lab's console, on stdout.
pub fn output(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Guest `who`'s console lines as `lab pair` printed them (`who| ` before each).
pub fn lines_of(text: &str, who: &str) -> String {
    let prefix = format!("{who}| ");
    text.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A guest run's JSON report (`lab guest --json`).
pub fn report(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).expect("the run's JSON report");
    serde_json::from_str(&text).expect("valid JSON report")
}

/// Boots a guest with `lab guest ARGS --json FILE` (FILE named after `name`) and returns the
/// run's output and JSON report, or None when the test must skip.
pub fn guest_run(name: &str, args: &[&str]) -> Option<(Output, serde_json::Value)> {
    guest_run_env(name, args, &[])
}

/// As [`guest_run`], with more environment variables for the harness.
pub fn guest_run_env(
    name: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> Option<(Output, serde_json::Value)> {
    images_or_skip()?;
    let json = out_file(&format!("{name}.json"));
    let json_arg = json.to_string_lossy().into_owned();
    let mut all: Vec<&str> = vec!["guest"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--json", &json_arg]);
    let out = lab_env(&all, env);
    let report = if json.exists() {
        report(&json)
    } else {
        serde_json::Value::Null
    };
    Some((out, report))
}

pub fn vmm_bin() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_lab")).with_file_name("vmm")
}

/// Writes a config with `body` and runs vmm on it.
pub fn run_vmm_config(name: &str, body: &str) -> Output {
    let path = out_file(name);
    std::fs::write(&path, body).unwrap();
    Command::new(vmm_bin())
        .arg("--config")
        .arg(&path)
        .output()
        .expect("running vmm")
}

/// `len` bytes of `text` repeated.
pub fn pattern(text: &str, len: usize) -> Vec<u8> {
    text.bytes().cycle().take(len).collect()
}

/// Whether `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// `vmm --help`'s text for `option`, from its line to the next option's, as one line.
pub fn option_help(option: &str) -> String {
    let out = Command::new(vmm_bin())
        .arg("--help")
        .output()
        .expect("running vmm --help");
    let text = output(&out);
    assert!(out.status.success(), "{text}");
    let mut lines = text.lines().skip_while(|l| !l.contains(option));
    let first = lines.next().unwrap_or("");
    let rest: Vec<&str> = lines
        .take_while(|l| !l.trim_start().starts_with('-') || l.trim_start().starts_with("- "))
        .collect();
    format!("{first} {}", rest.join(" "))
}
