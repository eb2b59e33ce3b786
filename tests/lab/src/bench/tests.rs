//! `lab bench`'s tests: the variants a command runs, the ratio tables and the chart.

use super::*;

/// The variants' labels, in the order they run.
fn labels_of(v: &[(String, GuestOpts)]) -> Vec<&str> {
    v.iter().map(|(l, _)| l.as_str()).collect()
}

fn bench_args(argv: &[&str]) -> BenchArgs {
    let cli = Cli::try_parse_from(["lab", "bench"].iter().chain(argv)).unwrap();
    match cli.cmd {
        Cmd::Bench(a) => a,
        _ => unreachable!(),
    }
}

#[test]
fn rounds_alternate_the_order_of_the_variants() {
    assert_eq!(round_order(3, 0), [0, 1, 2]);
    assert_eq!(round_order(3, 1), [2, 1, 0]);
    assert_eq!(round_order(3, 2), [0, 1, 2]);
}

#[test]
fn compare_runs_qemu_vmm_and_each_interceptor_file_on_vmm() {
    let a = bench_args(&[
        "--compare",
        "--interceptors",
        "x/demo.toml",
        "--also-interceptors",
        "y/count.toml",
    ]);
    let v = bench_variants(&a).unwrap();
    let labels = labels_of(&v);
    assert_eq!(labels, ["qemu", "vmm", "vmm+interceptors", "vmm+count"]);
    assert_eq!(v[0].1.backend, Backend::Qemu);
    assert!(v[..2].iter().all(|(_, o)| o.interceptors.is_none()));
    assert!(v[2..].iter().all(|(_, o)| o.backend == Backend::Vmm));
    assert_eq!(
        v[3].1.interceptors.as_deref(),
        Some("y/count.toml".as_ref())
    );
    assert!(bench_variants(&bench_args(&["--also-interceptors", "y.toml"])).is_err());
}

#[test]
fn compare_runs_vmm_again_with_each_block_option() {
    let a = bench_args(&[
        "--compare",
        "--block-option",
        "coalesce_us=0",
        "--also-block-option",
        "coalesce_us=200",
    ]);
    let v = bench_variants(&a).unwrap();
    let labels = labels_of(&v);
    assert_eq!(labels, ["qemu", "vmm", "vmm[coalesce_us=200]"]);
    let opt = |s: &str| (s.to_string(), "200".to_string());
    assert_eq!(
        v[1].1.block_options,
        [(String::from("coalesce_us"), "0".into())]
    );
    assert_eq!(v[2].1.block_options, [opt("coalesce_us")]);
    assert!(Cli::try_parse_from(["lab", "bench", "--block-option", "Bad=1"]).is_err());
    assert!(Cli::try_parse_from(["lab", "bench", "--block-option", "k=[1"]).is_err());
    assert!(bench_variants(&bench_args(&["--also-block-option", "a=1"])).is_err());
    // With interceptor files, each of their variants runs with the setting too.
    let a = bench_args(&[
        "--compare",
        "--also-interceptors",
        "y/encrypt.toml",
        "--also-block-option",
        "hook_threads=1",
    ]);
    let v = bench_variants(&a).unwrap();
    let labels = labels_of(&v);
    assert_eq!(
        labels,
        [
            "qemu",
            "vmm",
            "vmm+encrypt",
            "vmm[hook_threads=1]",
            "vmm+encrypt[hook_threads=1]"
        ]
    );
    assert_eq!(
        v[4].1.interceptors.as_deref(),
        Some("y/encrypt.toml".as_ref())
    );
    assert_eq!(
        v[4].1.block_options,
        [(String::from("hook_threads"), "1".into())]
    );
}

