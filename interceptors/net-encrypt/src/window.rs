//! One sender's replay window: the highest counter opened and which of the `size` counters
//! below it were seen. A frame is accepted once; one older than the window is refused.
//! Updated only after a frame authenticated, so a forger cannot move it.

/// The largest window.
pub const MAX_WINDOW: u64 = 1 << 16;

pub struct Window {
    size: u64,
    highest: u64,
    /// Bit i: counter `highest - i` was seen (bit 0 is `highest` itself).
    seen: Vec<u64>,
}

impl Window {
    /// A window of `size` frames (1 to [`MAX_WINDOW`]) that refuses every counter up to
    /// `floor`: what the sender proved it had reached when the handshake ended.
    pub fn above(floor: u64, size: u64) -> Window {
        let size = size.clamp(1, MAX_WINDOW);
        Window {
            size,
            highest: floor,
            seen: vec![u64::MAX; size.div_ceil(64) as usize],
        }
    }

    /// Bytes the window holds.
    pub fn bytes(&self) -> usize {
        self.seen.len() * 8
    }

    /// Accepts counter `n` if it was not seen and is not older than the window; records it.
    pub fn accept(&mut self, n: u64) -> bool {
        if n > self.highest {
            shift(&mut self.seen, n - self.highest, self.size);
            self.highest = n;
            self.seen[0] |= 1;
            return true;
        }
        let back = self.highest - n;
        if back >= self.size {
            return false;
        }
        let (w, b) = ((back / 64) as usize, back % 64);
        if self.seen[w] & (1 << b) != 0 {
            return false;
        }
        self.seen[w] |= 1 << b;
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
        let mut w = Window::above(999, 128);
        assert!(!w.accept(999), "the floor itself");
        assert!(!w.accept(900), "below the floor");
        assert!(w.accept(1000));
        assert!(!w.accept(1000), "a replay");
        assert!(w.accept(1002));
        assert!(w.accept(1001), "late but in the window");
        assert!(!w.accept(1001));
        assert!(w.accept(1200));
        assert!(!w.accept(1002), "older than the window now");
        assert!(w.accept(1073), "1200 - 127: the window's last place");
        assert!(!w.accept(1072));
    }

    #[test]
    fn the_window_agrees_with_a_model_on_a_long_random_run() {
        let mut w = Window::above(499, 100);
        let mut seen = std::collections::HashSet::new();
        let mut highest = 499u64;
        let mut x = 12345u64;
        for _ in 0..20000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let n = 500 + (highest + x % 150).saturating_sub(120);
            let want = n > 499 && !seen.contains(&n) && n + 100 > highest;
            assert_eq!(w.accept(n), want, "counter {n}, highest {highest}");
            if want {
                seen.insert(n);
                highest = highest.max(n);
            }
        }
    }
}
