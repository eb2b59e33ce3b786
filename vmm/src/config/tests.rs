use super::*;

const HOST: HostLimits = HostLimits {
    max_vcpus: 8,
    available_mib: 4096,
};

/// The start of a bzImage: its setup header's magic, boot protocol 2.15 and the
/// command-line size it takes; enough for `validate`, not to boot.
fn fake_bzimage(cmdline_size: u32) -> Vec<u8> {
    let mut k = vec![0u8; 0x1000];
    k[0x202..0x206].copy_from_slice(b"HdrS");
    k[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    k[0x238..0x23c].copy_from_slice(&cmdline_size.to_le_bytes());
    k
}

fn dir_with_files() -> (tempdir::Dir, String) {
    let d = tempdir::Dir::new();
    std::fs::write(d.0.join("bzImage"), fake_bzimage(2047)).unwrap();
    std::fs::write(d.0.join("disk.img"), b"d").unwrap();
    std::fs::write(d.0.join("disk2.img"), b"d").unwrap();
    let file = d.0.join("guest.toml").display().to_string();
    (d, file)
}

mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new() -> Dir {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "vmm-config-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn load(text: &str) -> (Result<(), ConfigError>, tempdir::Dir) {
    let (d, file) = dir_with_files();
    std::fs::write(&file, text).unwrap();
    let r = VmConfig::load(Path::new(&file)).and_then(|c| c.validate(&file, HOST));
    (r, d)
}

fn err(text: &str) -> String {
    load(text).0.unwrap_err().to_string()
}

const GOOD: &str = r#"
        [machine]
        vcpus = 2
        memory_mib = 512
        [kernel]
        path = "bzImage"
        cmdline = "console=ttyS0"
        [[block]]
        id = "root"
        path = "disk.img"
        read_only = true
        [[block]]
        id = "data"
        path = "disk2.img"
        [api]
        socket = "vmm.sock"
    "#;

#[test]
fn a_good_config_loads_with_paths_resolved() {
    let (d, file) = dir_with_files();
    std::fs::write(&file, GOOD).unwrap();
    let cfg = VmConfig::load(Path::new(&file)).unwrap();
    cfg.validate(&file, HOST).unwrap();
    assert_eq!(cfg.machine.vcpus, 2);
    assert_eq!(cfg.kernel.path, d.0.join("bzImage"));
    assert_eq!(cfg.block.len(), 2);
    assert!(cfg.block[0].read_only && !cfg.block[1].read_only);
    assert_eq!(cfg.api.unwrap().socket, d.0.join("vmm.sock"));
}

#[test]
fn unknown_fields_are_refused_by_name() {
    let e = err(&GOOD.replace("vcpus = 2", "vcpus = 2\ncpus = 3"));
    assert!(e.contains("guest.toml") && e.contains("cpus"), "{e}");
    let e = err(&GOOD.replace("read_only = true", "readonly = true"));
    assert!(e.contains("readonly"), "{e}");
}

#[test]
fn each_invalid_value_names_its_field() {
    for (from, to, field) in [
        ("vcpus = 2", "vcpus = 0", "machine.vcpus"),
        ("vcpus = 2", "vcpus = 9", "machine.vcpus"),
        ("memory_mib = 512", "memory_mib = 16", "machine.memory_mib"),
        (
            "memory_mib = 512",
            "memory_mib = 999999",
            "machine.memory_mib",
        ),
        ("path = \"bzImage\"", "path = \"nope\"", "kernel.path"),
        (
            "path = \"disk2.img\"",
            "path = \"missing.img\"",
            "block[1].path",
        ),
        ("id = \"data\"", "id = \"root\"", "block[1].id"),
        (
            "path = \"disk2.img\"",
            "path = \"disk2.img\"\nnum_queues = 17",
            "block[1].num_queues",
        ),
        (
            "path = \"disk2.img\"",
            "path = \"disk2.img\"\ncoalesce_us = 10001",
            "block[1].coalesce_us",
        ),
        (
            "path = \"disk2.img\"",
            "path = \"disk2.img\"\nhook_threads = 65",
            "block[1].hook_threads",
        ),
        ("id = \"data\"", "id = \"a,b\"", "block[1].id"),
        (
            "cmdline = \"console=ttyS0\"",
            "cmdline = \"x\"\ninitrd = \"none\"",
            "kernel.initrd",
        ),
    ] {
        let text = GOOD.replace(from, to);
        assert_ne!(text, GOOD, "{from}");
        let e = err(&text);
        assert!(
            e.contains(field) && e.contains("guest.toml"),
            "{field}: {e}"
        );
    }
}

/// Two good cards, then each field of the second made wrong in turn: the error names
/// the field and says what is wrong with the value.
#[test]
fn each_invalid_net_value_names_its_field_and_why() {
    let nets = format!(
        "{GOOD}\n[[net]]\nid = \"net0\"\ntap = \"vmtap0\"\nmac = \"52:54:00:00:00:01\"\n\
             [[net]]\nid = \"net1\"\ntap = \"vmtap1\"\nmac = \"52:54:00:00:00:02\"\nmtu = 9000\n"
    );
    let (r, _d) = load(&nets);
    r.unwrap();
    for (from, to, field, why) in [
        ("id = \"net1\"", "id = \"net0\"", "net[1].id", "used twice"),
        ("id = \"net1\"", "id = \"data\"", "net[1].id", "used twice"),
        ("id = \"net1\"", "id = \"a b\"", "net[1].id", "a b"),
        (
            "tap = \"vmtap1\"",
            "tap = \"vmtap0\"",
            "net[1].tap",
            "serves another",
        ),
        ("tap = \"vmtap1\"", "tap = \"\"", "net[1].tap", "1 to 15"),
        (
            "tap = \"vmtap1\"",
            "tap = \"a-tap-name-too-long\"",
            "net[1].tap",
            "1 to 15",
        ),
        (
            "tap = \"vmtap1\"",
            "tap = \"../x\"",
            "net[1].tap",
            "[A-Za-z0-9_.-]",
        ),
        (
            "mac = \"52:54:00:00:00:02\"",
            "mac = \"52:54:00:00:00\"",
            "net[1].mac",
            "not a MAC",
        ),
        (
            "mac = \"52:54:00:00:00:02\"",
            "mac = \"52:54:00:00:00:zz\"",
            "net[1].mac",
            "not a MAC",
        ),
        (
            "mac = \"52:54:00:00:00:02\"",
            "mac = \"52:54:00:00:00:002\"",
            "net[1].mac",
            "not a MAC",
        ),
        (
            "mac = \"52:54:00:00:00:02\"",
            "mac = \"01:00:5e:00:00:01\"",
            "net[1].mac",
            "multicast",
        ),
        (
            "mac = \"52:54:00:00:00:02\"",
            "mac = \"00:00:00:00:00:00\"",
            "net[1].mac",
            "not an address",
        ),
        ("mtu = 9000", "mtu = 67", "net[1].mtu", "68 to 9000"),
        ("mtu = 9000", "mtu = 9001", "net[1].mtu", "68 to 9000"),
        (
            "mtu = 9000",
            "mtu = 9000\ninterceptors = [\"nope\"]",
            "net[1]",
            "nope",
        ),
    ] {
        let text = nets.replace(from, to);
        assert_ne!(text, nets, "{from}");
        let e = err(&text);
        assert!(
            e.contains(field) && e.contains(why) && e.contains("guest.toml"),
            "{field}: {e}"
        );
    }
    for (text, why) in [
        (nets.replace("mtu = 9000", "mtu = 70000"), "mtu"),
        (nets.replace("mtu = 9000", "mtu = -1"), "mtu"),
        (
            nets.replace("mtu = 9000", "mtu = 9000\nqueues = 2"),
            "queues",
        ),
        (nets.replace("mac = \"52:54:00:00:00:02\"\n", ""), "mac"),
    ] {
        let e = err(&text);
        assert!(e.contains(why) && e.contains("guest.toml"), "{why}: {e}");
    }
}

#[test]
fn wrong_types_and_garbage_are_parse_errors() {
    for text in [
        GOOD.replace("vcpus = 2", "vcpus = \"two\""),
        GOOD.replace("vcpus = 2", "vcpus = -1"),
        "[kernel".to_string(),
        "\u{0}\u{1}garbage".to_string(),
        String::new(),
    ] {
        let e = err(&text);
        assert!(e.contains("guest.toml"), "{e}");
    }
}

fn err_with(text: &str, host: HostLimits) -> String {
    let (d, file) = dir_with_files();
    std::fs::write(&file, text).unwrap();
    let e = VmConfig::load(Path::new(&file))
        .and_then(|c| c.validate(&file, host))
        .unwrap_err()
        .to_string();
    drop(d);
    e
}

/// One line, bounded, naming the file and the field.
fn assert_one_line(e: &str, field: &str) {
    assert!(
        e.contains("guest.toml") && e.contains(field),
        "{field}: {e}"
    );
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.len() < 600, "{} bytes: {e}", e.len());
}