#[test]
fn compare_runs_every_vmm_variant_again_with_another_binary() {
    let other = std::env::current_exe().unwrap();
    let arg = format!("old={}", other.display());
    let a = bench_args(&[
        "--compare",
        "--also-interceptors",
        "y/encrypt.toml",
        "--also-vmm-binary",
        &arg,
    ]);
    let v = bench_variants(&a).unwrap();
    let labels = labels_of(&v);
    assert_eq!(
        labels,
        ["qemu", "vmm", "vmm+encrypt", "vmm@old", "vmm+encrypt@old"]
    );
    assert!(v[..3].iter().all(|(_, o)| o.vmm_binary.is_none()));
    assert!(v[3..]
        .iter()
        .all(|(_, o)| o.vmm_binary.as_deref() == Some(other.as_path())));
    assert_eq!(
        v[4].1.interceptors.as_deref(),
        Some("y/encrypt.toml".as_ref())
    );
    // A binary that is not there, or no name, is refused when the command is read.
    for bad in ["old=/nonexistent/vmm", "=/bin/sh", "a b=/bin/sh", "/bin/sh"] {
        let argv = ["lab", "bench", "--compare", "--also-vmm-binary", bad];
        assert!(Cli::try_parse_from(argv).is_err(), "{bad}");
    }
    assert!(bench_variants(&bench_args(&["--also-vmm-binary", &arg])).is_err());
}

#[test]
fn compare_with_both_qemu_configurations_runs_them_before_vmm() {
    let a = bench_args(&[
        "--compare",
        "--qemu-aio",
        "threads,io_uring",
        "--also-interceptors",
        "y/encrypt.toml",
    ]);
    let v = bench_variants(&a).unwrap();
    let labels = labels_of(&v);
    assert_eq!(labels, ["qemu", "qemu-io_uring", "vmm", "vmm+encrypt"]);
    let backends: Vec<Backend> = v.iter().map(|(_, o)| o.backend).collect();
    assert_eq!(
        backends,
        [
            Backend::Qemu,
            Backend::QemuIoUring,
            Backend::Vmm,
            Backend::Vmm
        ]
    );
    // io_uring alone, and a name given twice runs once.
    let v = bench_variants(&bench_args(&[
        "--compare",
        "--qemu-aio",
        "io_uring,io_uring",
    ]))
    .unwrap();
    let labels = labels_of(&v);
    assert_eq!(labels, ["qemu-io_uring", "vmm"]);
    // One QEMU configuration alone is a backend; the compare options need --compare.
    let v = bench_variants(&bench_args(&["--backend", "qemu-io_uring"])).unwrap();
    assert_eq!(v[0].0, "qemu-io_uring");
    assert_eq!(v[0].1.backend, Backend::QemuIoUring);
    assert!(bench_variants(&bench_args(&["--qemu-aio", "io_uring"])).is_err());
    assert!(bench_variants(&bench_args(&["--chart", "x.svg"])).is_err());
    assert!(Cli::try_parse_from(["lab", "bench", "--qemu-aio", "native"]).is_err());
}

fn report(label: &str, backend: Backend, rows: &[(&str, f64)]) -> BenchReport {
    BenchReport {
        label: label.into(),
        round: 1,
        backend,
        interceptors: None,
        rootfs: RootFs::Ext4,
        vcpus: 1,
        mem_mib: 512,
        num_queues: None,
        boot_wall_to_init_ms: vec![1000.0],
        boot_uptime_at_init_s: vec![1.0],
        median_wall_to_init_ms: 1000.0,
        median_uptime_at_init_s: 1.0,
        fio_runtime_s: 5,
        fio: rows
            .iter()
            .map(|(job, iops)| fio::FioRow {
                job: job.to_string(),
                dir: "read".into(),
                iops: *iops,
                mb_s: 0.0,
                lat_mean_us: 0.0,
                lat_p99_us: 0.0,
            })
            .collect(),
        fio_wall_to_init_ms: Some(1000.0),
        layers: Vec::new(),
        image_info: None,
        fio_cpu: Vec::new(),
        fio_boot_cpu: cpu::ProcessCpu::default(),
        job_cpu: Vec::new(),
    }
}

