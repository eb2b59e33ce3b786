use super::*;
use crash::{image_over, Op, Recording};
use std::collections::HashMap;

mod crash;

fn opts(logical_blocks: u64) -> OpenOptions {
    OpenOptions {
        owner: "test".into(),
        logical_blocks,
        journal_blocks: 4,
        owner_config: [3; 16],
        format: false,
        read_only: false,
    }
}

fn block(seed: u64) -> Vec<u8> {
    (0..BLOCK as usize)
        .map(|i| (seed as usize).wrapping_mul(31).wrapping_add(i * 7) as u8 | 1)
        .collect()
}

fn write_raw<D: Device>(
    s: &mut Store<D>,
    first: u64,
    blocks: &[Vec<u8>],
) -> Result<(), StoreError> {
    let mut bytes = Vec::new();
    let mut checks = Vec::new();
    for b in blocks {
        checks.push(block_check(s.key(), b));
        bytes.extend_from_slice(b);
    }
    s.write(vec![NewExtent {
        first_block: first,
        codec: Codec::Raw,
        bytes,
        checks,
    }])
}

/// What a raw store says block `b` holds: `None` for a hole, an error for a bad check.
fn read_raw<D: Device>(s: &Store<D>, b: u64) -> Result<Option<Vec<u8>>, String> {
    match s.entry(b).map_err(|e| e.to_string())? {
        Entry::Hole => Ok(None),
        Entry::Stored {
            sector,
            index,
            check,
            ..
        } => {
            let mut buf = vec![0u8; BLOCK as usize];
            s.read_extent_part(sector, u64::from(index) * BLOCK, &mut buf)
                .map_err(|e| e.to_string())?;
            if block_check(s.key(), &buf) != check {
                return Err(format!("block {b}: check mismatch"));
            }
            Ok(Some(buf))
        }
    }
}

#[test]
fn data_survives_a_reopen_and_a_journal_that_wraps_into_checkpoints() {
    let dev = MemDevice::new(2 << 20);
    let s = Store::open(dev.clone(), &opts(64)).unwrap();
    assert_eq!(s.format_version(), (3, 3));
    survives_reopens_and_checkpoints(dev, s);
}

/// A store formatted before version 3 (the whole map in each checkpoint) is written,
/// checkpointed and reopened as it is, and stays version 2.
#[test]
fn a_version_2_store_keeps_working_as_version_2() {
    let dev = MemDevice::new(2 << 20);
    let s = Store::format_as(dev.clone(), &opts(64), 2).unwrap();
    assert_eq!(s.format_version(), (2, 2));
    survives_reopens_and_checkpoints(dev.clone(), s);
    let s = Store::open(dev, &opts(64)).unwrap();
    assert_eq!(s.format_version(), (2, 2));
    assert_eq!(s.map_entries_in_memory(), 8);
}

fn survives_reopens_and_checkpoints(dev: MemDevice, mut s: Store<MemDevice>) {
    for round in 0..40u64 {
        for b in 0..8 {
            write_raw(&mut s, b * 3, &[block(round * 100 + b)]).unwrap();
        }
        s.commit().unwrap();
    }
    assert!(s.stats().checkpoints >= 2, "{:?}", s.stats());
    drop(s);
    let s = Store::open(dev, &opts(64)).unwrap();
    for b in 0..8 {
        assert_eq!(read_raw(&s, b * 3).unwrap(), Some(block(3900 + b)));
    }
    assert_eq!(read_raw(&s, 1).unwrap(), None);
    assert_eq!(s.owner_config(), [3; 16]);
}

