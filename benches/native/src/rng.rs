//! The offsets: xorshift64* (Vigna), seeded, so a run's offset sequence is reproducible.
//! Uniform over the file's 4 KiB blocks, with repeats (no random map), like fio's
//! `--norandommap`.

pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> XorShift {
        // Zero is xorshift's one fixed point.
        XorShift(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (multiply-shift: no division, bias below 2^-40 for any file size).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_in_range_and_cover_the_file() {
        let blocks = 1000u64;
        let mut rng = XorShift::new(7);
        let mut seen = vec![0u32; blocks as usize];
        for _ in 0..200_000 {
            let block = rng.below(blocks);
            assert!(block < blocks, "block {block} past the end");
            seen[block as usize] += 1;
        }
        // 200 per block expected: every block is hit, none wildly more than others.
        assert!(
            seen.iter().all(|&n| (100..=320).contains(&n)),
            "skewed: {seen:?}"
        );
        // The last block is reachable; a one-block file always gives 0.
        assert!(seen[blocks as usize - 1] > 0);
        assert_eq!(XorShift::new(3).below(1), 0);
    }

    #[test]
    fn a_seed_repeats_its_sequence() {
        let a: Vec<u64> = {
            let mut r = XorShift::new(42);
            (0..8).map(|_| r.next_u64()).collect()
        };
        let mut r = XorShift::new(42);
        assert!(a.iter().all(|&v| v == r.next_u64()));
        assert_ne!(XorShift::new(0).next_u64(), 0);
    }
}