/// A round where a variant failed (its guest hung: no fio rows) used to empty the whole
/// ratio table; now each row takes the rounds where both have it and says how many.
#[test]
fn a_failed_round_leaves_its_rows_out_of_the_ratios_not_the_table() {
    let vmm = [
        report("vmm", Backend::Vmm, &[("a", 200.0), ("b", 100.0)]),
        report("vmm", Backend::Vmm, &[("a", 400.0), ("b", 100.0)]),
    ];
    let enc = [
        report("vmm+encrypt", Backend::Vmm, &[]),
        report("vmm+encrypt", Backend::Vmm, &[("a", 100.0), ("b", 50.0)]),
    ];
    let rows = ratio_rows(&vmm, &enc);
    assert_eq!(rows.len(), 2);
    assert_eq!((rows[0].job.as_str(), rows[0].rounds), ("a", 1));
    assert_eq!((rows[0].new_iops, rows[0].base_iops), (100.0, 400.0));
    assert_eq!(rows[0].range, None);
    assert_eq!(rows[1].base_iops, 100.0);
    // With every round there, the means and the range cover them all.
    let enc = [
        report("vmm+encrypt", Backend::Vmm, &[("a", 100.0)]),
        report("vmm+encrypt", Backend::Vmm, &[("a", 100.0)]),
    ];
    let rows = ratio_rows(&vmm, &enc);
    assert_eq!(rows.len(), 1, "a row only one side has gives no ratio");
    assert_eq!((rows[0].rounds, rows[0].base_iops), (2, 300.0));
    assert_eq!(rows[0].range, Some((0.25, 0.5)));
}

#[test]
fn vmm_is_compared_with_the_better_qemu_row_by_row() {
    let q1 = [
        report("qemu", Backend::Qemu, &[("a", 100.0), ("b", 50.0)]),
        report("qemu", Backend::Qemu, &[("a", 300.0), ("b", 50.0)]),
    ];
    let q2 = [
        report(
            "qemu-io_uring",
            Backend::QemuIoUring,
            &[("a", 150.0), ("b", 100.0)],
        ),
        report(
            "qemu-io_uring",
            Backend::QemuIoUring,
            &[("a", 150.0), ("b", 100.0)],
        ),
    ];
    let vmm = [
        report(
            "vmm",
            Backend::Vmm,
            &[("a", 200.0), ("b", 50.0), ("c", 1.0)],
        ),
        report(
            "vmm",
            Backend::Vmm,
            &[("a", 200.0), ("b", 150.0), ("c", 1.0)],
        ),
    ];
    let rows = compare_rows(&[&q1, &q2], &vmm);
    assert_eq!(rows.len(), 3);
    // a: QEMU threads is better on the means (200 against 150).
    assert_eq!(rows[0].qemu, [Some(200.0), Some(150.0)]);
    assert_eq!(rows[0].to_better, Some(1.0));
    let (lo, hi) = rows[0].round_range.unwrap();
    assert!((lo - 200.0 / 300.0).abs() < 1e-9 && (hi - 200.0 / 150.0).abs() < 1e-9);
    // b: io_uring is better (100 against 50); vmm's mean is 100.
    assert_eq!(rows[1].vmm, 100.0);
    assert_eq!(rows[1].to_better, Some(1.0));
    assert_eq!(rows[1].round_range, Some((0.5, 1.5)));
    // c: no QEMU ran it.
    assert_eq!(rows[2].qemu, [None, None]);
    assert_eq!(rows[2].to_better, None);
    // The chart of it names every row.
    let dir = Scratch::new("compare-chart-test").unwrap();
    let path = dir.path().join("c.svg");
    let a = bench_args(&["--compare", "--qemu-aio", "threads,io_uring"]);
    let labels = ["qemu".to_string(), "qemu-io_uring".to_string()];
    write_compare_chart(&path, &labels, &rows, &a).unwrap();
    let svg = std::fs::read_to_string(&path).unwrap();
    for name in [
        "a read",
        "b read",
        "c read",
        "vmm / qemu-io_uring (aio=io_uring, iothread)",
    ] {
        assert!(svg.contains(&format!("\n{name}\n")), "{name}");
    }
}

#[test]
fn all_in_the_job_list_is_the_fio_set() {
    let jobs = job_list("all,randrw-4k-2jobs").unwrap();
    assert_eq!(jobs.first().map(String::as_str), Some("randread-4k-qd1"));
    assert_eq!(jobs.last().map(String::as_str), Some("randrw-4k-2jobs"));
    assert!(jobs.len() >= 3, "{jobs:?}");
    assert_eq!(job_list(" x , y ").unwrap(), ["x", "y"]);
    assert!(job_list(",").is_err());
}
