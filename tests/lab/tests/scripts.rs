//! The project's shell scripts' shared helpers (scripts/lib.sh), as the demo uses them: a
//! failed step does not stop the steps after it, and the summary names it and fails.

mod common;

use std::process::Command;

fn lib_sh(body: &str) -> std::process::Output {
    let lib = common::repo().join("scripts/lib.sh");
    Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -euo pipefail; source {}; {body}",
            lib.display()
        ))
        .output()
        .unwrap()
}

#[test]
fn a_failed_step_does_not_stop_the_next_ones_and_the_summary_names_it() {
    let out = lib_sh(
        "run_step 'lab bench' false; run_step 'lab guest' true; \
         run_step 'vmm-img check' sh -c 'exit 3'; echo after-the-steps; \
         steps_summary demo 'see above'; echo not-reached",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("after-the-steps"), "{stdout}");
    assert!(!stdout.contains("not-reached"), "{stdout}");
    assert!(
        stderr.contains("demo finished with 2 failed step(s)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("demo: FAILED: lab bench (exit 1)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("demo: FAILED: vmm-img check (exit 3)"),
        "{stderr}"
    );
    assert!(!stderr.contains("FAILED: lab guest"), "{stderr}");
    assert!(stderr.contains("demo: see above"), "{stderr}");
}

#[test]
fn when_every_step_passes_the_summary_says_so_and_exits_0() {
    let out = lib_sh("run_step one true; run_step two true; steps_summary demo hint");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("demo finished: every step passed"),
        "{stderr}"
    );
}

#[test]
fn the_demo_runs_each_step_after_the_build_through_run_step() {
    // Every command of the demo's main job goes through run_step, and the script ends
    // with the summary: a new step added bare would stop the demo again at a failure.
    let text = std::fs::read_to_string(common::repo().join("scripts/demo.sh")).unwrap();
    let main_job = &text[text.find("step \"fio under QEMU").unwrap()..];
    for tool in ["\"$LAB\"", "\"$IMG_TOOL\""] {
        for (i, line) in main_job.lines().enumerate() {
            let prev = main_job.lines().nth(i.wrapping_sub(1)).unwrap_or("");
            if line.trim_start().starts_with(tool) {
                assert!(
                    prev.trim_start().starts_with("run_step") && prev.ends_with('\\'),
                    "a bare step in scripts/demo.sh: {line}"
                );
            } else if line.contains(tool) {
                assert!(line.trim_start().starts_with("run_step"), "{line}");
            }
        }
    }
    assert!(main_job
        .trim_end()
        .lines()
        .last()
        .unwrap()
        .starts_with("steps_summary demo"));
}
