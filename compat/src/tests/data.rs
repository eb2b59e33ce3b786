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

/// What a plugin writes while it is created is held back and written down in order once it
/// is accepted, a write of zeroes from a shared zero buffer. That buffer used to be the last
/// write's, so zeroes staged after data went down as that data: the extent store's
/// checkpoint at open (its header, then a map of holes) put the header's bytes where the
/// map belonged, and the next open refused the store as damaged.
#[test]
fn zeroes_written_while_created_reach_the_disk_as_zeroes() {
    let disk = MemDisk::new(1 << 20);
    disk.data.lock().unwrap()[4096..12288].fill(0xee);
    let below = BlockStack::build("vda", disk.clone(), &[]).unwrap();
    let ctx = crate::lower::LowerCtx::new("t", below);
    ctx.stage();
    let mut data = vec![7u8; 4096];
    let mut zero = vec![0u8; 8192];
    let write = |at: u64, buf: &mut Vec<u8>| {
        // SAFETY: a live buffer of that length.
        unsafe { ((*ctx.raw()).write)((*ctx.raw()).ctx, at, buf.as_mut_ptr(), buf.len() as u64) }
    };
    assert_eq!(write(0, &mut data), abi::STATUS_OK);
    assert_eq!(write(4096, &mut zero), abi::STATUS_OK);
    assert!(
        disk.data.lock().unwrap()[..4096].iter().all(|&b| b == 0),
        "held back"
    );
    ctx.commit().unwrap();
    let d = disk.data.lock().unwrap();
    assert!(d[..4096].iter().all(|&b| b == 7));
    assert!(
        d[4096..12288].iter().all(|&b| b == 0),
        "the zeroes went down as data"
    );
}

/// A discard ends at the first instance that owns its format: the layers below it (here
/// one that does not handle discard) are not asked, so the chain offers discard; one that
/// owns its format and passes a discard down anyway fails it.
#[test]
fn a_discard_ends_at_the_first_instance_that_owns_its_format() {
    let disk = MemDisk::new(1 << 20);
    let chain = |pass: bool| {
        BlockStack::build(
            "vda",
            disk.clone(),
            &[
                spec(
                    "o",
                    static_table!(OwnedDiscard),
                    serde_json::json!({ "pass": pass }),
                ),
                spec("x", static_table!(Xor), serde_json::json!({})),
            ],
        )
        .unwrap()
    };
    let discard = |stack: &Arc<BlockStack>| {
        // SAFETY: a discard has no segments.
        match unsafe { stack.begin(BlockRequestKind::Discard, 0, 4096, Vec::new()) } {
            Started::Done(st) => st,
            Started::Backend(io) => io.finish(RequestStatus::Ok),
            Started::Parked(_) => panic!("no plugin here waits"),
        }
    };
    let answers = chain(false);
    assert!(answers.handles_discard());
    assert_eq!(discard(&answers), RequestStatus::Ok);
    assert_eq!(discard(&chain(true)), RequestStatus::IoError);
    // Without the owner on top, the xor layer is reached: not offered, answered UNSUPP.
    let plain = BlockStack::build(
        "vda",
        disk.clone(),
        &[spec("x", static_table!(Xor), serde_json::json!({}))],
    )
    .unwrap();
    assert!(!plain.handles_discard());
    assert_eq!(discard(&plain), RequestStatus::Unsupported);
}