/// A full store refuses a write that maps a hole once only the overwrite reserve is left,
/// without harm; overwrites of stored blocks still go in (copy on write takes the new units
/// first, and the store commits by itself to free the old ones); space discarded comes back
/// after the commit.
#[test]
fn overwritten_space_comes_back_after_the_commit_and_a_full_store_refuses_without_harm() {
    let dev = MemDevice::new(1 << 20);
    // Thin: 1024 guest blocks (4 MiB) on 1 MiB.
    let mut s = Store::open(dev.clone(), &opts(1024)).unwrap();
    let units = s.free_bytes() / BLOCK;
    let reserve = crate::overwrite_reserve(s.geometry().physical_blocks);
    assert_eq!(reserve, 4);
    for b in 0..units - reserve {
        write_raw(&mut s, b, &[block(b)]).unwrap();
    }
    assert_eq!(s.free_bytes(), reserve * BLOCK);
    assert_eq!(
        write_raw(&mut s, units + 1, &[block(9)]),
        Err(StoreError::NoSpace)
    );
    assert_eq!(s.stats().no_space, 1);
    // Three times the reserve of overwrites: each takes a unit before its old one is free.
    for b in 0..3 * reserve {
        write_raw(&mut s, b, &[block(b + 5000)]).unwrap();
    }
    s.commit().unwrap();
    assert_eq!(s.free_bytes(), reserve * BLOCK);
    // Discarded blocks are held until the commit, then free: a new block fits again.
    s.punch(3 * reserve, 4).unwrap();
    assert_eq!(s.free_bytes(), reserve * BLOCK, "held until the commit");
    s.commit().unwrap();
    assert_eq!(s.free_bytes(), (reserve + 4) * BLOCK);
    write_raw(&mut s, units + 1, &[block(9)]).unwrap();
    for b in 0..units - reserve {
        let want = match b {
            b if b < 3 * reserve => Some(block(b + 5000)),
            b if b < 3 * reserve + 4 => None,
            b => Some(block(b)),
        };
        assert_eq!(read_raw(&s, b).unwrap(), want, "block {b}");
    }
    assert_eq!(read_raw(&s, units + 1).unwrap(), Some(block(9)));
    assert_eq!(s.stats().no_space, 1);
    assert_eq!(s.check_space(), Vec::<String>::new());
}

#[test]
fn damage_is_refused_with_a_reason_and_a_foreign_device_is_not_formatted() {
    let dev = MemDevice::new(1 << 20);
    let mut s = Store::open(dev.clone(), &opts(64)).unwrap();
    write_raw(&mut s, 5, &[block(5)]).unwrap();
    s.checkpoint().unwrap();
    let g = s.geometry();
    drop(s);
    let good = dev.snapshot();

    // Another owner.
    let mut other = opts(64);
    other.owner = "other".into();
    let e = Store::open(MemDevice::from_bytes(good.clone()), &other)
        .err()
        .unwrap();
    assert!(e.to_string().contains("formatted by `test`"), "{e}");

    // A bit of the directory in the named checkpoint slot (slot of the newest superblock):
    // the store has alternated slots, so damage both to be sure one is the named one.
    let mut bad = good.clone();
    for slot in 0..2 {
        bad[(g.slot_start(slot) * BLOCK + BLOCK + 1) as usize] ^= 0x10;
    }
    let e = Store::open(MemDevice::from_bytes(bad), &opts(64))
        .err()
        .unwrap();
    assert!(e.to_string().contains("does not match its check"), "{e}");

    // A bit of the map page holding block 5, in both its slots.
    let mut bad = good.clone();
    for slot in 0..2 {
        bad[(g.page_block(0, slot) * BLOCK + 64 + 5 * 16) as usize] ^= 0x10;
    }
    let e = Store::open(MemDevice::from_bytes(bad), &opts(64))
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("map page 0") && e.to_string().contains("damaged"),
        "{e}"
    );

    // Both superblocks.
    let mut bad = good.clone();
    bad[20] ^= 1;
    bad[4096 + 20] ^= 1;
    let e = Store::open(MemDevice::from_bytes(bad), &opts(64))
        .err()
        .unwrap();
    assert!(e.to_string().contains("superblock"), "{e}");

    // A device with data and no store.
    let mut foreign = vec![0u8; 1 << 20];
    foreign[700_000] = 1;
    let e = Store::open(MemDevice::from_bytes(foreign.clone()), &opts(64))
        .err()
        .unwrap();
    assert_eq!(e, StoreError::NotBlank(700_000));
    let mut yes = opts(64);
    yes.format = true;
    assert!(Store::open(MemDevice::from_bytes(foreign), &yes).is_ok());

    // Read-only: served, writes refused, nothing written.
    let mut ro = opts(64);
    ro.read_only = true;
    let dev = MemDevice::from_bytes(good.clone());
    let mut s = Store::open(dev.clone(), &ro).unwrap();
    assert_eq!(read_raw(&s, 5).unwrap(), Some(block(5)));
    assert_eq!(write_raw(&mut s, 1, &[block(1)]), Err(StoreError::ReadOnly));
    drop(s);
    assert!(dev.snapshot() == good);
}

