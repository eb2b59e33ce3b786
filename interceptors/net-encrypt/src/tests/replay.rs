//! "A frame is accepted once": across restarts of either side, reflections, any number of
//! senders; and no two senders share a nonce space.

use super::*;

#[test]
fn replays_forgeries_plain_frames_and_other_keys_are_dropped() {
    let key = key_file("hostile", 8);
    let (a, b) = (card(&key), card(&key));
    connect(&a, &b);
    let wire = send(&a, &frame(b"hello over the wire"));
    assert!(deliver(&a, &b, &wire).is_some());
    assert!(deliver(&a, &b, &wire).is_none(), "the same frame again");
    assert_eq!(stat(&b, "replayed"), 1);
    for at in [0, 11, 15, 16, 17, 18, 33, 34, 41, 42, usize::MAX] {
        let mut bad = send(&a, &frame(b"tamper with me"));
        let at = at.min(bad.len() - 1);
        bad[at] ^= 0x01;
        assert!(deliver(&a, &b, &bad).is_none(), "byte {at} changed");
    }
    // Byte 16 (the key id) names a key b does not hold; 15 and 17 (the kind, the
    // reserved byte) make a frame no sender makes; the others fail the tag.
    assert_eq!(stat(&b, "unknown_key"), 1);
    assert_eq!(stat(&b, "forged"), 10);
    assert!(
        deliver(&a, &b, &frame(b"plain")).is_none(),
        "an unsealed frame"
    );
    assert_eq!(stat(&b, "unsealed"), 1);
    let other = card(&key_file("other", 9));
    assert!(
        deliver(&a, &other, &send(&a, &frame(b"x"))).is_none(),
        "another key"
    );
    assert_eq!(stat(&other, "forged"), 1);
    // Cut short anywhere: dropped, no panic.
    let wire = send(&a, &frame(b"cut me short"));
    for n in 14..wire.len() {
        assert!(deliver(&a, &b, &wire[..n]).is_none(), "{n} bytes");
    }
}

/// Issue 30, item 4: a receiver that restarted accepted every captured frame once more.
#[test]
fn a_restarted_receiver_refuses_what_it_accepted_before() {
    let key = key_file("restart-rx", 20);
    let (a, b) = (card(&key), card(&key));
    connect(&a, &b);
    let captured: Vec<Vec<u8>> = (0..5u8).map(|i| send(&a, &frame(&[i; 64]))).collect();
    for f in &captured {
        assert!(deliver(&a, &b, f).is_some());
    }
    // b restarts (a reboot, an API reload: a new instance remembers nothing).
    let b = card(&key);
    for f in &captured {
        assert_eq!(
            deliver(&a, &b, f),
            None,
            "a recorded frame after the restart"
        );
    }
    assert_eq!(stat(&b, "admitted"), 1, "a answered: it runs now");
    assert_eq!(stat(&b, "opened"), 0);
    // a's new frames pass; the recorded ones stay refused now b knows a.
    assert!(deliver(&a, &b, &send(&a, &frame(b"new"))).is_some());
    for f in &captured {
        assert_eq!(deliver(&a, &b, f), None);
    }
    // The first recording started the handshake; the other four, and all five again,
    // were below the counter a answered with.
    assert_eq!(stat(&b, "unadmitted"), 1);
    assert_eq!(stat(&b, "replayed"), 4 + 5);
}

#[test]
fn a_restarted_senders_old_frames_are_refused() {
    let key = key_file("restart-tx", 21);
    let a = card(&key);
    let recorded = send(&a, &frame(b"sent before the restart"));
    // a restarts (a new epoch); b has never heard the recording.
    let (a, b) = (card(&key), card(&key));
    connect(&a, &b);
    // b asks the recording's epoch; the card at that address now is another epoch and
    // does not answer for it.
    assert_eq!(deliver(&a, &b, &recorded), None);
    assert_eq!(deliver(&a, &b, &recorded), None);
    assert_eq!(stat(&b, "admitted"), 1, "only the running a");
    assert_eq!(stat(&b, "opened"), 0);
    assert!(stat(&b, "unadmitted") >= 2);
}

#[test]
fn a_cards_own_frames_reflected_back_are_refused() {
    let key = key_file("reflect", 22);
    let (a, b) = (card(&key), card(&key));
    connect(&a, &b);
    let f = send(&a, &frame(b"echo"));
    assert_eq!(deliver(&b, &a, &f), None);
    assert_eq!(stat(&a, "reflected"), 1);
    // Its handshake messages too.
    let (_, asks) = receive_raw(&b, &send(&card(&key), &frame(b"x")));
    assert_eq!(asks.len(), 1);
    assert_eq!(receive_raw(&b, &asks[0]), (None, vec![]));
    assert_eq!(stat(&b, "reflected"), 1);
}

#[test]
fn any_number_of_senders_never_lets_a_replay_in_and_past_the_bound_they_are_refused() {
    let key = key_file("many", 23);
    let b = card_with(serde_json::json!({ "key_file": key, "max_peers": 8 }));
    let first = card(&key);
    connect(&first, &b);
    let delivered = send(&first, &frame(b"once"));
    assert!(deliver(&first, &b, &delivered).is_some());
    // 300 more senders: 7 fit, the rest are refused (their frames dropped and counted).
    let others: Vec<NetChain> = (0..300).map(|_| card(&key)).collect();
    for (i, o) in others.iter().enumerate() {
        assert_eq!(deliver(o, &b, &send(o, &frame(b"let me in"))), None);
        let opened = deliver(o, &b, &send(o, &frame(b"again"))).is_some();
        assert_eq!(opened, i < 7, "sender {i}");
    }
    assert_eq!(stat(&b, "peers"), 8);
    assert_eq!(stat(&b, "admitted"), 8);
    assert_eq!(stat(&b, "refused"), 293 * 2);
    assert_eq!(deliver(&first, &b, &delivered), None, "still a replay");
    assert!(deliver(&first, &b, &send(&first, &frame(b"new"))).is_some());
}

#[test]
fn no_two_senders_share_a_nonce_space() {
    let key = key_file("nonces", 10);
    let mut epochs = std::collections::HashSet::new();
    let cards: Vec<NetChain> = (0..16).map(|_| card(&key)).collect();
    let b = card(&key);
    for c in &cards {
        let f = send(c, &frame(b"n"));
        assert!(epochs.insert(f[18..34].to_vec()), "an epoch came twice");
        assert_eq!(&f[34..42], &1u64.to_be_bytes(), "every epoch counts from 1");
    }
    // Each sender's key is its own: a frame given another sender's epoch (the same
    // counter) does not open.
    let (x, y) = (&cards[0], &cards[1]);
    connect(y, &b);
    let mut f = send(x, &frame(b"whose?"));
    let theirs = send(y, &frame(b"mine"));
    f[18..34].copy_from_slice(&theirs[18..34]);
    f[34..42].copy_from_slice(&100u64.to_be_bytes());
    assert_eq!(deliver(x, &b, &f), None);
    assert_eq!(stat(&b, "forged"), 1);
}
