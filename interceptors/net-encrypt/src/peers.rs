//! The senders a card opens frames from, and the handshakes that admit them
//! (docs/net-encrypt.md, "Receiving"). A sender is admitted only after it answered a
//! question this instance drew at random: so only a sender running now gets in (never a
//! recording of an earlier boot's frames, whatever this card forgot when it restarted),
//! and from the counter its answer carried on (never a recording of its earlier frames).
//!
//! Everything is bounded: `max_peers` admitted senders, [`MAX_PENDING`] handshakes at once,
//! [`ANSWERS_PER_SECOND`] answers sent. A sender that finds the table full is not admitted
//! (its frames are dropped and counted) until a peer has been silent for [`IDLE`]: a peer
//! let go is asked again when it next speaks, so forgetting one never lets a replay in.
//!
//! Generic over what is kept per sender (`T`: its cipher), so that the rules are tested
//! without one. Time comes in as an argument for the same reason.

use crate::window::Window;
use crate::wire::{Epoch, Nonce};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Handshakes in progress at once.
pub const MAX_PENDING: usize = 64;
/// A question unanswered this long is forgotten.
pub const PENDING_TTL: Duration = Duration::from_secs(3);
/// A question is asked again (with the same nonce) at most this often while its sender's
/// frames keep coming.
pub const ASK_AGAIN: Duration = Duration::from_millis(200);
/// A peer silent this long may be let go to admit another.
pub const IDLE: Duration = Duration::from_secs(30);
/// Answers sent at most, per second (a recorded question replayed makes no flood).
pub const ANSWERS_PER_SECOND: u32 = 1000;

struct Peer<T> {
    key_id: u8,
    keep: T,
    window: Window,
    last_heard: Instant,
}

struct Pending<T> {
    key_id: u8,
    keep: T,
    nonce: Nonce,
    asked_at: Instant,
}

/// What to do about a sender not admitted yet.
#[derive(Debug, PartialEq, Eq)]
pub enum Ask {
    /// Send it this question.
    Send(Nonce),
    /// A question went out a moment ago: wait for its answer.
    Wait,
    /// The table of peers (or of handshakes) is full: the sender is refused.
    Full,
}

pub struct Peers<T> {
    max_peers: usize,
    window: u64,
    admitted: HashMap<Epoch, Peer<T>>,
    pending: HashMap<Epoch, Pending<T>>,
    answers: (Instant, u32),
}

impl<T> Peers<T> {
    pub fn new(max_peers: usize, window: u64, now: Instant) -> Peers<T> {
        Peers {
            max_peers: max_peers.max(1),
            window,
            admitted: HashMap::new(),
            pending: HashMap::new(),
            answers: (now, 0),
        }
    }

    /// Peers admitted now.
    pub fn len(&self) -> usize {
        self.admitted.len()
    }

    /// What is kept for `epoch` under `key_id`, admitted or being asked.
    pub fn keep(&self, epoch: &Epoch, key_id: u8) -> Option<&T> {
        if let Some(p) = self.admitted.get(epoch) {
            return (p.key_id == key_id).then_some(&p.keep);
        }
        self.pending
            .get(epoch)
            .filter(|p| p.key_id == key_id)
            .map(|p| &p.keep)
    }

    pub fn is_admitted(&self, epoch: &Epoch) -> bool {
        self.admitted.contains_key(epoch)
    }

    /// Counter `n` of an admitted sender: true if it is new (and now seen); false if it is
    /// a replay or older than the window, or the sender is not admitted.
    pub fn accept(&mut self, epoch: &Epoch, n: u64, now: Instant) -> bool {
        let Some(p) = self.admitted.get_mut(epoch) else {
            return false;
        };
        if !p.window.accept(n) {
            return false;
        }
        p.last_heard = now;
        true
    }

    /// A sender not admitted sent an authentic frame: ask it (`fresh` is a new random
    /// nonce, used if no question is out yet; `keep` makes what to keep for it).
    pub fn ask(
        &mut self,
        epoch: Epoch,
        key_id: u8,
        fresh: Nonce,
        keep: impl FnOnce() -> T,
        now: Instant,
    ) -> Ask {
        if let Some(p) = self.pending.get_mut(&epoch) {
            if p.key_id == key_id {
                if now.duration_since(p.asked_at) < ASK_AGAIN {
                    return Ask::Wait;
                }
                p.asked_at = now;
                return Ask::Send(p.nonce);
            }
        }
        self.pending
            .retain(|_, p| now.duration_since(p.asked_at) < PENDING_TTL);
        if self.pending.len() >= MAX_PENDING || !self.room(now) {
            return Ask::Full;
        }
        self.pending.insert(
            epoch,
            Pending {
                key_id,
                keep: keep(),
                nonce: fresh,
                asked_at: now,
            },
        );
        Ask::Send(fresh)
    }

    /// `epoch` answered question `nonce` with a frame of counter `n`: admits it, refusing
    /// every counter up to `n`. False if no such question is out (a stale or recorded
    /// answer) or the table is full.
    pub fn answered(
        &mut self,
        epoch: &Epoch,
        key_id: u8,
        nonce: &Nonce,
        n: u64,
        now: Instant,
    ) -> bool {
        match self.pending.get(epoch) {
            Some(p) if p.key_id == key_id && p.nonce == *nonce => {}
            _ => return false,
        }
        if !self.room(now) {
            return false;
        }
        let Some(p) = self.pending.remove(epoch) else {
            return false;
        };
        self.admitted.insert(
            *epoch,
            Peer {
                key_id,
                keep: p.keep,
                window: Window::above(n, self.window),
                last_heard: now,
            },
        );
        true
    }

