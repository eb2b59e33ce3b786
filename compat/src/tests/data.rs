//! Data: bounce buffers, the layers below, per-instance state.

use super::plugins::*;
use super::*;
use interceptor_sdk::static_table;
use std::sync::atomic::Ordering;

#[test]
fn a_transforming_plugin_works_on_a_bounce_buffer_never_on_guest_memory() {
    let disk = MemDisk::new(1 << 20);
    let stack = BlockStack::build(
        "vda",
        disk.clone(),
        &[spec("x", static_table!(Xor), serde_json::json!({}))],
    )
    .unwrap();
    let mut guest = vec![0x0fu8; 4096];
    assert_eq!(
        io(&stack, BlockRequestKind::Write, 4096, &mut guest),
        RequestStatus::Ok
    );
    assert!(
        guest.iter().all(|&b| b == 0x0f),
        "the guest's buffer is untouched"
    );
    assert_ne!(
        disk.last_base.load(Ordering::SeqCst),
        guest.as_ptr() as usize
    );
    assert!(
        disk.data.lock().unwrap()[4096..8192]
            .iter()
            .all(|&b| b == 0xf0),
        "the disk holds the transform"
    );
    let mut back = vec![0u8; 4096];
    assert_eq!(
        io(&stack, BlockRequestKind::Read, 4096, &mut back),
        RequestStatus::Ok
    );
    assert_eq!(back, guest);
    // Disabled, it is out of the path and the driver sees guest memory again (zero copy).
    stack.layers()[0].set_enabled(false);
    assert_eq!(
        io(&stack, BlockRequestKind::Read, 4096, &mut back),
        RequestStatus::Ok
    );
    assert_eq!(
        disk.last_base.load(Ordering::SeqCst),
        back.as_ptr() as usize
    );
    assert!(back.iter().all(|&b| b == 0xf0));
}

#[test]
fn the_layers_below_carry_a_plugins_own_io_through_the_rest_of_the_chain() {
    let disk = MemDisk::new(1 << 20);
    let chain = [
        spec("shift", static_table!(Shift), serde_json::json!({})),
        recorder("lower", "r", "", ""),
    ];
    let stack = BlockStack::build("vda", disk.clone(), &chain).unwrap();
    assert_eq!(
        stack.capacity(),
        (1 << 20) - 4096,
        "the exposed capacity is the top's"
    );
    // create() already wrote its header through the recorder below it.
    assert_eq!(take_log("lower"), ["pre r W@0", "post r W@0 Ok"]);
    assert_eq!(&disk.data.lock().unwrap()[..12], b"SHIFT-HEADER");
    let mut buf = vec![9u8; 512];
    assert_eq!(
        io(&stack, BlockRequestKind::Write, 0, &mut buf),
        RequestStatus::Ok
    );
    assert_eq!(take_log("lower"), ["pre r W@4096", "post r W@4096 Ok"]);
    assert_eq!(disk.data.lock().unwrap()[4096..4608], [9u8; 512]);
    // Disabled, it stays in the path (it owns the layout) and is told so.
    stack.layers()[0].set_enabled(false);
    let mut back = vec![0u8; 512];
    assert_eq!(
        io(&stack, BlockRequestKind::Read, 0, &mut back),
        RequestStatus::Ok
    );
    assert_eq!(back, buf);
    // A request past the capacity below is refused, not run.
    let lower_past_end = stack.layers()[0].capacity() + 512;
    assert_eq!(
        io(&stack, BlockRequestKind::Read, lower_past_end, &mut back),
        RequestStatus::IoError
    );
}

#[test]
fn instances_of_one_plugin_keep_separate_state_and_report_it() {
    let (_disk, stack) = abc("stats", "", "");
    let mut buf = vec![0u8; 512];
    stack.layers()[2].set_enabled(false);
    io(&stack, BlockRequestKind::Read, 0, &mut buf);
    io(&stack, BlockRequestKind::Read, 0, &mut buf);
    let seen = |i: usize| stack.layers()[i].plugin_stats().unwrap()["seen"].as_u64();
    assert_eq!((seen(0), seen(1), seen(2)), (Some(2), Some(2), Some(0)));
    assert_eq!(stack.layers()[1].plugin_stats().unwrap()["name"], "b");
    take_log("stats");
}
