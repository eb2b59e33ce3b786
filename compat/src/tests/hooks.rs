//! Ordering of the hooks; continue, complete and fail; panics.

use super::*;
use std::sync::atomic::Ordering;

#[test]
fn without_interceptors_the_driver_gets_the_guest_buffer_itself() {
    let disk = MemDisk::new(1 << 20);
    let stack = BlockStack::build("vda", disk.clone(), &[]).unwrap();
    let mut buf = vec![7u8; 4096];
    assert_eq!(
        io(&stack, BlockRequestKind::Write, 8192, &mut buf),
        RequestStatus::Ok
    );
    assert_eq!(disk.last_base.load(Ordering::SeqCst), buf.as_ptr() as usize);
    assert_eq!(disk.data.lock().unwrap()[8192..12288], [7u8; 4096]);
    assert_eq!(stack.counters().requests.load(Ordering::SeqCst), 1);
}

#[test]
fn pre_hooks_run_top_down_and_post_hooks_bottom_up() {
    let (disk, stack) = abc("order", "", "");
    let mut buf = vec![0u8; 512];
    assert_eq!(
        io(&stack, BlockRequestKind::Read, 1024, &mut buf),
        RequestStatus::Ok
    );
    assert_eq!(
        take_log("order"),
        [
            "pre a R@1024",
            "pre b R@1024",
            "pre c R@1024",
            "post c R@1024 Ok",
            "post b R@1024 Ok",
            "post a R@1024 Ok"
        ]
    );
    assert_eq!(disk.calls.load(Ordering::SeqCst), 1);
}

#[test]
fn complete_skips_the_layers_below_and_still_gets_its_post_hook() {
    let (disk, stack) = abc("complete", "complete", "");
    let mut buf = vec![0u8; 1024];
    assert_eq!(
        io(&stack, BlockRequestKind::Read, 0, &mut buf),
        RequestStatus::Ok
    );
    assert_eq!(
        take_log("complete"),
        ["pre a R@0", "pre b R@0", "post b R@0 Ok", "post a R@0 Ok"]
    );
    assert_eq!(
        disk.calls.load(Ordering::SeqCst),
        0,
        "the backend never ran"
    );
    assert!(
        buf.iter().all(|&b| b == 0x5a),
        "the completing hook filled the read"
    );
    assert_eq!(
        stack
            .counters()
            .completed_without_driver
            .load(Ordering::SeqCst),
        1
    );
    assert_eq!(
        stack.layers()[1]
            .counters()
            .completed
            .load(Ordering::SeqCst),
        1
    );
}

#[test]
fn fail_in_pre_gives_ioerr_and_unwinds_through_the_hooks_that_ran() {
    let (disk, stack) = abc("fail", "fail", "");
    let mut buf = vec![1u8; 512];
    assert_eq!(
        io(&stack, BlockRequestKind::Write, 512, &mut buf),
        RequestStatus::IoError
    );
    assert_eq!(
        take_log("fail"),
        [
            "pre a W@512",
            "pre b W@512",
            "post b W@512 IoError",
            "post a W@512 IoError"
        ]
    );
    assert_eq!(disk.calls.load(Ordering::SeqCst), 0);
    assert_eq!(
        stack.layers()[1].counters().errors.load(Ordering::SeqCst),
        1
    );
    assert_eq!(stack.counters().errors.load(Ordering::SeqCst), 1);
    // The device goes on: the next request is served normally by the others.
    stack.layers()[1].set_enabled(false);
    assert_eq!(
        io(&stack, BlockRequestKind::Write, 512, &mut buf),
        RequestStatus::Ok
    );
}

#[test]
fn fail_in_post_reaches_the_guest() {
    let (disk, stack) = abc("postfail", "", "fail");
    let mut buf = vec![0u8; 512];
    assert_eq!(
        io(&stack, BlockRequestKind::Read, 0, &mut buf),
        RequestStatus::IoError
    );
    assert_eq!(disk.calls.load(Ordering::SeqCst), 1);
    assert_eq!(take_log("postfail").last().unwrap(), "post a R@0 IoError");
}

#[test]
fn a_panicking_plugin_fails_that_request_and_the_shim_goes_on() {
    for (key, pre, post) in [("panic-pre", "panic", ""), ("panic-post", "", "panic")] {
        let (_disk, stack) = abc(key, pre, post);
        let mut buf = vec![0u8; 512];
        assert_eq!(
            io(&stack, BlockRequestKind::Read, 0, &mut buf),
            RequestStatus::IoError,
            "{key}"
        );
        let log = take_log(key);
        assert_eq!(log.first().unwrap(), "pre a R@0");
        assert_eq!(
            log.last().unwrap(),
            "post a R@0 IoError",
            "{key}: a's post still ran"
        );
        // Again: still serving, still failing only through the broken plugin.
        assert_eq!(
            io(&stack, BlockRequestKind::Read, 0, &mut buf),
            RequestStatus::IoError
        );
        stack.layers()[1].set_enabled(false);
        assert_eq!(
            io(&stack, BlockRequestKind::Read, 0, &mut buf),
            RequestStatus::Ok
        );
    }
}
