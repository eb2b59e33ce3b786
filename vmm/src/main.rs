//! `vmm`: boots a Linux guest on KVM from a TOML config.

mod config;

use clap::Parser;
use config::{HostLimits, VmConfig};
use std::process::ExitCode;

/// A KVM virtual machine monitor whose virtio block and net I/O passes through interceptors.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Path of the guest's TOML config (see configs/).
    #[arg(long)]
    config: std::path::PathBuf,
}

/// Exit status for a config the VMM refuses.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let file = cli.config.display().to_string();
    let limits = HostLimits {
        // Until the VM code asks KVM (KVM_CAP_MAX_VCPUS), the MP table's limit.
        max_vcpus: 254,
        available_mib: config::host_available_mib(),
    };
    let cfg = match VmConfig::load(&cli.config).and_then(|c| c.validate(&file, limits).map(|_| c)) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("vmm: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let disks: Vec<String> = cfg
        .block
        .iter()
        .map(|b| format!("{} ({})", b.id, if b.read_only { "ro" } else { "rw" }))
        .collect();
    // Booting guests is being built (issue 3); refuse clearly rather than pretend.
    eprintln!(
        "vmm: {file}: config is valid ({} vCPU, {} MiB, kernel {} with {:?}, disks: {}), \
         but booting guests is not implemented yet",
        cfg.machine.vcpus,
        cfg.machine.memory_mib,
        cfg.kernel.path.display(),
        cfg.kernel.cmdline,
        disks.join(", ")
    );
    ExitCode::FAILURE
}
