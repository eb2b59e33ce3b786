//! What a VMM's threads were doing when the harness gave up on its guest: each thread's
//! name, scheduler state, kernel wait channel, system call and CPU time, read from `/proc`
//! before the process is killed. It tells a device thread idle in `epoll_wait` (a lost
//! kick or interrupt) from one blocked in a call (a stuck backend or plugin) or a vCPU that
//! spins.

use std::path::Path;

/// One line per thread of `pid`: `tid name state wchan syscall cpu=S last_cpu=N` (the
/// CPU it last ran on: a halted vCPU's timer lives in that CPU's queue). Empty when the
/// process is gone.
pub fn snapshot(pid: u32) -> String {
    let task = Path::new("/proc").join(pid.to_string()).join("task");
    let Ok(entries) = std::fs::read_dir(&task) else {
        return String::new();
    };
    let mut tids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort_unstable();
    let ticks = clock_ticks();
    let mut out = String::new();
    for tid in tids {
        let dir = task.join(tid.to_string());
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        let Some((name, state, cpu_ticks, last_cpu)) = parse_stat(&read("stat")) else {
            continue;
        };
        let wchan = read("wchan");
        let syscall = read("syscall");
        let first = syscall.split_whitespace().next().unwrap_or("?");
        out.push_str(&format!(
            "{tid} {name} {state} wchan={} syscall={} cpu={:.2}s last_cpu={last_cpu}\n",
            if wchan.is_empty() { "-" } else { wchan.trim() },
            syscall_name(first),
            cpu_ticks as f64 / ticks
        ));
    }
    out
}

/// (name, state, utime + stime in ticks, the CPU it last ran on) from a `stat` line, whose
/// name is in parentheses and may hold spaces.
fn parse_stat(stat: &str) -> Option<(String, char, u64, u32)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?.to_string();
    let rest: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    // After the name: state is field 3 of stat(5), utime and stime fields 14 and 15.
    let state = rest.first()?.chars().next()?;
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    // Field 39, `processor`.
    let cpu: u32 = rest.get(36)?.parse().ok()?;
    Some((name, state, utime.saturating_add(stime), cpu))
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf reads a constant of the system.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// The calls a VMM's threads wait in, by name; others by number.
fn syscall_name(nr: &str) -> String {
    let Ok(n) = nr.parse::<i64>() else {
        return nr.to_string(); // "running" or "-1"
    };
    let name = match n {
        libc::SYS_read => "read",
        libc::SYS_write => "write",
        libc::SYS_ioctl => "ioctl",
        libc::SYS_futex => "futex",
        libc::SYS_epoll_wait => "epoll_wait",
        libc::SYS_epoll_pwait => "epoll_pwait",
        libc::SYS_io_uring_enter => "io_uring_enter",
        libc::SYS_ppoll => "ppoll",
        libc::SYS_poll => "poll",
        libc::SYS_accept4 => "accept4",
        libc::SYS_nanosleep => "nanosleep",
        libc::SYS_clock_nanosleep => "clock_nanosleep",
        libc::SYS_pread64 => "pread64",
        libc::SYS_pwrite64 => "pwrite64",
        libc::SYS_preadv => "preadv",
        libc::SYS_pwritev => "pwritev",
        libc::SYS_fsync => "fsync",
        libc::SYS_fdatasync => "fdatasync",
        libc::SYS_wait4 => "wait4",
        _ => return format!("#{n}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_with_spaces_in_the_name_parses() {
        // Fields 3..=39; utime 250 and stime 50 (14 and 15), processor 1 (39).
        let mut fields: Vec<String> = (3..=39).map(|_| "0".to_string()).collect();
        fields[0] = "S".into();
        fields[14 - 3] = "250".into();
        fields[15 - 3] = "50".into();
        fields[39 - 3] = "1".into();
        let stat = format!("4242 (blk-data 0) {}", fields.join(" "));
        assert_eq!(parse_stat(&stat), Some(("blk-data 0".into(), 'S', 300, 1)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_lists_its_own_threads_with_a_named_one() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::Builder::new()
            .name("snap-probe".into())
            .spawn(move || {
                let _ = rx.recv();
            })
            .unwrap();
        // The thread may not be waiting yet: look again until it is (it must, soon).
        let mut line = String::new();
        for _ in 0..200 {
            let text = snapshot(std::process::id());
            line = text
                .lines()
                .find(|l| l.contains("snap-probe"))
                .unwrap_or_default()
                .to_string();
            if line.contains(" S ") && line.contains("syscall=futex") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        let _ = tx.send(());
        t.join().unwrap();
        assert!(
            line.contains(" S ") && line.contains("syscall=futex"),
            "{line}"
        );
        assert!(snapshot(u32::MAX).is_empty());
    }
}
