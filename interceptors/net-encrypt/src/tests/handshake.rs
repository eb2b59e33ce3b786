//! The handshake: what it sends, what it takes to be admitted, and what a recorded or
//! hostile handshake message gets.

use super::*;

#[test]
fn the_first_frame_from_a_new_sender_starts_a_handshake_of_three_messages() {
    let key = key_file("hs", 30);
    let (a, b) = (card(&key), card(&key));
    let first = send(&a, &frame(b"hello"));
    let (got, asks) = receive_raw(&b, &first);
    assert_eq!(got, None, "dropped until a is admitted");
    assert_eq!(asks.len(), 1, "b asks a");
    let q = &asks[0];
    assert_eq!(q.len(), wire::CONTROL_FRAME);
    assert_eq!(&q[..6], &first[6..12], "to a's address");
    assert_eq!(&q[12..16], &[0x88, 0xb5, VERSION, wire::KIND_CONTROL]);
    let (got, answers) = receive_raw(&a, q);
    assert_eq!(got, None);
    assert_eq!(answers.len(), 1, "a answers, and asks back");
    let (got, last) = receive_raw(&b, &answers[0]);
    assert_eq!(got, None);
    assert_eq!(stat(&b, "admitted"), 1);
    assert_eq!(last.len(), 1, "b answers a's question");
    assert_eq!(receive_raw(&a, &last[0]), (None, vec![]));
    assert_eq!(stat(&a, "admitted"), 1);
    assert_eq!(stat(&b, "unadmitted"), 1);
    // Both ways open now.
    let f = frame(b"now");
    assert_eq!(deliver(&a, &b, &send(&a, &f)).as_deref(), Some(&f[..]));
    assert_eq!(deliver(&b, &a, &send(&b, &f)).as_deref(), Some(&f[..]));
}

#[test]
fn recorded_handshake_messages_admit_no_one() {
    let key = key_file("hs-replay", 31);
    let (a, b) = (card(&key), card(&key));
    let first = send(&a, &frame(b"hello"));
    let (_, asks) = receive_raw(&b, &first);
    let (_, answers) = receive_raw(&a, &asks[0]);
    let recorded_answer = answers[0].clone();
    assert_eq!(receive_raw(&b, &recorded_answer).0, None);
    assert_eq!(stat(&b, "admitted"), 1);
    // The answer again: b admitted a already; its counter is spent.
    assert_eq!(receive_raw(&b, &recorded_answer), (None, vec![]));
    assert_eq!(stat(&b, "replayed"), 1);
    // A restarted b has no question out: the recorded answer admits nothing (and the
    // question in it is for the old b).
    let b2 = card(&key);
    assert_eq!(receive_raw(&b2, &recorded_answer), (None, vec![]));
    assert_eq!(stat(&b2, "admitted"), 0);
    // A question replayed to a after a restarted: for another epoch, ignored.
    let a2 = card(&key);
    assert_eq!(receive_raw(&a2, &asks[0]), (None, vec![]));
    assert_eq!(stat(&a2, "control_sent"), 0);
}

#[test]
fn a_replayed_question_gets_answers_at_a_bounded_rate() {
    let key = key_file("hs-rate", 32);
    let (a, b) = (card(&key), card(&key));
    let (_, asks) = receive_raw(&b, &send(&a, &frame(b"hello")));
    let q = &asks[0];
    // a has not admitted b: each copy is answered, up to the limit per second.
    let mut answered = 0;
    for _ in 0..peers::ANSWERS_PER_SECOND + 50 {
        answered += receive_raw(&a, q).1.len();
    }
    assert!(answered <= peers::ANSWERS_PER_SECOND as usize, "{answered}");
    assert!(stat(&a, "answers_limited") >= 50);
}

#[test]
fn a_key_id_lets_peers_rotate_keys_without_losing_each_other() {
    let (old, new) = (key_file("rot-old", 40), key_file("rot-new", 41));
    // a has moved to the new key (still opening the old); b still seals with the old
    // one and opens the new; c knows only the old.
    let a = card_with(serde_json::json!({
        "key_file": new, "key_id": 2, "accept_key_file": old, "accept_key_id": 1
    }));
    let b = card_with(serde_json::json!({
        "key_file": old, "key_id": 1, "accept_key_file": new, "accept_key_id": 2
    }));
    let c = card(&old);
    connect(&a, &b);
    let f = frame(b"across the rotation");
    let wire = send(&a, &f);
    assert_eq!(wire[16], 2, "a seals under key 2");
    assert_eq!(deliver(&a, &b, &wire).as_deref(), Some(&f[..]));
    assert_eq!(deliver(&b, &a, &send(&b, &f)).as_deref(), Some(&f[..]));
    assert_eq!(deliver(&a, &c, &send(&a, &f)), None);
    assert_eq!(stat(&c, "unknown_key"), 1);
}

#[test]
fn frames_of_another_wire_version_are_refused_and_counted() {
    let key = key_file("version", 42);
    let b = card(&key);
    // Version 1's layout: ethertype, version 1, 0, salt, counter, sealed part, tag.
    let mut v1 = frame(&[0u8; 60]);
    v1[12..16].copy_from_slice(&[0x88, 0xb5, 1, 0]);
    assert_eq!(receive_raw(&b, &v1), (None, vec![]));
    let mut v3 = send(&card(&key), &frame(b"from the future"));
    v3[14] = 3;
    assert_eq!(receive_raw(&b, &v3), (None, vec![]));
    assert_eq!(stat(&b, "wrong_version"), 2);
    assert_eq!(stat(&b, "forged") + stat(&b, "unsealed"), 0);
}