/// A small xorshift generator: deterministic workloads from a seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The superblock of `img` as copy `copy` holds it.
fn superblock_of(img: &[u8], copy: usize) -> crate::format::Superblock {
    let b = &img[copy * BLOCK as usize..(copy + 1) * BLOCK as usize];
    crate::format::Superblock::decode(b).unwrap().unwrap()
}

/// `img` with both superblock copies replaced by `sb`, its check made right again (the
/// check is not keyed: anyone who can write the image can do this).
fn with_superblock(img: &[u8], sb: &crate::format::Superblock) -> Vec<u8> {
    let mut img = img.to_vec();
    let b = sb.encode();
    img[..BLOCK as usize].copy_from_slice(&b);
    img[BLOCK as usize..2 * BLOCK as usize].copy_from_slice(&b);
    img
}

/// Issue 29, item 5: fields of a superblock someone edited (and signed again) are checked
/// against the device and each other, and counters at their end refuse rather than wrap:
/// `journal_blocks` near 2^64 once put data over the map and journal; `checkpoint_seq` and
/// `generation` at u64::MAX made the next open read an older state.
#[test]
fn edited_superblock_fields_are_refused_and_counters_never_wrap() {
    let dev = MemDevice::new(1 << 20);
    let mut s = Store::open(dev.clone(), &opts(64)).unwrap();
    write_raw(&mut s, 5, &[block(5)]).unwrap();
    s.checkpoint().unwrap();
    drop(s);
    let good = dev.snapshot();
    let sb = superblock_of(&good, 0);

    let mut bad = sb.clone();
    bad.geometry.journal_blocks = u64::MAX - 2;
    let e = Store::open(
        MemDevice::from_bytes(with_superblock(&good, &bad)),
        &opts(64),
    )
    .err()
    .expect("a journal past the device opened");
    assert!(e.to_string().contains("geometry is impossible"), "{e}");
    let mut bad = sb.clone();
    bad.geometry.journal_blocks = 0;
    assert!(Store::open(
        MemDevice::from_bytes(with_superblock(&good, &bad)),
        &opts(64)
    )
    .is_err());

    for (what, edit) in [
        (
            "checkpoint number",
            (|sb| sb.checkpoint_seq = u64::MAX) as fn(&mut crate::format::Superblock),
        ),
        ("superblock generation", |sb| sb.generation = u64::MAX),
        ("journal sequence number", |sb| {
            sb.journal_seq = u64::MAX - 3
        }),
    ] {
        let mut bad = sb.clone();
        edit(&mut bad);
        if what == "checkpoint number" {
            // The checkpoint slot must carry the number the superblock names.
            let mut img = with_superblock(&good, &bad);
            let start = (sb.geometry.slot_start(sb.checkpoint_slot) * BLOCK) as usize;
            let map_len = (sb.geometry.pages() as usize) * 8;
            let map = img[start + BLOCK as usize..start + BLOCK as usize + map_len].to_vec();
            let header = crate::format::encode_checkpoint_header(u64::MAX, &map);
            img[start..start + BLOCK as usize].copy_from_slice(&header);
            check_counter_refusal(what, img);
        } else {
            check_counter_refusal(what, with_superblock(&good, &bad));
        }
    }
}

/// With `what` at its end, the store opens and serves block 5, and the next checkpoint (or
/// commit, for the journal's numbers) refuses, naming it, instead of wrapping; nothing
/// changes on the image.
fn check_counter_refusal(what: &str, img: Vec<u8>) {
    let dev = MemDevice::from_bytes(img.clone());
    let mut s = Store::open(dev.clone(), &opts(64)).unwrap();
    assert_eq!(read_raw(&s, 5).unwrap(), Some(block(5)), "{what}");
    write_raw(&mut s, 6, &[block(6)]).unwrap();
    let e = match what {
        "journal sequence number" => s.commit(),
        _ => s.checkpoint(),
    }
    .err()
    .unwrap_or_else(|| panic!("{what} at its end: wrapped"));
    assert!(e.to_string().contains(what), "{what}: {e}");
    drop(s);
    let mut ro = opts(64);
    ro.read_only = true;
    let s = Store::open(dev, &ro).unwrap();
    assert_eq!(read_raw(&s, 5).unwrap(), Some(block(5)), "{what}");
}

