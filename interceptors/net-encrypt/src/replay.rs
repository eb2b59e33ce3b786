//! The replay window: for each sender (its per-boot salt), the highest counter opened and
//! which of the `window` counters below it were seen. A frame is accepted once; one older
//! than the window is refused. Updated only after a frame authenticated, so a forger cannot
//! move it.

/// Senders remembered at once (least recently heard from goes first; a forgotten sender's
/// next frame starts a fresh window, which a replay of its old frames could then pass:
/// keep this above the number of peers).
pub const MAX_SENDERS: usize = 64;
/// The largest window.
pub const MAX_WINDOW: u64 = 1 << 16;

struct Sender {
    salt: [u8; 4],
    highest: u64,
    /// Bit i: counter `highest - i` was seen (bit 0 is `highest` itself).
    seen: Vec<u64>,
    last_used: u64,
}

pub struct Window {
    size: u64,
    senders: Vec<Sender>,
    clock: u64,
}

impl Window {
    /// A window of `size` frames (1 to [`MAX_WINDOW`]).
    pub fn new(size: u64) -> Window {
        Window {
            size: size.clamp(1, MAX_WINDOW),
            senders: Vec::new(),
            clock: 0,
        }
    }

    /// Accepts counter `n` of sender `salt` if it was not seen and is not older than the
    /// window; records it.
    pub fn accept(&mut self, salt: [u8; 4], n: u64) -> bool {
        self.clock += 1;
        let words = self.size.div_ceil(64) as usize;
        let i = match self.senders.iter().position(|s| s.salt == salt) {
            Some(i) => i,
            None => {
                if self.senders.len() >= MAX_SENDERS {
                    let oldest = (0..self.senders.len())
                        .min_by_key(|&i| self.senders[i].last_used)
                        .unwrap_or(0);
                    self.senders.swap_remove(oldest);
                }
                let mut seen = vec![0u64; words];
                seen[0] = 1;
                self.senders.push(Sender {
                    salt,
                    highest: n,
                    seen,
                    last_used: self.clock,
                });
                return true;
            }
        };
        let size = self.size;
        let s = &mut self.senders[i];
        s.last_used = self.clock;
        if n > s.highest {
            shift(&mut s.seen, n - s.highest, size);
            s.highest = n;
            s.seen[0] |= 1;
            return true;
        }
        let back = s.highest - n;
        if back >= size {
            return false;
        }
        let (w, b) = ((back / 64) as usize, back % 64);
        if s.seen[w] & (1 << b) != 0 {
            return false;
        }
        s.seen[w] |= 1 << b;
        true
    }
}

/// Moves every bit `by` places toward the old end, dropping what falls past `size`.
fn shift(seen: &mut [u64], by: u64, size: u64) {
    if by >= size {
        seen.fill(0);
        return;
    }
    let (words, bits) = ((by / 64) as usize, (by % 64) as u32);
    for i in (0..seen.len()).rev() {
        let from = i.checked_sub(words);
        let hi = from.map_or(0, |f| seen[f]);
        let lo = from.and_then(|f| f.checked_sub(1)).map_or(0, |f| seen[f]);
        seen[i] = if bits == 0 {
            hi
        } else {
            (hi << bits) | (lo >> (64 - bits))
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_counter_passes_once_and_old_ones_not_at_all() {
        let mut w = Window::new(128);
        let s = [1, 2, 3, 4];
        assert!(w.accept(s, 1000));
        assert!(!w.accept(s, 1000), "a replay");
        assert!(w.accept(s, 1002));
        assert!(w.accept(s, 1001), "late but in the window");
        assert!(!w.accept(s, 1001));
        assert!(w.accept(s, 1200));
        assert!(!w.accept(s, 1002), "older than the window now");
        assert!(w.accept(s, 1073), "1200 - 127: the window's last place");
        assert!(!w.accept(s, 1072));
        // Another sender has its own window.
        assert!(w.accept([9, 9, 9, 9], 1000));
    }

    #[test]
    fn the_window_agrees_with_a_model_on_a_long_random_run() {
        let mut w = Window::new(100);
        let mut seen = std::collections::HashSet::new();
        let mut highest = 0u64;
        let mut x = 12345u64;
        for _ in 0..20000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let n = 500 + (highest + x % 150).saturating_sub(120);
            let want = if seen.is_empty() {
                true
            } else {
                !seen.contains(&n) && n + 100 > highest
            };
            assert_eq!(w.accept([0; 4], n), want, "counter {n}, highest {highest}");
            if want {
                seen.insert(n);
                highest = highest.max(n);
            }
        }
    }

    #[test]
    fn senders_past_the_limit_push_out_the_least_recent() {
        let mut w = Window::new(64);
        for i in 0..=MAX_SENDERS as u8 {
            assert!(w.accept([i, 0, 0, 0], 5));
        }
        assert_eq!(w.senders.len(), MAX_SENDERS);
        assert!(!w.senders.iter().any(|s| s.salt == [0, 0, 0, 0]));
    }
}
