//! Enable and disable: the per-request snapshot and pre/post pairing under toggles.

use super::plugins::*;
use super::*;
use interceptor_sdk::static_table;
use std::sync::atomic::Ordering;

#[test]
fn a_disabled_interceptor_is_skipped_and_a_request_keeps_its_chain() {
    let (_disk, stack) = abc("toggle", "", "");
    let b = stack.layers()[1].clone();
    b.set_enabled(false);
    let mut buf = vec![0u8; 512];
    io(&stack, BlockRequestKind::Write, 0, &mut buf);
    assert_eq!(
        take_log("toggle"),
        ["pre a W@0", "pre c W@0", "post c W@0 Ok", "post a W@0 Ok"]
    );
    // Re-enabled from inside a's pre hook: this request started without b and keeps that.
    let target = b.clone();
    TOGGLERS
        .lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .insert(
            "toggle2".into(),
            Box::new(move || target.set_enabled(!target.enabled())),
        );
    let disk = MemDisk::new(1 << 20);
    let chain = [
        spec(
            "a",
            static_table!(Recorder),
            serde_json::json!({"log": "toggle2", "name": "a", "toggle": true}),
        ),
        recorder("toggle2", "b", "", ""),
    ];
    let stack = BlockStack::build("vda", disk, &chain).unwrap();
    let target = stack.layers()[1].clone();
    TOGGLERS.lock().unwrap().as_mut().unwrap().insert(
        "toggle2".into(),
        Box::new(move || target.set_enabled(!target.enabled())),
    );
    io(&stack, BlockRequestKind::Read, 0, &mut buf); // b on at start; a's pre turns it off
    io(&stack, BlockRequestKind::Read, 0, &mut buf); // b off at start; a's pre turns it on
    assert_eq!(
        take_log("toggle2"),
        [
            "pre a R@0",
            "pre b R@0",
            "post b R@0 Ok",
            "post a R@0 Ok",
            "pre a R@0",
            "post a R@0 Ok"
        ]
    );
}

#[test]
fn pre_and_post_stay_paired_while_another_thread_toggles() {
    let (_disk, stack) = abc("race", "", "");
    let b = stack.layers()[1].clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let toggler = {
        let (b, stop) = (b.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut flips = 0u64;
            while !stop.load(Ordering::SeqCst) {
                b.set_enabled(!b.enabled());
                flips += 1;
                std::thread::yield_now();
            }
            flips
        })
    };
    let mut buf = vec![0u8; 512];
    for _ in 0..5000 {
        assert_eq!(
            io(&stack, BlockRequestKind::Read, 0, &mut buf),
            RequestStatus::Ok
        );
    }
    stop.store(true, Ordering::SeqCst);
    let flips = toggler.join().unwrap();
    let log = take_log("race");
    // Each request's lines are a well-nested sequence: every "pre b" is followed by c and
    // then "post b" before a's post.
    let mut lines = log.iter().map(String::as_str).peekable();
    let (mut with_b, mut without_b) = (0, 0);
    while let Some(first) = lines.next() {
        assert_eq!(first, "pre a R@0");
        let rest: Vec<&str> = if lines.peek() == Some(&"pre b R@0") {
            with_b += 1;
            (0..5).map(|_| lines.next().unwrap()).collect()
        } else {
            without_b += 1;
            (0..3).map(|_| lines.next().unwrap()).collect()
        };
        let expected_with = [
            "pre b R@0",
            "pre c R@0",
            "post c R@0 Ok",
            "post b R@0 Ok",
            "post a R@0 Ok",
        ];
        let expected_without = ["pre c R@0", "post c R@0 Ok", "post a R@0 Ok"];
        assert!(
            rest == expected_with || rest == expected_without,
            "torn request: {rest:?}"
        );
    }
    assert_eq!(with_b + without_b, 5000);
    assert!(flips > 0);
    assert_eq!(b.counters().requests.load(Ordering::SeqCst), with_b);
}
