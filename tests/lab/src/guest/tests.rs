use super::*;

#[test]
fn interceptor_paths_become_absolute_whatever_the_working_directory() {
    // Tests run in the package directory; the file names its plugin relative to itself.
    let chain =
        InterceptorChain::from_file(Path::new("../../configs/interceptors/count.toml")).unwrap();
    assert_eq!(chain.ids, ["count"]);
    let table: toml::Table = toml::from_str(&chain.toml).unwrap();
    let path = table["interceptor"][0]["path"].as_str().unwrap();
    assert!(Path::new(path).is_absolute(), "{path}");
    assert!(
        path.ends_with("configs/interceptors/../../target/release/libinterceptor_counter.so"),
        "{path}"
    );
    // A key file named in an instance's config too.
    let chain =
        InterceptorChain::from_file(Path::new("../../configs/interceptors/encrypt.toml")).unwrap();
    let table: toml::Table = toml::from_str(&chain.toml).unwrap();
    let key = table["interceptor"][0]["config"]["key_file"]
        .as_str()
        .unwrap();
    assert!(
        key.starts_with('/') && key.ends_with("configs/interceptors/demo.key"),
        "{key}"
    );
}

fn spec(rootfs: RootFs, data: usize, results: bool) -> GuestSpec {
    let p = PathBuf::from("/x");
    GuestSpec {
        backend: Backend::Qemu,
        image: GuestImage {
            bzimage: p.clone(),
            vmlinux: p.clone(),
            rootfs_ext4: p.clone(),
            initramfs: p.clone(),
        },
        rootfs,
        vcpus: 1,
        mem_mib: 256,
        data_disks: vec![
            DataDisk {
                path: p.clone(),
                read_only: false
            };
            data
        ],
        results_disk: results.then(|| p.clone()),
        task: "selftest".into(),
        timeout: Duration::from_secs(1),
        interactive: false,
        echo: false,
        elf_kernel: false,
        interceptors: None,
        control: None,
        engine: None,
        num_queues: None,
        block_options: Vec::new(),
        net: None,
        control_sock: None,
        vmm_binary: None,
    }
}

#[test]
fn a_chain_whose_plugin_is_not_built_is_refused_naming_it() {
    let dir = std::env::temp_dir().join(format!("lab-chain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("chain.toml");
    std::fs::write(dir.join("libthere.so"), b"").unwrap();
    std::fs::write(
        &file,
        "[[interceptor]]\nid = \"a\"\npath = \"libthere.so\"\n\n\
             [[interceptor]]\nid = \"b\"\npath = \"libmissing.so\"\n",
    )
    .unwrap();
    let chain = InterceptorChain::from_file(&file).unwrap();
    assert_eq!(chain.plugins.len(), 2);
    let e = chain.require_plugins(&file).unwrap_err().to_string();
    assert!(
        e.contains("libmissing.so") && e.contains("is not there"),
        "{e}"
    );
    std::fs::write(
        &file,
        "[[interceptor]]\nid = \"a\"\npath = \"libthere.so\"\n",
    )
    .unwrap();
    let chain = InterceptorChain::from_file(&file).unwrap();
    chain.require_plugins(&file).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn results_disk_is_named_after_root_and_data_disks() {
    assert!(kernel_cmdline(&spec(RootFs::Ext4, 1, true)).ends_with("selftest results=/dev/vdc"));
    assert!(kernel_cmdline(&spec(RootFs::Ext4, 2, true)).ends_with("results=/dev/vdd"));
    assert!(kernel_cmdline(&spec(RootFs::Initramfs, 1, true)).ends_with("results=/dev/vdb"));
    assert!(!kernel_cmdline(&spec(RootFs::Ext4, 1, false)).contains("results="));
}

fn args(cmd: &Command) -> Vec<String> {
    cmd.get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect()
}

#[test]
fn qemu_io_uring_puts_only_the_data_disks_on_io_uring_and_an_iothread() {
    let mut s = spec(RootFs::Ext4, 1, true);
    s.num_queues = Some(2);
    let threads = args(&qemu_command(&s)).join(" ");
    assert!(!threads.contains("io_uring") && !threads.contains("iothread"));
    assert!(
        threads.contains("virtio-blk-pci,drive=d1,num-queues=2"),
        "{threads}"
    );
    s.backend = Backend::QemuIoUring;
    let a = args(&qemu_command(&s));
    let drives: Vec<&String> = a.iter().filter(|x| x.starts_with("file=")).collect();
    assert_eq!(drives.len(), 3, "{a:?}");
    assert!(
        drives[0].ends_with("aio=threads,readonly=on"),
        "root: {}",
        drives[0]
    );
    assert!(
        drives[1].ends_with("cache=writeback,aio=io_uring"),
        "data: {}",
        drives[1]
    );
    assert!(drives[2].ends_with("aio=threads"), "results: {}", drives[2]);
    let joined = a.join(" ");
    assert!(joined.contains("-object iothread,id=io1 "), "{joined}");
    assert!(
        joined.contains("virtio-blk-pci,drive=d1,num-queues=2,iothread=io1"),
        "{joined}"
    );
    assert_eq!(joined.matches("iothread=").count(), 1, "{joined}");
}

#[test]
fn a_qemu_card_is_virtio_net_pci_on_its_tap_with_vhost_as_asked() {
    let mut s = spec(RootFs::Ext4, 1, true);
    for vhost in [false, true] {
        s.net = Some(NetSpec {
            tap: "vmtapa".into(),
            mac: "52:54:00:00:00:0a".into(),
            vhost,
            ..Default::default()
        });
        let joined = args(&qemu_command(&s)).join(" ");
        let want = format!(
            "-netdev tap,id=n0,ifname=vmtapa,script=no,downscript=no,vhost={} \
                 -device virtio-net-pci,netdev=n0,mac=52:54:00:00:00:0a",
            if vhost { "on" } else { "off" }
        );
        assert!(joined.contains(&want), "{joined}");
    }
}

#[test]
fn report_ends_at_the_first_nul() {
    let dir = Scratch::new("results-test").unwrap();
    let path = dir.path().join("r.img");
    let mut bytes = b"@@GUEST@@ exit rc=0\n".to_vec();
    bytes.extend_from_slice(&[0, b'x', 0, 0]);
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(
        read_results(&path).as_deref(),
        Some("@@GUEST@@ exit rc=0\n")
    );
    std::fs::write(&path, [0u8; 16]).unwrap();
    assert_eq!(read_results(&path), None, "an empty disk holds no report");
}