#[test]
fn a_kernel_path_that_is_not_a_kernel_is_refused_naming_it() {
    let (d, file) = dir_with_files();
    let mut elf = vec![0u8; 64];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2;
    elf[5] = 1;
    let mut elf32 = elf.clone();
    elf32[4] = 1;
    for (name, bytes, ok) in [
        ("k", b"k".to_vec(), false),
        ("text", b"#!/bin/sh\necho not a kernel\n".to_vec(), false),
        ("empty", Vec::new(), false),
        ("elf32", elf32, false),
        ("elf64", elf, true),
        ("bz", fake_bzimage(2047), true),
        ("short-bz", fake_bzimage(2047)[..0x210].to_vec(), true),
    ] {
        let path = d.0.join(name);
        std::fs::write(&path, bytes).unwrap();
        let text = GOOD.replace("path = \"bzImage\"", &format!("path = {name:?}"));
        std::fs::write(&file, text).unwrap();
        let r = VmConfig::load(Path::new(&file)).and_then(|c| c.validate(&file, HOST));
        match (r, ok) {
            (Ok(()), true) => {}
            (Err(e), false) => {
                let e = e.to_string();
                assert_one_line(&e, "kernel.path");
                assert!(e.contains("not") && e.contains(name), "{e}");
            }
            (r, _) => panic!("{name}: {r:?}"),
        }
    }
}

