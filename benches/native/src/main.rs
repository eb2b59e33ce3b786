//! `engine-bench`: natively, no guest. A disk's interceptor stack and I/O engine, driven
//! directly with 4 KiB random reads and writes at a few queue depths on a file on the
//! host's disk, and in the same run fio's own io_uring engine on the same file at the same
//! depth. Prints IOPS and CPU time per request for both; the last line is the IOPS ratio
//! at QD32 (the project's target: at least 0.9). With `--interceptors FILE`, each job also
//! runs through that chain of interceptors on a second file, beside the plain stack.

mod fio;
mod ours;
mod pool;
mod rng;
mod slow;
mod sys;

use block::EngineChoice;
use clap::{Parser, ValueEnum};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

/// Bytes per request.
pub const BS: u64 = 4096;

#[derive(Parser, Debug)]
#[command(
    name = "engine-bench",
    about = "4 KiB random I/O through a disk's stack and engine, against fio's io_uring engine on the same file"
)]
struct Args {
    /// The test file (default: /var/tmp/engine-bench-<size>m.img, or next to this binary
    /// if /var/tmp is tmpfs). Created and fully written, or reused if it has the size.
    #[arg(long)]
    file: Option<PathBuf>,
    /// The test file's size in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Seconds per job (each side, each depth, each of randread and randwrite).
    #[arg(long, default_value_t = 10)]
    runtime: u64,
    /// Queue depths, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,32,128")]
    depths: Vec<usize>,
    /// Our engine (fio always runs its io_uring engine).
    #[arg(long, value_enum, default_value_t = Engine::IoUring)]
    engine: Engine,
    /// The fio binary.
    #[arg(long, default_value = "fio")]
    fio: String,
    /// Let fio submit and reap up to the depth in one system call
    /// (--iodepth_batch_submit/--iodepth_batch_complete_max = depth), as our loop does;
    /// by default fio runs with its own defaults (one request per submission).
    #[arg(long)]
    fio_batch: bool,
    /// Also run each job through this chain of interceptors (a file of `[[interceptor]]`
    /// entries, as in configs/interceptors/), on a second file beside the test file
    /// (`<file>.chain.img`, made blank and written once through the chain at start).
    #[arg(long, value_name = "FILE")]
    interceptors: Option<PathBuf>,
    /// O_DIRECT on both sides (ours and fio --direct=1): past the host's page cache, as on
    /// a host whose disk is the limit. By default both run buffered from a warm cache.
    #[arg(long)]
    direct: bool,
    /// A slow layer below, standing in for remote storage: every request to the file (the
    /// engine's, and a plugin's own I/O below it) completes this many microseconds after it
    /// was issued. fio runs without it.
    #[arg(long, default_value_t = 0, value_name = "US")]
    delay_us: u64,
}

/// What lies under both of our stacks.
#[derive(Clone, Copy, Debug, Default)]
pub struct Below {
    /// The file opened with O_DIRECT.
    pub direct: bool,
    /// Added to every request below (`--delay-us`).
    pub delay: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Engine {
    #[value(name = "io_uring")]
    IoUring,
    Sync,
}

impl Engine {
    fn name(self) -> &'static str {
        match self {
            Engine::IoUring => "io_uring",
            Engine::Sync => "sync",
        }
    }