/// A store with six commits in its journal (one block each) and nothing checkpointed since
/// the format; returns the image and the byte where the journal starts.
fn store_with_six_commits() -> (Vec<u8>, usize) {
    let dev = MemDevice::new(1 << 20);
    let mut o = opts(64);
    o.journal_blocks = 16;
    let mut s = Store::open(dev.clone(), &o).unwrap();
    for c in 0..6u64 {
        write_raw(&mut s, c, &[block(100 + c)]).unwrap();
        s.commit().unwrap();
    }
    assert_eq!(s.stats().checkpoints, 0);
    let at = (s.geometry().journal_start() * BLOCK) as usize;
    drop(s);
    (dev.snapshot(), at)
}

fn open_16(img: Vec<u8>) -> Result<Store<MemDevice>, StoreError> {
    let mut o = opts(64);
    o.journal_blocks = 16;
    Store::open(MemDevice::from_bytes(img), &o)
}

/// Issue 29, item 10: one flipped bit in a journal block made the replay stop there, as at
/// a torn tail, and the store opened without every flushed write after it. Each journal
/// block is now two copies with their own checks: one bit, or one sector, costs nothing,
/// and is reported; both copies damaged with a later commit after them is damage, and the
/// store is refused with the block named.
#[test]
fn a_damaged_journal_block_is_recovered_or_refused_never_taken_for_the_end() {
    let (good, j) = store_with_six_commits();
    let s = open_16(good.clone()).unwrap();
    for c in 0..6 {
        assert_eq!(read_raw(&s, c).unwrap(), Some(block(100 + c)));
    }
    assert!(s.recovered().is_empty(), "{:?}", s.recovered());
    drop(s);
    for victim in [0usize, 3, 5] {
        // One copy: a bit, then a whole sector.
        for (at, len) in [
            (j + victim * 4096 + 700, 1),
            (j + victim * 4096 + 2048, 512),
        ] {
            let mut img = good.clone();
            img[at..at + len].iter_mut().for_each(|b| *b ^= 0x5a);
            let s = open_16(img).unwrap_or_else(|e| panic!("block {victim}: {e}"));
            for c in 0..6 {
                assert_eq!(
                    read_raw(&s, c).unwrap(),
                    Some(block(100 + c)),
                    "block {victim}"
                );
            }
            assert_eq!(s.recovered().len(), 1, "{:?}", s.recovered());
            assert!(
                s.recovered()[0].contains("two copies"),
                "{:?}",
                s.recovered()
            );
        }
    }
    // Both copies of a block that later commits follow.
    for victim in [0usize, 3] {
        let mut img = good.clone();
        img[j + victim * 4096 + 100] ^= 1;
        img[j + victim * 4096 + 2048 + 100] ^= 1;
        let e = open_16(img)
            .err()
            .unwrap_or_else(|| panic!("block {victim} lost silently"));
        assert!(e.to_string().contains("a later commit"), "{e}");
        assert!(e.to_string().contains(&format!("position {victim}")), "{e}");
    }
}

/// Issue 29, item 10: a superblock copy damaged is reported and the other used; a newest
/// superblock lost while an older one survives (both copies edited back) is found by the
/// journal blocks written after it, not served as the older state.
#[test]
fn a_damaged_superblock_copy_is_recovered_and_an_older_one_is_not_taken_for_the_newest() {
    let dev = MemDevice::new(1 << 20);
    let mut s = Store::open(dev.clone(), &opts(64)).unwrap();
    write_raw(&mut s, 1, &[block(1)]).unwrap();
    s.checkpoint().unwrap();
    let older = dev.snapshot();
    write_raw(&mut s, 2, &[block(2)]).unwrap();
    s.checkpoint().unwrap();
    write_raw(&mut s, 3, &[block(3)]).unwrap();
    s.commit().unwrap();
    drop(s);
    let img = dev.snapshot();
    for copy in 0..2 {
        let mut bad = img.clone();
        bad[copy * 4096 + 30] ^= 4;
        let s = Store::open(MemDevice::from_bytes(bad), &opts(64)).unwrap();
        for b in 1..4 {
            assert_eq!(read_raw(&s, b).unwrap(), Some(block(b)));
        }
        assert!(
            s.recovered().iter().any(|r| r.contains("superblock copy")),
            "{:?}",
            s.recovered()
        );
    }
    let rolled_back = with_superblock(&img, &superblock_of(&older, 0));
    let e = Store::open(MemDevice::from_bytes(rolled_back), &opts(64))
        .err()
        .expect("an older superblock was served as the newest");
    assert!(e.to_string().contains("newer one is damaged"), "{e}");
}

