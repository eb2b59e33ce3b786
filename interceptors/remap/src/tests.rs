//! Unit tests of the remap plugin: geometry, header and map checks, allocation.

use super::*;

#[test]
fn layout_fits_the_disk_and_is_the_largest_that_does() {
    assert_eq!(Geometry::for_disk(0), None);
    assert_eq!(Geometry::for_disk(1), None);
    assert_eq!(Geometry::for_disk(2).map(|g| g.logical), None);
    for total in [3u64, 4, 65, 66, 67, 130, 131, 1000, 524_288, 1 << 33] {
        let g = Geometry::for_disk(total).unwrap();
        let n = g.logical;
        assert!(1 + n.div_ceil(64) + n <= total, "{total}");
        assert!(
            1 + (n + 1).div_ceil(64) + n + 1 > total,
            "{total}: n is the largest"
        );
        assert_eq!(g.data_start, 1 + n.div_ceil(64));
    }
}

#[test]
fn huge_disks_compute_without_overflow() {
    // 4 TiB: slot numbers past 2^32, which the version-1 u32 entries could not hold.
    let g = Geometry::for_disk(1 << 33).unwrap();
    assert_eq!(g.logical, 8_457_781_751);
    assert!(g.logical > u64::from(u32::MAX));
    let last = g.slot_offset(g.logical - 1).unwrap();
    assert_eq!(last, (g.data_start + g.logical - 1) * SECTOR);
    assert!(last + SECTOR <= (1u64 << 33) * SECTOR);
    assert_eq!(
        Geometry::map_sector_offset((g.logical - 1) / 64).unwrap() + SECTOR,
        g.data_start * SECTOR
    );
    // The largest disk the shim can describe (capacity in bytes is a u64), and beyond.
    for total in [u64::MAX / SECTOR, u64::MAX - 1, u64::MAX] {
        let g = Geometry::for_disk(total).unwrap();
        assert!(g.logical.div_ceil(64) + g.logical < total, "{total}");
        assert!(g.data_start < total);
    }
    let g = Geometry::for_disk(u64::MAX / SECTOR).unwrap();
    assert!(g.slot_offset(g.logical - 1).is_some());
    assert_eq!(
        Geometry::for_disk(u64::MAX)
            .unwrap()
            .slot_offset(u64::MAX / 2),
        None
    );
}

fn geo() -> Geometry {
    Geometry::for_disk(1000).unwrap()
}

#[test]
fn a_header_is_checked_field_by_field() {
    let g = geo();
    let good = g.header();
    assert_eq!(g.check_header(&good), Ok(()));
    let with = |at: usize, bytes: &[u8]| {
        let mut h = good.clone();
        h[at..at + bytes.len()].copy_from_slice(bytes);
        g.check_header(&h).unwrap_err()
    };
    let e = with(8, &1u32.to_le_bytes());
    assert!(
        e.contains("version 1") && e.contains("re-create the disk"),
        "{e}"
    );
    let e = with(8, &7u32.to_le_bytes());
    assert!(e.contains("version is 7") && e.contains("version 2"), "{e}");
    let e = with(16, &2000u64.to_le_bytes());
    assert_eq!(
        e,
        format!(
            "header says 2000 logical sectors, a disk of 1000 sectors has {}: the header is \
             damaged or the disk was resized",
            g.logical
        )
    );
    let e = with(24, &99u64.to_le_bytes());
    assert!(
        e.contains("data start is sector 99") && e.contains(&format!("sector {}", g.data_start)),
        "{e}"
    );
    assert!(with(13, &[1]).contains("header byte 13 is not zero"));
    assert!(with(511, &[1]).contains("header byte 511 is not zero"));
    // A resized disk: the same header no longer matches.
    let bigger = Geometry::for_disk(2000).unwrap();
    assert!(bigger.check_header(&good).unwrap_err().contains("resized"));
}

#[test]
fn map_entries_past_the_data_region_or_sharing_a_slot_are_refused() {
    let n = geo().logical;
    let mut m = Map::empty(n).unwrap();
    m.load(0, 0).unwrap();
    m.load(1, 5).unwrap();
    m.load(2, n).unwrap();
    assert_eq!(m.mapped, 2);
    let e = m.load(3, n + 1).unwrap_err();
    assert!(
        e.contains("logical sector 3") && e.contains(&format!("slot {n}")),
        "{e}"
    );
    let e = Map::empty(n).unwrap().load(3, u64::MAX).unwrap_err();
    assert!(e.contains("past the data region"), "{e}");
    let e = m.load(9, 5).unwrap_err();
    assert_eq!(
        e,
        "logical sectors 1 and 9 both point at slot 4: corrupt metadata"
    );
}

#[test]
fn slots_are_allocated_in_order_and_unreferenced_ones_reused() {
    let mut m = Map::empty(130).unwrap();
    assert_eq!(
        (0..3).map(|_| m.alloc().unwrap()).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    // A layout whose map lost the entries of slots 0 and 64 (a crash): they are free.
    let mut m = Map::empty(130).unwrap();
    for s in 1..130 {
        if s != 64 {
            m.load(s, s + 1).unwrap();
        }
    }
    assert_eq!(m.alloc(), Some(0));
    assert_eq!(m.alloc(), Some(64));
    assert_eq!(m.alloc(), None);
    m.free(0, 64);
    assert_eq!(m.alloc(), Some(64));
}

#[test]
fn map_sectors_encode_64_u64_entries() {
    let mut m = Map::empty(70).unwrap();
    m.entries[0] = 1;
    m.entries[65] = 0x1_0000_0001;
    let s0 = m.sector_bytes(0);
    assert_eq!(u64::from_le_bytes(s0[..8].try_into().unwrap()), 1);
    assert!(s0[8..].iter().all(|&b| b == 0));
    let s1 = m.sector_bytes(1);
    assert_eq!(
        u64::from_le_bytes(s1[8..16].try_into().unwrap()),
        0x1_0000_0001
    );
    // Entries 64..70 only: the rest of the last map sector is zeros.
    assert!(s1[16..].iter().all(|&b| b == 0));
}

#[test]
fn runs_join_contiguous_slots_and_holes() {
    let entries = [3, 4, 5, 0, 0, 9, 2];
    assert_eq!(
        runs(&entries, 0, 7).unwrap(),
        vec![
            (0, 3, Some(2)),
            (3, 2, None),
            (5, 1, Some(8)),
            (6, 1, Some(1))
        ]
    );
    assert!(runs(&entries, 5, 3).is_err());
}