    fn choice(self) -> EngineChoice {
        match self {
            Engine::IoUring => EngineChoice::IoUring,
            Engine::Sync => EngineChoice::Sync,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rw {
    RandRead,
    RandWrite,
}

impl Rw {
    /// fio's `--rw`.
    pub fn name(self) -> &'static str {
        match self {
            Rw::RandRead => "randread",
            Rw::RandWrite => "randwrite",
        }
    }

    /// The side of fio's report that counts this job.
    pub fn fio_direction(self) -> &'static str {
        match self {
            Rw::RandRead => "read",
            Rw::RandWrite => "write",
        }
    }
}

/// One side of one job.
#[derive(Clone, Copy, Debug)]
pub struct Outcome {
    pub iops: f64,
    /// The whole process's CPU time (user + system) over the run, the kernel's io_uring
    /// workers included, per completed request.
    pub cpu_us_per_req: f64,
    /// The submitting thread's alone, per completed request.
    pub thread_us_per_req: f64,
    pub engine: &'static str,
}

struct Row {
    rw: Rw,
    depth: usize,
    ours: Outcome,
    fio: Outcome,
    /// Through `--interceptors`.
    chain: Option<Outcome>,
}

impl Row {
    fn ratio(&self) -> f64 {
        self.ours.iops / self.fio.iops
    }

