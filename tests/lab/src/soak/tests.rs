//! `lab soak`'s own tests: variants, the plan's order, the table, the progress file.

use super::*;

#[test]
fn variants_name_a_backend_and_the_parameters_they_add() {
    let v = parse_variant("vmm:no-kvmapf+tsc=reliable").unwrap();
    assert_eq!(v.backend, Backend::Vmm);
    assert_eq!(v.params, "no-kvmapf tsc=reliable");
    assert_eq!(v.label, "vmm:no-kvmapf+tsc=reliable");
    assert_eq!(
        parse_variant("qemu-noacpi").unwrap().backend,
        Backend::QemuNoAcpi
    );
    assert_eq!(parse_variant("qemu").unwrap().params, "");
    assert!(parse_variant("xen").is_err());
    assert!(parse_variant("vmm:init=/bin/sh").is_err());
    assert!(parse_variant("vmm:a=\"b\"").is_err());
}

#[test]
fn after_a_restart_the_session_goes_on_with_the_boots_not_recorded() {
    let dir = std::env::temp_dir().join(format!("soak-progress-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("p.jsonl");
    assert!(recorded(&file).unwrap().is_empty());
    // Two workers: places 0 and 2 finished before the lab fault, 1 was in flight.
    let line = |place: usize| {
        serde_json::to_string(&Boot {
            plan_index: place,
            variant: "vmm".into(),
            n: 1,
            outcome: "ok".into(),
            seconds: 12.0,
            report: None,
        })
        .unwrap()
    };
    std::fs::write(&file, format!("{}\n{}\n", line(0), line(2))).unwrap();
    let done: std::collections::HashSet<usize> = recorded(&file)
        .unwrap()
        .iter()
        .map(|b| b.plan_index)
        .collect();
    let mut next = 0;
    let places: Vec<usize> = std::iter::from_fn(|| next_place(&mut next, &done, 5)).collect();
    assert_eq!(places, vec![1, 3, 4]);
    std::fs::write(&file, "not json\n").unwrap();
    assert!(recorded(&file).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn each_round_starts_with_another_variant() {
    assert_eq!(round_order(3, 0), vec![0, 1, 2]);
    assert_eq!(round_order(3, 1), vec![1, 2, 0]);
    assert_eq!(round_order(3, 2), vec![2, 0, 1]);
    assert_eq!(round_order(1, 5), vec![0]);
}

#[test]
fn the_table_ends_with_each_variants_hang_count() {
    let vs = vec![
        parse_variant("vmm").unwrap(),
        parse_variant("qemu").unwrap(),
    ];
    let cs = vec![
        Counts {
            boots: 10,
            ok: 8,
            hangs: 1,
            other_failures: 1,
        },
        Counts {
            boots: 10,
            ok: 10,
            ..Counts::default()
        },
    ];
    let t = render(&vs, &cs);
    let last: Vec<&str> = t.lines().rev().take(2).collect();
    assert_eq!(last, vec!["hangs qemu: 0/10", "hangs vmm: 1/10"]);
    assert!(t.lines().nth(1).unwrap().starts_with("vmm "));
}