/// A version 1 journal block, as builds before version 2 wrote it (one copy, unkeyed).
fn journal_block_v1(seq: u64, records: &[(u64, Entry)]) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK as usize];
    b[0..8].copy_from_slice(b"VMMSTJNL");
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    b[16..20].copy_from_slice(&(records.len() as u32).to_le_bytes());
    let mut at = 64;
    for (block, e) in records {
        b[at..at + 8].copy_from_slice(&block.to_le_bytes());
        b[at + 8..at + 24].copy_from_slice(&e.encode());
        at += 24;
    }
    let mut h = blake3::Hasher::new();
    h.update(&b[0..20]);
    h.update(&b[64..]);
    let c = *h.finalize().as_bytes();
    b[20..52].copy_from_slice(&c);
    b
}

/// A version 1 store (its superblock says 1, its journal holds a version 1 block) is read,
/// served read-only as it is, and rewritten as version 2 by a writable open, its data kept.
#[test]
fn a_version_1_store_is_read_and_upgraded_at_its_first_writable_open() {
    let dev = MemDevice::new(1 << 20);
    let mut s = Store::format_as(dev.clone(), &opts(64), 2).unwrap();
    write_raw(&mut s, 5, &[block(5)]).unwrap();
    s.checkpoint().unwrap();
    let (g, key) = (s.geometry(), *s.key());
    drop(s);
    let mut img = dev.snapshot();
    let sb = superblock_of(&img, 0);
    // Block 7 only in the journal, its data in a free unit.
    let unit = g.data_start() + 10;
    img[(unit * BLOCK) as usize..((unit + 1) * BLOCK) as usize].copy_from_slice(&block(7));
    let e = Entry::Stored {
        sector: unit * BLOCK / SECTOR,
        stored_len: BLOCK as u32,
        index: 0,
        codec: Codec::Raw,
        check: block_check(&key, &block(7)),
    };
    let j = (g.journal_start() * BLOCK) as usize;
    img[j..j + BLOCK as usize].copy_from_slice(&journal_block_v1(sb.journal_seq, &[(7, e)]));
    // The superblock as version 1 wrote it: the same bytes, version 1, signed again.
    let mut b = sb.encode();
    b[8..12].copy_from_slice(&1u32.to_le_bytes());
    let c = *blake3::hash(&b[..141]).as_bytes();
    b[141..173].copy_from_slice(&c);
    img[..BLOCK as usize].copy_from_slice(&b);
    img[BLOCK as usize..2 * BLOCK as usize].copy_from_slice(&b);

    let mut ro = opts(64);
    ro.read_only = true;
    let s = Store::open(MemDevice::from_bytes(img.clone()), &ro).unwrap();
    assert_eq!(s.format_version(), (1, 1));
    assert_eq!(read_raw(&s, 7).unwrap(), Some(block(7)));
    drop(s);
    let dev = MemDevice::from_bytes(img);
    let s = Store::open(dev.clone(), &opts(64)).unwrap();
    assert_eq!(s.format_version(), (2, 1));
    drop(s);
    let s = Store::open(dev, &opts(64)).unwrap();
    assert_eq!(s.format_version(), (2, 2));
    assert_eq!(read_raw(&s, 5).unwrap(), Some(block(5)));
    assert_eq!(read_raw(&s, 7).unwrap(), Some(block(7)));
}