#[test]
fn the_cmdline_is_printable_ascii_and_fits_the_boot_protocol_with_the_disks_words() {
    let with = |cmdline: &str| GOOD.replace("cmdline = \"console=ttyS0\"", cmdline);
    // GOOD has two disks: 80 bytes are kept for their words.
    let room = MAX_CMDLINE - 2 * CMDLINE_PER_DISK;
    load(&with(&format!("cmdline = \"{}\"", "a".repeat(room))))
        .0
        .unwrap();
    let e = err(&with(&format!("cmdline = \"{}\"", "a".repeat(room + 1))));
    assert_one_line(&e, "kernel.cmdline");
    assert!(
        e.contains(&format!("{} bytes is longer than the {room}", room + 1)),
        "{e}"
    );
    let e = err(&with(&format!("cmdline = \"{}\"", "a".repeat(300_000))));
    assert_one_line(&e, "kernel.cmdline");
    for bad in [
        r"a\u0000b",
        r"a\tb",
        r"a\nb",
        r"\u001b[31m",
        "caf\u{e9}",
        r"\u007f",
    ] {
        let e = err(&with(&format!("cmdline = \"{bad}\"")));
        assert_one_line(&e, "kernel.cmdline");
        assert!(e.contains("only printable ASCII"), "{bad}: {e}");
    }
    // A bzImage that takes less says so in its header.
    let (d, file) = dir_with_files();
    std::fs::write(d.0.join("bzImage"), fake_bzimage(255)).unwrap();
    std::fs::write(&file, with(&format!("cmdline = \"{}\"", "a".repeat(200)))).unwrap();
    let e = VmConfig::load(Path::new(&file))
        .and_then(|c| c.validate(&file, HOST))
        .unwrap_err()
        .to_string();
    assert!(e.contains("longer than the 175 "), "{e}");
}

#[test]
fn the_config_file_must_be_a_regular_file_of_at_most_a_mib() {
    let d = tempdir::Dir::new();
    let fifo = d.0.join("fifo.toml");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string; mkfifo only creates a file.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let big = d.0.join("big.toml");
    std::fs::write(&big, "#".repeat(MAX_CONFIG_BYTES as usize + 1)).unwrap();
    let binary = d.0.join("binary.toml");
    std::fs::write(&binary, b"[kernel]\npath = \"\xff\xfe\"\n").unwrap();
    for (path, want) in [
        (fifo.as_path(), "not a regular file"),
        (Path::new("/dev/zero"), "not a regular file"),
        (d.0.as_path(), "not a regular file"),
        (big.as_path(), "larger than 1024 KiB"),
        (binary.as_path(), "not UTF-8 text (byte 17)"),
    ] {
        let e = VmConfig::load(path).unwrap_err().to_string();
        assert!(
            e.starts_with(&path.display().to_string()) && e.contains(want),
            "{e}"
        );
        assert_eq!(e.lines().count(), 1, "{e}");
    }
}

