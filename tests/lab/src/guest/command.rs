//! How each VMM is started for a guest: vmm's config file and command line, QEMU's
//! command line, and the guest kernel's command line they share.

use super::*;

/// TOML string literal.
pub(super) fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The guest.toml our `vmm` gets for a spec: the same disks, in the same order, as QEMU's.
pub fn vmm_config(spec: &GuestSpec) -> String {
    let mut t = format!(
        "[machine]\nvcpus = {}\nmemory_mib = {}\n\n[kernel]\npath = {}\ncmdline = {}\n",
        spec.vcpus,
        spec.mem_mib,
        toml_str(
            &if spec.elf_kernel {
                &spec.image.vmlinux
            } else {
                &spec.image.bzimage
            }
            .to_string_lossy()
        ),
        toml_str(&kernel_cmdline(spec))
    );
    let mut disks: Vec<(String, &Path, bool)> = Vec::new();
    match spec.rootfs {
        RootFs::Ext4 => disks.push(("rootfs".into(), &spec.image.rootfs_ext4, true)),
        RootFs::Initramfs => {
            t.push_str(&format!(
                "initrd = {}\n",
                toml_str(&spec.image.initramfs.to_string_lossy())
            ));
        }
    }
    for (i, d) in spec.data_disks.iter().enumerate() {
        disks.push((format!("data{i}"), &d.path, d.read_only));
    }
    if let Some(r) = &spec.results_disk {
        disks.push(("results".into(), r, false));
    }
    for (id, path, ro) in disks {
        t.push_str(&format!(
            "\n[[block]]\nid = {}\npath = {}\nread_only = {ro}\n",
            toml_str(&id),
            toml_str(&path.to_string_lossy())
        ));
        if let Some(engine) = &spec.engine {
            t.push_str(&format!("engine = {}\n", toml_str(engine)));
        }
        if let (Some(n), true) = (spec.num_queues, id.starts_with("data")) {
            t.push_str(&format!("num_queues = {n}\n"));
        }
        if id.starts_with("data") {
            for (k, v) in &spec.block_options {
                t.push_str(&format!("{k} = {v}\n"));
            }
        }
        if let (Some(chain), "data0") = (&spec.interceptors, id.as_str()) {
            let ids: Vec<String> = chain.ids.iter().map(|i| toml_str(i)).collect();
            t.push_str(&format!("interceptors = [{}]\n", ids.join(", ")));
        }
    }
    if let Some(net) = &spec.net {
        t.push_str(&format!(
            "\n[[net]]\nid = \"net0\"\ntap = {}\nmac = {}\n",
            toml_str(&net.tap),
            toml_str(&net.mac)
        ));
        if let Some(chain) = &net.interceptors {
            let ids: Vec<String> = chain.ids.iter().map(|i| toml_str(i)).collect();
            t.push_str(&format!("interceptors = [{}]\n\n", ids.join(", ")));
            t.push_str(&chain.toml);
        }
    }
    if let Some(chain) = &spec.interceptors {
        t.push('\n');
        t.push_str(&chain.toml);
    }
    // `--control load:...` loads the harness's plugin builds at run time: the only folder
    // this vmm's API may load from (docs/security.md, "Landlock").
    let plugins = crate::plugins::plugin_dir();
    if plugins.is_dir() {
        t.push_str(&format!(
            "\n[landlock]\nplugin_dirs = [{}]\n",
            toml_str(&plugins.to_string_lossy())
        ));
    }
    t
}

pub(super) fn vmm_command(spec: &GuestSpec) -> Result<Command> {
    let vmm = match &spec.vmm_binary {
        Some(b) => b.clone(),
        None => {
            let exe = std::env::current_exe().context("locating the harness binary")?;
            exe.with_file_name("vmm")
        }
    };
    if !vmm.exists() {
        bail!(
            "{} not found: build the workspace (cargo build --workspace)",
            vmm.display()
        );
    }
    // Beside the run's results disk when it has one: two guests of one harness run at once.
    let config = match &spec.results_disk {
        Some(r) => r.with_file_name("vmm.toml"),
        None => std::env::temp_dir().join(format!("vmm-lab-{}.toml", std::process::id())),
    };
    std::fs::write(&config, vmm_config(spec))
        .with_context(|| format!("writing {}", config.display()))?;
    let mut cmd = Command::new(vmm);
    cmd.arg("--config").arg(config);
    // Always: when a guest hangs, its queues' figures say where (`boot_once`).
    cmd.arg("--api-sock").arg(spec.control_socket());
    Ok(cmd)
}