    /// One more answer may go out now.
    pub fn may_answer(&mut self, now: Instant) -> bool {
        let (since, sent) = &mut self.answers;
        if now.duration_since(*since) >= Duration::from_secs(1) {
            *since = now;
            *sent = 0;
        }
        if *sent >= ANSWERS_PER_SECOND {
            return false;
        }
        *sent += 1;
        true
    }

    /// Whether one more peer fits, letting go of the one silent longest if it has been
    /// silent for [`IDLE`].
    fn room(&mut self, now: Instant) -> bool {
        if self.admitted.len() < self.max_peers {
            return true;
        }
        let idlest = self
            .admitted
            .iter()
            .min_by_key(|(_, p)| p.last_heard)
            .map(|(e, p)| (*e, p.last_heard));
        match idlest {
            Some((e, heard)) if now.duration_since(heard) >= IDLE => {
                self.admitted.remove(&e);
                true
            }
            _ => false,
        }
    }

    /// Bytes the admitted peers' windows hold.
    pub fn window_bytes(&self) -> usize {
        self.admitted.values().map(|p| p.window.bytes()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch(i: u8) -> Epoch {
        [i; 16]
    }

    /// Asks `e` and has it answer with counter `n`.
    fn admit(p: &mut Peers<()>, e: Epoch, n: u64, now: Instant) -> bool {
        let nonce = [e[0] ^ 0x55; 16];
        match p.ask(e, 1, nonce, || (), now) {
            Ask::Send(q) => p.answered(&e, 1, &q, n, now),
            _ => false,
        }
    }

    #[test]
    fn a_sender_gets_in_only_by_answering_the_question_out() {
        let t = Instant::now();
        let mut p = Peers::<()>::new(8, 64, t);
        let e = epoch(1);
        assert!(!p.accept(&e, 5, t), "not admitted: nothing accepted");
        let q = [7u8; 16];
        assert_eq!(p.ask(e, 1, q, || (), t), Ask::Send(q));
        assert_eq!(
            p.ask(e, 1, [8; 16], || (), t),
            Ask::Wait,
            "asked a moment ago"
        );
        assert_eq!(
            p.ask(e, 1, [8; 16], || (), t + ASK_AGAIN),
            Ask::Send(q),
            "asked again, the same question"
        );
        assert!(
            !p.answered(&e, 1, &[8; 16], 100, t),
            "another question's answer"
        );
        assert!(!p.answered(&e, 2, &q, 100, t), "under another key");
        assert!(!p.answered(&epoch(2), 1, &q, 100, t), "from another sender");
        assert!(p.answered(&e, 1, &q, 100, t));
        assert!(!p.answered(&e, 1, &q, 100, t), "the same answer again");
        assert!(!p.accept(&e, 100, t), "the answer's own counter");
        assert!(!p.accept(&e, 99, t), "what it sent before its answer");
        assert!(p.accept(&e, 101, t));
        assert!(!p.accept(&e, 101, t), "a replay");
    }

    #[test]
    fn a_full_table_refuses_new_senders_until_a_peer_goes_quiet() {
        let t = Instant::now();
        let mut p = Peers::<()>::new(4, 64, t);
        for i in 0..4 {
            assert!(admit(&mut p, epoch(i), 10, t));
        }
        assert_eq!(p.ask(epoch(9), 1, [9; 16], || (), t), Ask::Full);
        // Every peer keeps speaking: still full; a replay of any is still refused.
        let later = t + IDLE;
        for i in 1..4 {
            assert!(p.accept(&epoch(i), 11, later));
        }
        assert!(!p.accept(&epoch(0), 10, later));
        assert_eq!(p.ask(epoch(9), 1, [9; 16], || (), t + IDLE / 2), Ask::Full);
        // Peer 0 has been silent for IDLE: it makes room, and is asked again if it comes
        // back (from the counter it answers with: its old frames stay refused).
        assert!(admit(&mut p, epoch(9), 50, later));
        assert!(!p.is_admitted(&epoch(0)));
        assert_eq!(p.len(), 4);
        assert!(!p.accept(&epoch(0), 12, later), "let go: asked again first");
    }

    #[test]
    fn handshakes_are_bounded_and_forgotten_when_unanswered() {
        let t = Instant::now();
        let mut p = Peers::<()>::new(1000, 64, t);
        for i in 0..MAX_PENDING {
            let e = [i as u8, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];
            assert!(matches!(p.ask(e, 1, [1; 16], || (), t), Ask::Send(_)));
        }
        assert_eq!(p.ask(epoch(0xff), 1, [1; 16], || (), t), Ask::Full);
        assert!(matches!(
            p.ask(epoch(0xff), 1, [1; 16], || (), t + PENDING_TTL),
            Ask::Send(_)
        ));
    }

    #[test]
    fn answers_are_limited_per_second() {
        let t = Instant::now();
        let mut p = Peers::<()>::new(1, 64, t);
        for _ in 0..ANSWERS_PER_SECOND {
            assert!(p.may_answer(t));
        }
        assert!(!p.may_answer(t + Duration::from_millis(999)));
        assert!(p.may_answer(t + Duration::from_secs(1)));
    }
}
