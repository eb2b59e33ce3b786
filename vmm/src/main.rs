//! `vmm`: boots a Linux guest on KVM from a TOML config.

use clap::Parser;

/// A KVM virtual machine monitor whose virtio block and net I/O passes through interceptors.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Path of the guest's TOML config (see configs/).
    #[arg(long)]
    config: std::path::PathBuf,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Booting guests is the next milestone (issue 3); until then refuse clearly rather than
    // pretend. The lab harness runs guests under QEMU meanwhile.
    anyhow::bail!(
        "{}: booting guests is not implemented yet; use `cargo run -p vmm-lab -- guest --backend qemu`",
        cli.config.display()
    )
}