/// The guest's name for the n-th virtio disk (0: /dev/vda).
pub(super) fn virtio_disk_name(n: usize) -> String {
    let letter = (b'a' + (n % 26) as u8) as char;
    format!("/dev/vd{letter}")
}

/// The kernel command line for a spec.
pub fn kernel_cmdline(spec: &GuestSpec) -> String {
    let root = match spec.rootfs {
        RootFs::Ext4 => "root=/dev/vda ro rootfstype=ext4 init=/init",
        RootFs::Initramfs => "rdinit=/init",
    };
    // i8042.*: the guest has no keyboard; skip the controller probe (as Firecracker does).
    let mut line = format!(
        "console=ttyS0 reboot=k panic=-1 quiet i8042.noaux i8042.nomux i8042.dumbkbd {root} {}",
        spec.task
    );
    if spec.results_disk.is_some() {
        let before = usize::from(spec.rootfs == RootFs::Ext4) + spec.data_disks.len();
        line.push_str(&format!(" results={}", virtio_disk_name(before)));
    }
    line
}

/// QEMU's command line for a spec. The root and results disks always use `aio=threads`;
/// the data disks use the backend's configuration.
pub(super) fn qemu_command(spec: &GuestSpec) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    // debug-threads: named threads (`CPU 0/KVM`, `worker`, `IO io1`), so that the bench's
    // CPU figures can say which of QEMU's threads did the work.
    cmd.args([
        "-enable-kvm",
        "-cpu",
        "host",
        "-name",
        "guest,debug-threads=on",
    ])
    .args(
        crate::qemu_base_args(spec.vcpus, spec.mem_mib)
            .into_iter()
            .map(|a| match (a.as_str(), spec.backend) {
                ("pc", Backend::QemuNoAcpi) => "pc,acpi=off,hpet=off".to_string(),
                _ => a,
            }),
    )
    .arg("-kernel")
    .arg(&spec.image.bzimage)
    .args(["-append", &kernel_cmdline(spec)]);
    let mut drives: Vec<(String, bool)> = Vec::new();
    match spec.rootfs {
        RootFs::Ext4 => drives.push((spec.image.rootfs_ext4.to_string_lossy().into_owned(), true)),
        RootFs::Initramfs => {
            cmd.arg("-initrd").arg(&spec.image.initramfs);
        }
    }
    let first_data = drives.len();
    for d in &spec.data_disks {
        drives.push((d.path.to_string_lossy().into_owned(), d.read_only));
    }
    let data = first_data..drives.len();
    if let Some(results) = &spec.results_disk {
        drives.push((results.to_string_lossy().into_owned(), false));
    }
    for (i, (path, ro)) in drives.iter().enumerate() {
        let is_data = data.contains(&i);
        let uring = is_data && spec.backend == Backend::QemuIoUring;
        // Buffered I/O: the lab's disk images live on tmpfs, which has no O_DIRECT.
        let mut drive = format!(
            "file={},if=none,id=d{i},format=raw,cache=writeback,aio={}",
            path.replace(',', ",,"),
            if uring { "io_uring" } else { "threads" }
        );
        if *ro {
            drive.push_str(",readonly=on");
        }
        let mut device = format!("virtio-blk-pci,drive=d{i}");
        if let (Some(n), true) = (spec.num_queues, is_data) {
            device.push_str(&format!(",num-queues={n}"));
        }
        if uring {
            cmd.args(["-object", &format!("iothread,id=io{i}")]);
            device.push_str(&format!(",iothread=io{i}"));
        }
        cmd.args(["-drive", &drive]).args(["-device", &device]);
    }
    if let Some(net) = &spec.net {
        // QEMU creates the tap (or opens it) like vmm; the harness puts it on the bridge.
        let vhost = if net.vhost { "on" } else { "off" };
        cmd.args([
            "-netdev",
            &format!(
                "tap,id=n0,ifname={},script=no,downscript=no,vhost={vhost}",
                net.tap
            ),
            "-device",
            &format!("virtio-net-pci,netdev=n0,mac={}", net.mac),
        ]);
    }
    cmd
}
