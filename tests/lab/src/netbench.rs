//! `lab netbench`: iperf3 TCP throughput of a guest's card under vmm and under QEMU
//! (virtio-net-pci on a tap, with vhost=off and vhost=on), all in one lab session, and
//! vmm with frame encryption on both cards of a pair. Three directions for each VMM: guest
//! to the bridge's side (10.0.0.1, where `iperf3 -s` runs), the bridge's side to the guest
//! (`iperf3 -R`), and guest to guest across the bridge.

use crate::{chart, cpu, pair, spec_for, write_json, GuestOpts};
use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use std::path::PathBuf;
use vmm_lab::guest::{Backend, GuestRun, InterceptorChain, Scratch};
use vmm_lab::paths;

#[derive(Args, Debug)]
pub(crate) struct NetBenchArgs {
    /// Seconds each iperf3 run lasts.
    #[arg(long, default_value_t = 10)]
    pub(crate) time: u32,
    /// Rounds: each runs every variant once, in an order that alternates.
    #[arg(long, default_value_t = 1)]
    pub(crate) rounds: usize,
    /// Only these variants (comma-separated: qemu-vhost-off, qemu-vhost-on, vmm,
    /// vmm-sealed); all by default.
    #[arg(long, value_delimiter = ',')]
    pub(crate) variants: Vec<String>,
    /// Write every measurement as JSON.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// Where the SVG chart goes (default: build/bench/net-vmm-vs-qemu.svg).
    #[arg(long)]
    pub(crate) chart: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) opts: GuestOpts,
}

/// What runs the guests of a variant.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Variant {
    QemuVhostOff,
    QemuVhostOn,
    Vmm,
    /// vmm with net-encrypt on every card (guest to guest only: the bridge's side cannot
    /// open sealed frames).
    VmmSealed,
}

impl Variant {
    const ALL: [Variant; 4] = [
        Variant::QemuVhostOff,
        Variant::QemuVhostOn,
        Variant::Vmm,
        Variant::VmmSealed,
    ];

    fn name(self) -> &'static str {
        match self {
            Variant::QemuVhostOff => "qemu-vhost-off",
            Variant::QemuVhostOn => "qemu-vhost-on",
            Variant::Vmm => "vmm",
            Variant::VmmSealed => "vmm-sealed",
        }
    }

    fn backend(self) -> Backend {
        match self {
            Variant::QemuVhostOff | Variant::QemuVhostOn => Backend::Qemu,
            Variant::Vmm | Variant::VmmSealed => Backend::Vmm,
        }
    }
}

const DIRECTIONS: [&str; 3] = ["guest->host", "host->guest", "guest->guest"];

#[derive(Clone, Debug, Serialize)]
struct Measurement {
    variant: &'static str,
    direction: &'static str,
    round: usize,
    /// What iperf3's receiver counted, in bits per second.
    bps: f64,
    /// The VMM's CPU and KVM's counters over the boot (one guest against the bridge's
    /// side: one direction per boot).
    cpu: Option<cpu::ProcessCpu>,
}

/// The `bps=` of each `iperf` line in a guest's console, in order.
fn iperf_rates(run: &GuestRun) -> Vec<f64> {
    run.transcript
        .lines()
        .filter(|l| l.contains("@@GUEST@@ iperf addr="))
        .filter_map(|l| l.split("bps=").nth(1))
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .collect()
}