    /// IOPS through the chain over the plain stack's.
    fn chain_ratio(&self) -> Option<f64> {
        self.chain.map(|c| c.iops / self.ours.iops)
    }
}

/// The instances of a chain file, loaded as the VMM loads them (the plugin copied into a
/// sealed memfd, its config as JSON).
fn chain_specs(file: &std::path::Path) -> Result<Vec<compat::InstanceSpec>, String> {
    let registry = compat::PluginRegistry::new();
    vmm::image::chain_file(file)?
        .iter()
        .map(|ic| {
            vmm::storage::instance_spec(&registry, ic)
                .map_err(|e| format!("{}: interceptor `{}`: {e}", file.display(), ic.id))
        })
        .collect()
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        let _ = std::io::stdout().flush();
        eprintln!("engine-bench: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), String> {
    if args.size_mib == 0 || args.runtime == 0 {
        return Err("--size-mib and --runtime must be at least 1".into());
    }
    if args.depths.is_empty() || args.depths.iter().any(|&d| d == 0 || d > 65535) {
        return Err("--depths: each depth must be 1 to 65535".into());
    }
    let bytes = args
        .size_mib
        .checked_mul(1 << 20)
        .ok_or("--size-mib is too large")?;
    let runtime = Duration::from_secs(args.runtime);
    let fio_version = fio::version(&args.fio)?;
    let path = match args.file {
        Some(p) => p,
        None => sys::default_file(args.size_mib)?,
    };
    eprintln!(
        "engine-bench: preparing {} ({} MiB)",
        path.display(),
        args.size_mib
    );
    let written =
        sys::prepare_file(&path, bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    if !args.direct {
        sys::warm(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if args.delay_us > 1_000_000 {
        return Err("--delay-us: at most 1000000 (one second)".into());
    }
    if args.delay_us > 0 {
        slow::precise_sleeps();
    }
    let below = Below {
        direct: args.direct,
        delay: Duration::from_micros(args.delay_us),
    };
    let chain = match &args.interceptors {
        None => None,
        Some(file) => {
            let specs = chain_specs(file)?;
            let image = chain_image(&path);
            sys::blank_file(&image, bytes).map_err(|e| format!("{}: {e}", image.display()))?;
            eprintln!(
                "engine-bench: writing {} once through {}",
                image.display(),
                file.display()
            );
            let shown = ours::fill(&image, &specs, args.direct)?;
            Some((file.clone(), specs, image, shown))
        }
    };
    let fs = sys::filesystem(&path).unwrap_or("unknown");
    if fs == "tmpfs" || fs == "ramfs" {
        eprintln!(
            "engine-bench: warning: {} is on {fs}, not a disk",
            path.display()
        );
    }

    println!(
        "engine-bench: 4 KiB random I/O, no guest; {} s per job and side",
        args.runtime
    );
    println!(
        "file: {} ({} MiB, {fs}, {}); kernel {}; {} CPUs; {fio_version}",
        path.display(),
        args.size_mib,
        if written { "written now" } else { "reused" },
        sys::kernel_release(),
        sys::cpus(),
    );
    if args.direct {
        println!(
            "O_DIRECT on both sides (ours: the file opened with O_DIRECT; fio --direct=1): \
             every request goes to the disk, past the host's page cache"
        );
    } else {
        println!(
            "buffered I/O on both sides (no O_DIRECT; fio --direct=0 --invalidate=0): the \
             file is read once first, so requests are served by the host page cache for both \
             equally"
        );
    }
    if args.delay_us > 0 {
        println!(
            "a slow layer below ours (--delay-us {}): every request to the file completes \
             {} µs after it was issued (the engine's overlap; a plugin's own I/O below it \
             waits); fio runs without it",
            args.delay_us, args.delay_us
        );
    }
    println!(
        "ours: the disk's LiveStack (no interceptors) + our {} engine, on one thread, one \
         commit per batch of completions; fio: its io_uring engine, {}",
        args.engine.name(),
        if args.fio_batch {
            "submitting and reaping up to the depth per call (--fio-batch)"
        } else {
            "its default batching (one request per submission)"
        }
    );
    println!(
        "CPU µs/req: the whole process's user+sys time per request, the kernel's io_uring \
         workers included (ours: getrusage SELF; fio: getrusage CHILDREN around the fio run); \
         thread µs/req: the submitting thread's alone (ours: getrusage THREAD; fio: its JSON \
         usr_cpu+sys_cpu, which fio reads with RUSAGE_THREAD)"
    );
    if let Some((file, specs, image, shown)) = &chain {
        let ids: Vec<&str> = specs.iter().map(|s| s.id.as_str()).collect();
        println!(
            "chain: the same stack and engine through {} ({}, top first) on {} ({} MiB \
             image, {} MiB shown through the chain, written through it once at start); \
             requests never overlap one in flight there, as the device orders them",
            file.display(),
            ids.join(", "),
            image.display(),
            args.size_mib,
            shown >> 20
        );
    }
    let _ = std::io::stdout().flush();

    let mut rows = Vec::new();
    for &depth in &args.depths {
        for rw in [Rw::RandRead, Rw::RandWrite] {
            let seed = 0x0123_4567_89ab_cdef ^ ((depth as u64) << 8) ^ rw as u64;
            let engine = args.engine.choice();
            let ours = ours::run(&path, &[], engine, rw, depth, runtime, bytes, seed, below)
                .map_err(|e| format!("ours {} qd{depth}: {e}", rw.name()))?;
            let settle = |p: &std::path::Path| {
                sys::settle(p).map_err(|e| format!("{}: fdatasync: {e}", p.display()))
            };
            settle(&path)?;
            let through = match &chain {
                None => None,
                Some((_, specs, image, _)) => {
                    let c = ours::run(image, specs, engine, rw, depth, runtime, bytes, seed, below)
                        .map_err(|e| format!("chain {} qd{depth}: {e}", rw.name()))?;
                    settle(image)?;
                    eprintln!(
                        "{} qd{depth}: through the chain {:.0} IOPS {:.2} µs/req ({:.2} thread)",
                        rw.name(),
                        c.iops,
                        c.cpu_us_per_req,
                        c.thread_us_per_req
                    );
                    Some(c)
                }
            };
            let fio = fio::run(
                &args.fio,
                &path,
                rw,
                depth,
                runtime,
                bytes,
                args.fio_batch,
                args.direct,
            )?;
            settle(&path)?;
            let row = Row {
                rw,
                depth,
                ours,
                fio,
                chain: through,
            };
            eprintln!(
                "{} qd{depth}: ours ({}) {:.0} IOPS {:.2} µs/req ({:.2} thread), \
                 fio {:.0} IOPS {:.2} µs/req ({:.2} thread), ratio {:.2}",
                rw.name(),
                ours.engine,
                ours.iops,
                ours.cpu_us_per_req,
                ours.thread_us_per_req,
                fio.iops,
                fio.cpu_us_per_req,
                fio.thread_us_per_req,
                row.ratio()
            );
            rows.push(row);
        }
    }

    println!();
    println!(
        "| job | depth | ours IOPS | fio IOPS | ratio | ours CPU µs/req | fio CPU µs/req \
         | ours thread µs/req | fio thread µs/req |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in &rows {
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            r.rw.name(),
            r.depth,
            r.ours.iops,
            r.fio.iops,
            r.ratio(),
            r.ours.cpu_us_per_req,
            r.fio.cpu_us_per_req,
            r.ours.thread_us_per_req,
            r.fio.thread_us_per_req
        );
    }
    if chain.is_some() {
        println!();
        println!(
            "| job | depth | plain IOPS | chain IOPS | chain/plain | plain CPU µs/req \
             | chain CPU µs/req | plain thread µs/req | chain thread µs/req |"
        );
        println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
        for r in &rows {
            let (Some(c), Some(ratio)) = (r.chain, r.chain_ratio()) else {
                continue;
            };
            println!(
                "| {} | {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
                r.rw.name(),
                r.depth,
                r.ours.iops,
                c.iops,
                ratio,
                r.ours.cpu_us_per_req,
                c.cpu_us_per_req,
                r.ours.thread_us_per_req,
                c.thread_us_per_req
            );
        }
        println!();
        println!("{}", chain_line(&rows));
    }
    if args.delay_us > 0 {
        println!();
        println!("{}", depth_line("plain", &rows, |r| Some(r.ours.iops)));
        println!(
            "{}",
            depth_line("chain", &rows, |r| r.chain.map(|c| c.iops))
        );
    }
    println!();
    println!("{}", last_line(&rows));
    Ok(())
}

/// `NAME qd32/qd1 iops ratio: X.XX` (geometric mean over randread and randwrite): what depth
/// buys over a slow layer below; `not measured` without both depths.
fn depth_line(name: &str, rows: &[Row], iops: fn(&Row) -> Option<f64>) -> String {
    let at = |rw: Rw, depth: usize| {
        rows.iter()
            .find(|r| r.rw == rw && r.depth == depth)
            .and_then(iops)
    };
    let ratios: Vec<f64> = [Rw::RandRead, Rw::RandWrite]
        .into_iter()
        .filter_map(|rw| Some(at(rw, 32)? / at(rw, 1)?))
        .collect();
    if ratios.is_empty() {
        return format!("{name} qd32/qd1 iops ratio: not measured (--depths needs 1 and 32)");
    }
    let mean = (ratios.iter().map(|r| r.ln()).sum::<f64>() / ratios.len() as f64).exp();
    format!("{name} qd32/qd1 iops ratio: {mean:.2}")
}

/// `<file>.chain.img`, beside the test file.
fn chain_image(path: &std::path::Path) -> PathBuf {
    let mut name = path.file_stem().unwrap_or_default().to_os_string();
    name.push(".chain.img");
    path.with_file_name(name)
}

/// `NAME: X.XX`, the geometric mean of `ratio` over the QD32 rows (randread and randwrite),
/// or `NAME: not measured (why)` where no QD32 row has one.
fn qd32_line(name: &str, rows: &[Row], ratio: fn(&Row) -> Option<f64>, why: &str) -> String {
    let at32: Vec<f64> = rows
        .iter()
        .filter(|r| r.depth == 32)
        .filter_map(ratio)
        .collect();
    if at32.is_empty() {
        return format!("{name}: not measured ({why})");
    }
    let mean = (at32.iter().map(|r| r.ln()).sum::<f64>() / at32.len() as f64).exp();
    format!("{name}: {mean:.2}")
}

/// Through the chain over plain, at QD32.
fn chain_line(rows: &[Row]) -> String {
    let why = "no chain, or 32 is not among --depths";
    qd32_line("chain/plain iops ratio qd32", rows, Row::chain_ratio, why)
}

/// Ours over fio at QD32.
fn last_line(rows: &[Row]) -> String {
    let why = "32 is not among --depths";
    qd32_line("engine/fio iops ratio qd32", rows, |r| Some(r.ratio()), why)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(rw: Rw, depth: usize, ours: f64, fio: f64) -> Row {
        let o = |iops| Outcome {
            iops,
            cpu_us_per_req: 1.0,
            thread_us_per_req: 1.0,
            engine: "io_uring",
        };
        Row {
            rw,
            depth,
            ours: o(ours),
            fio: o(fio),
            chain: None,
        }
    }

    #[test]
    fn the_last_line_is_the_geometric_mean_at_qd32() {
        let rows = [
            row(Rw::RandRead, 1, 10.0, 100.0),
            row(Rw::RandRead, 32, 80.0, 100.0),
            row(Rw::RandWrite, 32, 125.0, 100.0),
        ];
        // sqrt(0.8 × 1.25) = 1.
        assert_eq!(last_line(&rows), "engine/fio iops ratio qd32: 1.00");
        assert!(last_line(&rows[..1]).contains("not among --depths"));
    }

    #[test]
    fn the_chain_line_compares_the_chain_with_the_plain_stack_at_qd32() {
        let through = |mut r: Row, iops| {
            r.chain = Some(Outcome { iops, ..r.ours });
            r
        };
        let rows = [
            through(row(Rw::RandRead, 1, 100.0, 100.0), 10.0),
            through(row(Rw::RandRead, 32, 100.0, 100.0), 90.0),
            through(row(Rw::RandWrite, 32, 200.0, 100.0), 160.0),
        ];
        // sqrt(0.9 × 0.8) = 0.85; QD1's 0.1 is not in it.
        assert_eq!(chain_line(&rows), "chain/plain iops ratio qd32: 0.85");
        // The plain line is untouched by the chain.
        assert_eq!(last_line(&rows), "engine/fio iops ratio qd32: 1.41");
        let plain = [row(Rw::RandRead, 32, 1.0, 1.0)];
        assert!(chain_line(&plain).contains("not measured"));
    }

    #[test]
    fn the_chain_image_lies_beside_the_test_file() {
        assert_eq!(
            chain_image(std::path::Path::new("/var/tmp/engine-bench.img")),
            std::path::Path::new("/var/tmp/engine-bench.chain.img")
        );
    }

    #[test]
    fn arguments_parse() {
        let a =
            Args::try_parse_from(["engine-bench", "--depths", "1,32", "--engine", "sync"]).unwrap();
        assert_eq!(a.depths, [1, 32]);
        assert_eq!(a.engine, Engine::Sync);
        assert_eq!(a.runtime, 10);
        assert_eq!(a.size_mib, 1024);
        assert!(!a.fio_batch);
        assert!(a.interceptors.is_none());
        assert_eq!(
            Args::try_parse_from(["engine-bench"]).unwrap().depths,
            [1, 32, 128]
        );
        assert!(Args::try_parse_from(["engine-bench", "--engine", "aio"]).is_err());
        let slow = Args::try_parse_from(["engine-bench", "--direct", "--delay-us", "200"]).unwrap();
        assert!(slow.direct);
        assert_eq!(slow.delay_us, 200);
    }

    #[test]
    fn the_depth_line_is_qd32_over_qd1() {
        let rows = [
            row(Rw::RandRead, 1, 10.0, 1.0),
            row(Rw::RandRead, 32, 200.0, 1.0),
            row(Rw::RandWrite, 1, 10.0, 1.0),
            row(Rw::RandWrite, 32, 50.0, 1.0),
        ];
        // sqrt(20 × 5) = 10.
        assert_eq!(
            depth_line("plain", &rows, |r| Some(r.ours.iops)),
            "plain qd32/qd1 iops ratio: 10.00"
        );
        assert!(depth_line("chain", &rows, |r| r.chain.map(|c| c.iops)).contains("not measured"));
    }
}
