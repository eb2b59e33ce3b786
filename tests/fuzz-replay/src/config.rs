//! guest.toml: parsing and validation of any text, as given (`VmConfig::parse`) and as a
//! file beside a kernel, an initrd and disk images (`VmConfig::load`, which resolves its
//! relative paths there, so a config naming them gets past the file checks to the rest).
//!
//! What must hold: nothing panics; an error is one line that starts with the file's name;
//! an interceptor's config of a config that validates converts to the JSON its plugin gets.

use crate::disk::scratch_dir;
use crate::input::Input;
use std::path::PathBuf;
use std::sync::OnceLock;
use vmm::config::{ConfigError, HostLimits, VmConfig};

/// The first byte picks the host; the rest is the config's text.
fn host(b: u8) -> HostLimits {
    let (max_vcpus, available_mib) = match b % 8 {
        1 => (1, 64),
        2 => (255, u64::MAX),
        3 => (u32::MAX, 0),
        4 => (0, 1 << 20),
        _ => (8, 4096),
    };
    HostLimits {
        max_vcpus,
        available_mib,
    }
}

/// A directory with what configs name: `bzImage` (a boot-protocol header, version 2.15,
/// 2048-byte command line), `vmlinux` (a 64-bit ELF header), `initrd`, `data.img`,
/// `root.img`, and `plugin.so` (not a real plugin: validation never loads one).
fn fixtures() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = scratch_dir().join("config");
        std::fs::create_dir_all(&dir).expect("fixture directory");
        let mut bz = vec![0u8; 0x400];
        bz[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        bz[0x238..0x23c].copy_from_slice(&2048u32.to_le_bytes());
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        for (name, bytes) in [
            ("bzImage", bz),
            ("vmlinux", elf),
            ("initrd", vec![7u8; 4096]),
            ("data.img", vec![0u8; 1 << 16]),
            ("root.img", vec![0u8; 1 << 16]),
            ("plugin.so", vec![0u8; 64]),
        ] {
            std::fs::write(dir.join(name), bytes).expect("fixture");
        }
        dir
    })
}

fn check(result: &Result<VmConfig, ConfigError>, file: &str) {
    let Err(e) = result else { return };
    let msg = e.to_string();
    assert!(
        msg.starts_with(&format!("{file}: ")),
        "an error that does not name {file}: {msg:?}"
    );
    assert!(
        !msg.contains('\n'),
        "an error of more than one line: {msg:?}"
    );
    // Bounded: what the config says is echoed clipped, never whole.
    assert!(
        msg.chars().count() <= file.chars().count() + 1024,
        "an error of {} characters",
        msg.chars().count()
    );
}

fn validated(
    result: Result<VmConfig, ConfigError>,
    file: &str,
    host: HostLimits,
) -> Result<VmConfig, ConfigError> {
    let cfg = result?;
    cfg.validate(file, host)?;
    Ok(cfg)
}

pub fn config(data: &[u8]) {
    let mut inp = Input::new(data);
    let host = host(inp.u8());
    let text = String::from_utf8_lossy(inp.rest()).into_owned();

    let given = validated(VmConfig::parse(&text, "guest.toml"), "guest.toml", host);
    check(&given, "guest.toml");

    // One file per thread: the replay test may run this beside itself.
    let path = fixtures().join(format!("guest-{:?}.toml", std::thread::current().id()));
    std::fs::write(&path, &text).expect("config file");
    let file = path.display().to_string();
    let loaded = validated(VmConfig::load(&path), &file, host);
    check(&loaded, &file);
    if let Ok(cfg) = &loaded {
        for ic in &cfg.interceptor {
            // What vmm hands the plugin's create (storage.rs).
            let json = serde_json::to_string(&ic.config);
            if let Ok(json) = json {
                let v: serde_json::Value =
                    serde_json::from_str(&json).expect("the JSON reads back");
                assert!(
                    v.is_object(),
                    "an instance config that is not an object: {json}"
                );
            }
        }
    }
}