/// Issue 29, item 2 (in part): a writable open writes what its journal needs, never the
/// whole map. It once checkpointed the whole map at every open, which the shim (holding back
/// at most 256 MiB written while a plugin is created) refused for more than about 64 GiB
/// of guest space: such a store never opened again.
#[test]
fn a_writable_open_writes_nothing_on_a_clean_store_and_data_stays() {
    let dev = MemDevice::new(4 << 20);
    let mut o = opts(16 * 1024);
    o.journal_blocks = 8;
    let mut s = Store::open(dev.clone(), &o).unwrap();
    for b in [0u64, 5000, 16 * 1024 - 1] {
        write_raw(&mut s, b, &[block(b)]).unwrap();
        s.commit().unwrap();
    }
    drop(s);
    let base = Arc::new(dev.snapshot());
    let rec = Recording {
        len: 4 << 20,
        base: Some(base.clone()),
        ..Default::default()
    };
    let mut s = Store::open(rec.clone(), &o).unwrap();
    assert!(rec.log.lock().unwrap().is_empty(), "the open wrote");
    for b in [0u64, 5000, 16 * 1024 - 1] {
        assert_eq!(read_raw(&s, b).unwrap(), Some(block(b)));
    }
    // And the journal goes on where it was: one more commit, then a reopen sees it all.
    write_raw(&mut s, 7, &[block(7)]).unwrap();
    s.commit().unwrap();
    let writes: usize = rec
        .log
        .lock()
        .unwrap()
        .iter()
        .map(|op| match op {
            Op::Write(_, d) => d.len(),
            Op::Flush => 0,
        })
        .sum();
    assert!(
        writes <= 2 * BLOCK as usize,
        "{writes} bytes for one block and its commit"
    );
    drop(s);
    let img = image_over(
        Some(&base),
        &rec.log.lock().unwrap(),
        4 << 20,
        usize::MAX,
        |_, _| true,
    );
    let s = Store::open(MemDevice::from_bytes(img), &o).unwrap();
    for b in [0u64, 5000, 7, 16 * 1024 - 1] {
        assert_eq!(read_raw(&s, b).unwrap(), Some(block(b)));
    }
}

/// The paged map against a model: random writes, discards and shares over many pages, with
/// a journal so short that nearly every commit is a checkpoint, every block read back after
/// each step and after reopens.
#[test]
fn a_map_of_many_pages_reads_back_what_was_written_through_checkpoints_and_reopens() {
    const BLOCKS: u64 = 12 * crate::format::PAGE_ENTRIES;
    let dev = MemDevice::new(8 << 20);
    let mut s = Store::open(dev.clone(), &opts(BLOCKS)).unwrap();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut model: HashMap<u64, u64> = HashMap::new();
    let mut checkpoints = 0;
    for step in 0..3000u64 {
        let first = rng.next() % BLOCKS;
        match rng.next() % 10 {
            0..=5 => {
                let n = (1 + rng.next() % 16).min(BLOCKS - first);
                let data: Vec<Vec<u8>> = (0..n).map(|k| block(step * 100 + k)).collect();
                match write_raw(&mut s, first, &data) {
                    Ok(()) => {
                        for k in 0..n {
                            model.insert(first + k, step * 100 + k);
                        }
                    }
                    Err(StoreError::NoSpace) => {}
                    Err(e) => panic!("step {step}: {e}"),
                }
            }
            6 | 7 => {
                let n = (1 + rng.next() % 600).min(BLOCKS - first);
                s.punch(first, n).unwrap();
                for b in first..first + n {
                    model.remove(&b);
                }
            }
            8 => {
                let to = rng.next() % BLOCKS;
                let e = s.entry(first).unwrap();
                s.share_all(&[(to, e)]).unwrap();
                match model.get(&first).copied() {
                    Some(v) => model.insert(to, v),
                    None => model.remove(&to),
                };
            }
            _ => s.commit().unwrap(),
        }
        if step % 97 == 0 || step > 2990 {
            for b in 0..BLOCKS {
                let want = model.get(&b).map(|&v| block(v)[..8].to_vec());
                let got = read_raw(&s, b).unwrap().map(|v| v[..8].to_vec());
                assert!(got == want, "step {step}, block {b}: {got:?}, not {want:?}");
            }
            assert_eq!(s.check_space(), Vec::<String>::new(), "step {step}");
            assert_eq!(s.mapped_blocks(), model.len() as u64, "step {step}");
        }
        if step % 500 == 499 {
            s.commit().unwrap();
            checkpoints += s.stats().checkpoints;
            drop(s);
            s = Store::open(dev.clone(), &opts(BLOCKS)).unwrap();
        }
    }
    assert!(checkpoints > 20, "{checkpoints}");
}
