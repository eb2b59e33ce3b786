//! Crashes at any point: a device that records every write and flush, the images a crash
//! can leave (writes since the last flush lost, reordered or torn by sector), and the store
//! opened on each.

use super::*;

/// A device that logs writes and flushes, for crashes at any point.
#[derive(Clone, Default)]
pub(super) struct Recording {
    pub(super) log: Arc<Mutex<Vec<Op>>>,
    pub(super) len: usize,
    /// The image before the log (none: zeroes).
    pub(super) base: Option<Arc<Vec<u8>>>,
}

#[derive(Clone)]
pub(super) enum Op {
    Write(u64, Vec<u8>),
    Flush,
}

impl Device for Recording {
    fn capacity(&self) -> u64 {
        self.len as u64
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let img = image_over(
            self.base.as_deref().map(|b| &b[..]),
            &self.log.lock().unwrap(),
            self.len,
            usize::MAX,
            |_, _| true,
        );
        buf.copy_from_slice(&img[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, offset: u64, buf: &[u8]) -> Result<(), IoError> {
        self.log
            .lock()
            .unwrap()
            .push(Op::Write(offset, buf.to_vec()));
        Ok(())
    }
    fn flush(&self) -> Result<(), IoError> {
        self.log.lock().unwrap().push(Op::Flush);
        Ok(())
    }
}

/// The image after the first `upto` ops, where writes after the last flush before `upto`
/// survive only where `keep(i, sector)` (a disk that lost, reordered or tore them: each
/// 512-byte sector of write `i` lands or not).
pub(super) fn image(
    log: &[Op],
    len: usize,
    upto: usize,
    keep: impl Fn(usize, usize) -> bool,
) -> Vec<u8> {
    image_over(None, log, len, upto, keep)
}

pub(super) fn image_over(
    base: Option<&[u8]>,
    log: &[Op],
    len: usize,
    upto: usize,
    keep: impl Fn(usize, usize) -> bool,
) -> Vec<u8> {
    let upto = upto.min(log.len());
    let last_flush = log[..upto]
        .iter()
        .rposition(|o| matches!(o, Op::Flush))
        .map_or(0, |p| p + 1);
    let mut img = base.map_or_else(|| vec![0u8; len], |b| b.to_vec());
    for (i, op) in log[..upto].iter().enumerate() {
        if let Op::Write(off, data) = op {
            for (k, sector) in data.chunks(SECTOR as usize).enumerate() {
                if i < last_flush || keep(i, k) {
                    let at = *off as usize + k * SECTOR as usize;
                    img[at..at + sector.len()].copy_from_slice(sector);
                }
            }
        }
    }
    img
}

/// The crash tests' guest blocks start here, so that they straddle two map pages.
const OFF: u64 = crate::format::PAGE_ENTRIES - 24;
const STRADDLING: u64 = crate::format::PAGE_ENTRIES + 48;

#[test]
fn after_a_crash_at_any_point_every_block_reads_old_or_new_and_flushed_writes_stay() {
    const BLOCKS: u64 = 48;
    // Tight space (14 blocks of metadata, 56 of data for 48 guest blocks), so that freed
    // units are soon needed again: reusing one before its commit is durable must show.
    const LEN: usize = 70 * BLOCK as usize;
    // The blocks written straddle two map pages: a checkpoint writes one or both.
    let mut points = 0;
    for seed in 1..=6u64 {
        let dev = Recording {
            len: LEN,
            ..Default::default()
        };
        let mut s = Store::open(dev.clone(), &opts(STRADDLING)).unwrap();
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        // For each block: its value after each commit, and every value written since.
        let mut committed: HashMap<u64, Option<u64>> = HashMap::new();
        // (log position when the op was done, block, value)
        let mut history: Vec<(usize, u64, Option<u64>)> = Vec::new();
        // (log position when a commit returned, snapshot of committed)
        // Format counts as a commit of all holes from the start: a crash during it must
        // leave a store that opens (formatted again) with nothing in it.
        let mut commits: Vec<(usize, HashMap<u64, Option<u64>>)> = vec![(0, committed.clone())];
        let mut current: HashMap<u64, Option<u64>> = HashMap::new();
        for step in 0..120u64 {
            let r = rng.next() % 10;
            if r < 6 {
                let first = rng.next() % BLOCKS;
                let n = (1 + rng.next() % 4).min(BLOCKS - first);
                let vals: Vec<u64> = (0..n).map(|k| seed * 100_000 + step * 10 + k).collect();
                let data: Vec<Vec<u8>> = vals.iter().map(|&v| block(v)).collect();
                if write_raw(&mut s, OFF + first, &data).is_ok() {
                    for (k, v) in vals.iter().enumerate() {
                        current.insert(first + k as u64, Some(*v));
                        history.push((dev.log.lock().unwrap().len(), first + k as u64, Some(*v)));
                    }
                }
            } else if r < 8 {
                let first = rng.next() % BLOCKS;
                let n = (1 + rng.next() % 3).min(BLOCKS - first);
                s.punch(OFF + first, n).unwrap();
                for b in first..first + n {
                    current.insert(b, None);
                    history.push((dev.log.lock().unwrap().len(), b, None));
                }
            } else {
                s.commit().unwrap();
                committed = current.clone();
                commits.push((dev.log.lock().unwrap().len(), committed.clone()));
            }
        }
        let log = dev.log.lock().unwrap().clone();
        for k in 0..=log.len() {
            // The last commit that had returned by position k, and what followed it.
            let (at, base) = commits.iter().rev().find(|(p, _)| *p <= k).unwrap();
            // Which writes since the last flush reached the disk: all, none, only the
            // latest (the one a missing flush would let overtake the others), a
            // pseudo-random half, or all but the latest, torn: a pseudo-random half of its
            // sectors, or its first sectors only.
            for variant in 0..7u64 {
                let half = |x: u64| (x.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) & 1 == 1;
                let keep = |i: usize, sector: usize| match variant {
                    0 => true,
                    1 => false,
                    2 => i + 1 == k,
                    3 | 4 => half(i as u64 ^ (seed << 8) ^ variant),
                    5 => i + 1 != k || half((sector as u64) ^ (seed << 16) ^ i as u64),
                    _ => i + 1 != k || sector < 3,
                };
                let img = image(&log, LEN, k, keep);
                let s = Store::open(MemDevice::from_bytes(img), &opts(STRADDLING))
                    .unwrap_or_else(|e| panic!("seed {seed}, crash at {k}/{variant}: {e}"));
                points += 1;
                for b in 0..BLOCKS {
                    let got = read_raw(&s, OFF + b)
                        .unwrap_or_else(|e| panic!("seed {seed}, crash at {k}/{variant}: {e}"));
                    let mut allowed: Vec<Option<Vec<u8>>> =
                        vec![base.get(&b).copied().flatten().map(block)];
                    // Anything written after that commit returned (an op is recorded with
                    // the log's length once it is done, and every commit adds a flush, so
                    // an op recorded at `at` came after the commit).
                    allowed.extend(
                        history
                            .iter()
                            .filter(|(p, hb, _)| *hb == b && *p >= *at)
                            .map(|(_, _, v)| v.map(block)),
                    );
                    assert!(
                        allowed.contains(&got),
                        "seed {seed}, crash at {k}/{variant}: block {b} reads {:?}",
                        got.map(|g| g[0])
                    );
                }
            }
        }
    }
    assert!(points > 1000, "{points}");
}

/// Recovery itself must be crash-safe: crash, reopen (which replays and checkpoints), write
/// a little, crash again, reopen. Every open must succeed and every block read without a
/// check failure.
#[test]
fn a_crash_during_or_after_recovery_is_recovered_too() {
    const BLOCKS: u64 = 48;
    const LEN: usize = 70 * BLOCK as usize;
    for seed in 1..=4u64 {
        let dev = Recording {
            len: LEN,
            ..Default::default()
        };
        let mut s = Store::open(dev.clone(), &opts(STRADDLING)).unwrap();
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        for step in 0..80u64 {
            let first = OFF + rng.next() % (BLOCKS - 2);
            let _ = write_raw(&mut s, first, &[block(step), block(step + 1)]);
            if rng.next().is_multiple_of(4) {
                s.commit().unwrap();
            }
        }
        let log = dev.log.lock().unwrap().clone();
        for k in 0..=log.len() {
            for variant in 0..4u64 {
                let keep = |i: usize, sector: usize| match variant {
                    0 => true,
                    1 => i + 1 == k,
                    2 => ((i as u64 ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) & 1 == 1,
                    // The latest write torn: its first sector only.
                    _ => i + 1 != k || sector == 0,
                };
                let img = Arc::new(image(&log, LEN, k, keep));
                let dev2 = Recording {
                    len: LEN,
                    base: Some(img.clone()),
                    ..Default::default()
                };
                let mut s2 = Store::open(dev2.clone(), &opts(STRADDLING))
                    .unwrap_or_else(|e| panic!("seed {seed}, crash at {k}/{variant}: {e}"));
                for step in 0..12u64 {
                    let _ = write_raw(&mut s2, OFF + step * 3 % BLOCKS, &[block(1000 + step)]);
                    if step % 5 == 4 {
                        s2.commit().unwrap();
                    }
                }
                let log2 = dev2.log.lock().unwrap().clone();
                for k2 in (0..=log2.len()).step_by(3) {
                    let img2 = image_over(Some(&img), &log2, LEN, k2, |i, sector| {
                        (i + k) % 2 == 0 && (i + 1 != k2 || sector % 2 == 0)
                    });
                    let s3 = Store::open(MemDevice::from_bytes(img2), &opts(STRADDLING))
                        .unwrap_or_else(|e| {
                            panic!("seed {seed}, crash at {k}/{variant}, then at {k2}: {e}")
                        });
                    for b in 0..BLOCKS {
                        read_raw(&s3, OFF + b).unwrap_or_else(|e| {
                            panic!("seed {seed}, crash at {k}/{variant}, then at {k2}: {e}")
                        });
                    }
                }
            }
        }
    }
}