#[test]
fn toml_errors_are_one_bounded_line_with_where_and_what() {
    let long = "x".repeat(200_000);
    for (text, want) in [
        (format!("{GOOD}\nbad = \"{long}"), "line 18"),
        (format!("{GOOD}\n{long} = 1"), "unknown field"),
        (
            GOOD.replace("vcpus = 2", "vcpus = \"two\""),
            "line 3, column 17",
        ),
        ("[kernel".to_string(), "line 1"),
        (
            format!("[kernel]\npath = \"\u{1b}[2J{long}\"\n"),
            "line 2, column 9",
        ),
    ] {
        let e = err(&text);
        assert!(
            e.contains("guest.toml") && e.contains(want),
            "{want}: {}",
            clip(&e, 300)
        );
        assert_eq!(e.lines().count(), 1, "{}", clip(&e, 300));
        assert!(e.len() < 400, "{} bytes: {}", e.len(), clip(&e, 300));
        assert!(!e.contains('\u{1b}'), "{e}");
    }
    let e = err(&GOOD.replace("vcpus = 2", "vcpus = \"two\""));
    assert!(e.contains("(at `vcpus = \"two\"`)"), "{e}");
}

#[test]
fn an_initrd_too_large_for_the_guests_low_memory_is_refused() {
    let (d, file) = dir_with_files();
    let initrd = d.0.join("initrd");
    let f = std::fs::File::create(&initrd).unwrap();
    f.set_len(600 << 20).unwrap();
    let text = GOOD.replace("cmdline = \"console=ttyS0\"", "initrd = \"initrd\"");
    std::fs::write(&file, &text).unwrap();
    let e = VmConfig::load(Path::new(&file))
        .and_then(|c| c.validate(&file, HOST))
        .unwrap_err()
        .to_string();
    assert_one_line(&e, "kernel.initrd");
    assert!(
        e.contains("629145600 bytes, more than the guest's low memory"),
        "{e}"
    );
    f.set_len(100 << 20).unwrap();
    VmConfig::load(Path::new(&file))
        .and_then(|c| c.validate(&file, HOST))
        .unwrap();
}

#[test]
fn counts_and_sizes_have_hard_bounds_whatever_the_host_says() {
    let big_host = HostLimits {
        max_vcpus: 100_000,
        available_mib: u64::MAX,
    };
    let e = err_with(&GOOD.replace("vcpus = 2", "vcpus = 255"), big_host);
    assert_one_line(&e, "machine.vcpus");
    let e = err_with(
        &GOOD.replace("memory_mib = 512", &format!("memory_mib = {}", u64::MAX)),
        big_host,
    );
    assert_one_line(&e, "machine.memory_mib");
    assert!(e.contains("the most a guest may have"), "{e}");
    // Twenty disks: one more than there are interrupt lines.
    let mut many = GOOD.replace("cmdline = \"console=ttyS0\"", "");
    for i in 0..MAX_BLOCKS - 1 {
        many.push_str(&format!("[[block]]\nid = \"d{i}\"\npath = \"disk.img\"\n"));
    }
    let e = err(&many);
    assert_one_line(&e, "block:");
    assert!(e.contains("20 disks; a guest has at most 19"), "{e}");
    let chain: Vec<String> = (0..=compat::MAX_CHAIN)
        .map(|i| format!("\"i{i}\""))
        .collect();
    let e = err(&GOOD.replace(
        "read_only = true",
        &format!("read_only = true\ninterceptors = [{}]", chain.join(", ")),
    ));
    assert_one_line(&e, "block[0].interceptors");
    // A huge id is refused, echoed clipped.
    let e = err(&GOOD.replace(
        "id = \"data\"",
        &format!("id = \"{}\"", "a".repeat(100_000)),
    ));
    assert_one_line(&e, "block[1].id");
    let e = err(&GOOD.replace(
        "id = \"data\"",
        &format!("id = \"{}\"", "é".repeat(100_000)),
    ));
    assert_one_line(&e, "block[1].id");
}