fn check(name: &str, run: &Result<GuestRun>) -> Result<()> {
    let run = run.as_ref().map_err(|e| anyhow::anyhow!("{name}: {e:#}"))?;
    if !run.ok() {
        let tail: Vec<&str> = run.transcript.lines().rev().take(15).collect();
        bail!(
            "{name}: {}; last console lines:\n{}",
            run.problems.join("; "),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(())
}

/// net-encrypt on a card, under a key shared by every card of the run.
fn seal_chain(scratch: &Scratch) -> Result<InterceptorChain> {
    let plugins = vmm_lab::plugins::plugins()?;
    let key = scratch.path().join("net.key");
    std::fs::write(&key, [0x42u8; 32])?;
    let file = scratch.path().join("seal.toml");
    std::fs::write(
        &file,
        format!(
            "[[interceptor]]\nid = \"seal\"\npath = {:?}\nconfig = {{ key_file = {:?} }}\n",
            plugins.net_encrypt, key
        ),
    )?;
    InterceptorChain::from_file(&file)
}

/// One variant's runs: one guest against the bridge's side (both directions), then two
/// guests against each other.
fn run_variant(
    a: &NetBenchArgs,
    v: Variant,
    round: usize,
    scratch: &Scratch,
) -> Result<Vec<Measurement>> {
    let t = a.time;
    let mut opts = a.opts.clone();
    opts.backend = v.backend();
    let chain = match v {
        Variant::VmmSealed => Some(seal_chain(scratch)?),
        _ => None,
    };
    let card = |name: &str| vmm_lab::guest::NetSpec {
        vhost: v == Variant::QemuVhostOn,
        interceptors: chain.clone(),
        ..pair::card(name)
    };
    let mut out = Vec::new();
    let mut push = |direction: &'static str, bps: f64, cpu: Option<cpu::ProcessCpu>| {
        println!(
            "  {:<16} {direction:<13} {:>9.1} Mbit/s",
            v.name(),
            bps / 1e6
        );
        out.push(Measurement {
            variant: v.name(),
            direction,
            round,
            bps,
            cpu,
        });
    };
    if v != Variant::VmmSealed {
        // One boot per direction, so that the VMM's CPU and KVM's counters are its own.
        for (direction, reverse) in [(DIRECTIONS[0], ""), (DIRECTIONS[1], ",-R")] {
            let dir = Scratch::new("netbench-one")?;
            let task = format!("net.ip=10.0.0.2/24 iperf={},{t}{reverse}", pair::HOST_IP);
            let mut spec = spec_for(&opts, &task, &dir)?;
            spec.net = Some(card("a"));
            let sampler = cpu::Sampler::start();
            let (runs, _) = pair::boot_all(std::slice::from_ref(&spec), None);
            let (used, _) = sampler.finish();
            check(&format!("{} {direction}", v.name()), &runs[0])?;
            let rates = runs[0].as_ref().map(iperf_rates).unwrap_or_default();
            let [bps] = rates[..] else {
                bail!(
                    "{} {direction}: {} iperf results, not 1",
                    v.name(),
                    rates.len()
                );
            };
            push(direction, bps, Some(used));
        }
    }
    // B measures against A's server, then releases A (which waits on port 5000).
    let (da, db) = (Scratch::new("netbench-a")?, Scratch::new("netbench-b")?);
    let mut sa = spec_for(&opts, "net.ip=10.0.0.2/24 iperfd netrecv=5000", &da)?;
    sa.net = Some(card("a"));
    let task_b =
        format!("net.ip=10.0.0.3/24 ping=10.0.0.2 iperf=10.0.0.2,{t} netsend=10.0.0.2:5000,1");
    let mut sb = spec_for(&opts, &task_b, &db)?;
    sb.net = Some(card("b"));
    let (runs, _) = pair::boot_all(&[sa, sb], None);
    check(&format!("{} guest A", v.name()), &runs[0])?;
    check(&format!("{} guest B", v.name()), &runs[1])?;
    let rates = runs[1].as_ref().map(iperf_rates).unwrap_or_default();
    let [between] = rates[..] else {
        bail!(
            "{}: {} guest-to-guest results, not 1",
            v.name(),
            rates.len()
        );
    };
    push(DIRECTIONS[2], between, None);
    Ok(out)
}

fn mean(all: &[Measurement], variant: Variant, direction: &str) -> Option<f64> {
    let v: Vec<f64> = all
        .iter()
        .filter(|m| m.variant == variant.name() && m.direction == direction)
        .map(|m| m.bps)
        .collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn fmt(v: Option<f64>, scale: f64, width: usize, prec: usize) -> String {
    match v {
        Some(x) => format!("{:>width$.prec$}", x / scale),
        None => format!("{:>width$}", "-"),
    }
}

pub(crate) fn run(a: NetBenchArgs) -> Result<i32> {
    if a.rounds == 0 || a.time == 0 {
        bail!("--rounds and --time must be at least 1");
    }
    let _bridge = pair::Bridge::up()?;
    let chosen: Vec<Variant> = if a.variants.is_empty() {
        Variant::ALL.to_vec()
    } else {
        a.variants
            .iter()
            .map(|n| {
                Variant::ALL
                    .into_iter()
                    .find(|v| v.name() == n)
                    .with_context(|| format!("no variant {n}"))
            })
            .collect::<Result<_>>()?
    };
    let scratch = Scratch::new("netbench")?;
    // The bridge's side: one iperf3 server for every run (each test in turn), daemonized
    // (-D) so that the only child of this process is the VMM of the run, whose threads the
    // CPU sampler finds that way.
    let pidfile = scratch.path().join("iperf3.pid");
    let started = std::process::Command::new("iperf3")
        .args(["-s", "-D", "-B", pair::HOST_IP, "-I"])
        .arg(&pidfile)
        .status()
        .context("starting iperf3 -s (scripts/setup.sh installs iperf3)")?;
    if !started.success() {
        bail!("iperf3 -s -D failed");
    }
    let mut all = Vec::new();
    let mut result = Ok(());
    'rounds: for round in 0..a.rounds {
        let mut order = chosen.clone();
        if round % 2 == 1 {
            order.reverse();
        }
        println!("== round {}/{}", round + 1, a.rounds);
        for v in order {
            match run_variant(&a, v, round + 1, &scratch) {
                Ok(m) => all.extend(m),
                Err(e) => {
                    result = Err(e);
                    break 'rounds;
                }
            }
        }
    }
    if let Some(pid) = std::fs::read_to_string(&pidfile)
        .ok()
        .and_then(|p| p.trim().trim_end_matches('\0').parse::<i32>().ok())
    {
        // SAFETY: a signal to the server this run started.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    write_json(&a.json, &all)?;
    result?;

    println!();
    println!(
        "iperf3 TCP, Mbit/s (mean of {} round(s), {} s each; {} vCPU guests)",
        a.rounds, a.time, a.opts.vcpus
    );
    println!(
        "{:<13} {:>14} {:>14} {:>9} {:>11} {:>12} {:>11} {:>13}",
        "direction",
        "qemu-vhost-off",
        "qemu-vhost-on",
        "vmm",
        "vmm-sealed",
        "vmm/vhost-off",
        "vmm/vhost-on",
        "sealed/vmm"
    );
    let mut rows = Vec::new();
    let (mut off_ratios, mut on_ratios, mut sealed_ratios) = (Vec::new(), Vec::new(), Vec::new());
    for d in DIRECTIONS {
        let [off, on, vmm, sealed] = Variant::ALL.map(|v| mean(&all, v, d));
        let (r_off, r_on, r_sealed) = (ratio(vmm, off), ratio(vmm, on), ratio(sealed, vmm));
        println!(
            "{d:<13} {} {} {} {} {} {} {}",
            fmt(off, 1e6, 14, 1),
            fmt(on, 1e6, 14, 1),
            fmt(vmm, 1e6, 9, 1),
            fmt(sealed, 1e6, 11, 1),
            fmt(r_off, 1.0, 12, 2),
            fmt(r_on, 1.0, 11, 2),
            fmt(r_sealed, 1.0, 13, 2),
        );
        off_ratios.extend(r_off);
        on_ratios.extend(r_on);
        sealed_ratios.extend(r_sealed);
        rows.push((d.to_string(), r_off, r_on, r_sealed));
    }
    print_profile(&all);
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let path = a
        .chart
        .clone()
        .unwrap_or_else(|| paths::build_dir().join("bench/net-vmm-vs-qemu.svg"));
    let names: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    let series = vec![
        chart::Series {
            name: "vmm / QEMU virtio-net-pci vhost=off".into(),
            values: rows.iter().map(|r| r.1).collect(),
        },
        chart::Series {
            name: "vmm / QEMU virtio-net-pci vhost=on".into(),
            values: rows.iter().map(|r| r.2).collect(),
        },
        chart::Series {
            name: "vmm with net-encrypt / vmm (target 0.5)".into(),
            values: rows.iter().map(|r| r.3).collect(),
        },
    ];
    let title = format!(
        "iperf3 TCP throughput ratios, {} round(s) of {} s, in one lab session",
        a.rounds, a.time
    );
    chart::write_ratio_chart(&path, &title, "throughput ratio", &names, &series, 1.0)?;
    println!("chart: {}", path.display());
    println!("vmm/qemu-vhost-off min ratio: {:.2}", min(&off_ratios));
    println!("vmm/qemu-vhost-on min ratio: {:.2}", min(&on_ratios));
    println!("sealed/vmm guest->guest ratio: {:.2}", min(&sealed_ratios));
    Ok(0)
}

/// How busy each VMM's threads were over a boot against the bridge's side (from their
/// `/proc` figures every 250 ms), in percent of one CPU, means over the rounds: the vCPU
/// thread (guest mode, KVM and the VMM's own code together) and all the others.
fn print_profile(all: &[Measurement]) {
    println!();
    println!("CPU over the boot, one guest against the bridge's side (% of one CPU)");
    println!(
        "{:<16} {:<13} {:>8} {:>9}",
        "variant", "direction", "vcpu", "others"
    );
    for v in Variant::ALL {
        for d in &DIRECTIONS[..2] {
            let runs: Vec<&cpu::ProcessCpu> = all
                .iter()
                .filter(|m| m.variant == v.name() && m.direction == *d)
                .filter_map(|m| m.cpu.as_ref())
                .collect();
            if runs.is_empty() {
                continue;
            }
            let busy = |vcpu: bool| {
                runs.iter()
                    .map(|c| {
                        let s: f64 = c
                            .threads
                            .iter()
                            .filter(|t| is_vcpu(&t.name) == vcpu)
                            .map(|t| t.user_s + t.sys_s + t.guest_s)
                            .sum();
                        100.0 * s / c.wall_s.max(1e-9)
                    })
                    .sum::<f64>()
                    / runs.len() as f64
            };
            println!(
                "{:<16} {:<13} {:>8.0} {:>9.0}",
                v.name(),
                d,
                busy(true),
                busy(false)
            );
        }
    }
}

/// vmm's vCPU threads are `vcpuN`, QEMU's `CPU N/KVM`.
fn is_vcpu(name: &str) -> bool {
    name.starts_with("vcpu") || name.contains("/KVM")
}
