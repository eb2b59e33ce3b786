//! Guests on one bridge: `br-lab`, 10.0.0.1/24 on the harness's side, each guest's card a
//! tap on it. Inside the lab VM the bridge is the lab's own; on a host with hardware KVM it
//! lives in a network namespace of this process, so nothing touches the host's network.

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::time::Duration;
use vmm_lab::guest::{self, GuestRun, GuestSpec, NetSpec};
use vmm_lab::labvm;

/// The bridge the cards go on.
pub const BRIDGE: &str = "br-lab";
/// The bridge's own address: what a guest reaches the harness at.
pub const HOST_IP: &str = "10.0.0.1";

pub fn ip(args: &[&str]) -> Result<()> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2: scripts/setup.sh installs it)")?;
    if !out.status.success() {
        bail!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Outside the lab VM (a host with hardware KVM), the taps and bridge go in a network
/// namespace of this process's own. Once per process.
fn private_network() -> Result<()> {
    static DONE: std::sync::OnceLock<std::result::Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        if std::env::var_os(labvm::INSIDE_ENV).is_some() {
            return Ok(());
        }
        // SAFETY: unshare changes this thread's namespaces; the guests' processes and the
        // threads started from here inherit them.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(format!(
                "cannot make a private network namespace: {}",
                std::io::Error::last_os_error()
            ));
        }
        ip(&["link", "set", "lo", "up"]).map_err(|e| e.to_string())
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// The bridge, up with its address; deleted (with the taps still on it) when dropped.
pub struct Bridge(());

impl Bridge {
    pub fn up() -> Result<Bridge> {
        private_network()?;
        let _ = ip(&["link", "del", BRIDGE]);
        ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", BRIDGE])?;
        ip(&["link", "set", BRIDGE, "up"])?;
        Ok(Bridge(()))
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", BRIDGE]);
    }
}

/// Guest `name`'s card on the bridge: tap `vmtap<name>`, MAC `52:54:00:00:00:0<name>`.
pub fn card(name: &str) -> NetSpec {
    NetSpec {
        tap: format!("vmtap{name}"),
        mac: format!("52:54:00:00:00:0{name}"),
        bridge: Some(BRIDGE.into()),
        ..Default::default()
    }
}

/// Boots every spec at once and, once all their taps are on the bridge, runs `host_cmd`
/// there beside them: each run, and the command's output.
pub fn boot_all(
    specs: &[GuestSpec],
    host_cmd: Option<String>,
) -> (Vec<Result<GuestRun>>, Option<String>) {
    let taps: Vec<String> = specs
        .iter()
        .filter_map(|s| s.net.as_ref().map(|n| n.tap.clone()))
        .collect();
    let host = host_cmd.map(|cmd| {
        std::thread::spawn(move || {
            let brif = Path::new("/sys/class/net").join(BRIDGE).join("brif");
            let t0 = std::time::Instant::now();
            while !taps.iter().all(|t| brif.join(t).exists()) {
                if t0.elapsed() > Duration::from_secs(120) {
                    return "the cards never joined the bridge".to_string();
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            match std::process::Command::new("sh")
                .arg("-c")
                .arg(&cmd)
                .output()
            {
                Ok(o) => format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ),
                Err(e) => format!("sh -c {cmd:?}: {e}"),
            }
        })
    });
    let runs: Vec<Result<GuestRun>> = std::thread::scope(|scope| {
        let handles: Vec<_> = specs
            .iter()
            .map(|spec| scope.spawn(move || guest::boot(spec)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a boot panicked")))
            })
            .collect()
    });
    let host_out = host.map(|h| {
        h.join()
            .unwrap_or_else(|_| "the host command panicked".into())
    });
    (runs, host_out)
}