#[test]
fn landlock_paths_and_instance_files_resolve_against_the_config_and_must_exist() {
    let (d, file) = dir_with_files();
    std::fs::create_dir_all(d.0.join("plugins")).unwrap();
    std::fs::write(d.0.join("disk.key"), [1u8; 32]).unwrap();
    let text = format!(
        "{GOOD}\n[[interceptor]]\nid = \"enc\"\npath = \"plugins/enc.so\"\n\
         config = {{ key_file = \"disk.key\", note_file = \"/abs/n\", key = \"k\", size_file = 3 }}\n\
         [landlock]\nplugin_dirs = [\"plugins\"]\nread_paths = [\"disk.key\", \"{}\"]\n",
        d.0.display()
    );
    std::fs::write(&file, text).unwrap();
    let cfg = VmConfig::load(Path::new(&file)).unwrap();
    cfg.validate(&file, HOST).unwrap();
    assert_eq!(cfg.landlock.plugin_dirs, vec![d.0.join("plugins")]);
    assert_eq!(cfg.landlock.read_paths[0], d.0.join("disk.key"));
    // Only string values under `*_file` keys are files, relative ones taken from here.
    let files: Vec<&Path> = cfg.interceptor[0].files().collect();
    assert_eq!(
        files,
        vec![d.0.join("disk.key").as_path(), Path::new("/abs/n")]
    );
    assert_eq!(cfg.interceptor[0].config["key"].as_str(), Some("k"));
}

#[test]
fn each_bad_landlock_entry_is_refused_naming_it() {
    let with = |section: &str| err(&format!("{GOOD}\n[landlock]\n{section}\n"));
    let e = with("plugin_dirs = [\"missing\"]");
    assert_one_line(&e, "landlock.plugin_dirs[0]");
    assert!(e.contains("No such file"), "{e}");
    let e = with("plugin_dirs = [\"disk.img\"]");
    assert_one_line(&e, "landlock.plugin_dirs[0]");
    assert!(e.contains("is not a folder"), "{e}");
    let e = with("read_paths = [\"disk.img\", \"nope\"]");
    assert_one_line(&e, "landlock.read_paths[1]");
    let many = vec!["\"disk.img\""; MAX_LANDLOCK_PATHS + 1].join(", ");
    let e = with(&format!("read_paths = [{many}]"));
    assert_one_line(&e, "landlock.read_paths");
    assert!(e.contains("at most 64"), "{e}");
    let e = with("plugins = []");
    assert!(e.contains("plugins"), "{e}");
}

/// docs/plugins.md, "The config a plugin gets": the JSON `create` gets, exactly.
#[test]
fn an_instance_config_reaches_the_plugin_as_this_json() {
    let (d, file) = dir_with_files();
    std::fs::write(d.0.join("disk.key"), [1u8; 32]).unwrap();
    let text = format!(
        "{GOOD}\n[[interceptor]]\nid = \"full\"\npath = \"/p.so\"\n\
         [interceptor.config]\nkey_file = \"disk.key\"\nsize_mib = 64\nratio = 0.5\n\
         on = true\nnames = [\"a\", \"b\"]\nwhen = 1979-05-27T07:32:00Z\nnan = nan\n\
         [interceptor.config.nested]\nx = -1\n\
         [[interceptor]]\nid = \"bare\"\npath = \"/p.so\"\n"
    );
    std::fs::write(&file, text).unwrap();
    let cfg = VmConfig::load(Path::new(&file)).unwrap();
    let got: serde_json::Value = serde_json::from_str(&cfg.interceptor[0].config_json()).unwrap();
    assert_eq!(
        got,
        serde_json::json!({
            "key_file": d.0.join("disk.key").to_string_lossy(),
            "size_mib": 64,
            "ratio": 0.5,
            "on": true,
            "names": ["a", "b"],
            "when": "1979-05-27T07:32:00Z",
            "nan": null,
            "nested": { "x": -1 },
        })
    );
    assert_eq!(
        cfg.interceptor[1].config_json(),
        "{}",
        "no config: an empty object"
    );
}
