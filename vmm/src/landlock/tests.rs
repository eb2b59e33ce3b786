use super::*;
use std::io::ErrorKind;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmm-landlock-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A config (parsed, not validated: no kernel needed) whose instance names `key` as its
/// key file, with `read` in `read_paths` and `plugins` in `plugin_dirs`.
fn config(key: &Path, read: &Path, plugins: &Path) -> VmConfig {
    let text = format!(
        "[kernel]\npath = \"/nonexistent\"\ncmdline = \"\"\n\
         [[interceptor]]\nid = \"enc\"\npath = \"/nonexistent.so\"\n\
         config = {{ key_file = {key:?}, size_mib = 4 }}\n\
         [landlock]\nplugin_dirs = [{plugins:?}]\nread_paths = [{read:?}]\n"
    );
    VmConfig::parse(&text, "test.toml").unwrap()
}

/// The kernel here must have Landlock for the tests that enforce it; without it they say
/// SKIPPED, and fail under CI (the project's machines have it).
fn landlock_here() -> bool {
    if kernel_abi() > 0 {
        return true;
    }
    println!("SKIPPED: this kernel has no Landlock");
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "SKIPPED is a failure under CI=true"
    );
    false
}

/// Runs `f` on a new thread restricted as `kind`.
fn on_thread<T: Send + 'static>(
    rules: &'static Rulesets,
    kind: ThreadKind,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    std::thread::spawn(move || {
        rules.apply(kind).unwrap();
        f()
    })
    .join()
    .unwrap()
}

fn read(path: &Path) -> std::io::Result<Vec<u8>> {
    std::fs::read(path)
}

#[test]
fn each_kind_is_granted_only_what_it_needs() {
    let (keys, read_dir, plugins) = (dir("g-keys"), dir("g-read"), dir("g-plugins"));
    let key = keys.join("disk.key");
    std::fs::write(&key, [7u8; 32]).unwrap();
    let cfg = config(&key, &read_dir, &plugins);
    let paths = |kind, socket| -> Vec<PathBuf> {
        grants(kind, &cfg, socket)
            .into_iter()
            .map(|(p, _)| p)
            .collect()
    };
    assert!(paths(ThreadKind::Vcpu, None).is_empty());
    assert!(paths(ThreadKind::Stdin, None).is_empty());
    let device = paths(ThreadKind::Device, None);
    assert!(device.contains(&key), "{device:?}");
    assert!(device.contains(&read_dir), "{device:?}");
    assert!(!device.contains(&plugins), "{device:?}");
    let api = paths(ThreadKind::Api, None);
    assert!(api.contains(&plugins), "{api:?}");
    assert!(!api.contains(&key), "{api:?}");
    let socket = keys.join("api.sock");
    let main = grants(ThreadKind::Main, &cfg, Some(&socket));
    assert_eq!(
        main,
        vec![(keys.clone(), make_bitflags!(AccessFs::{RemoveFile}))]
    );
    // The key file, a file: read only; a folder: read and list.
    let (_, key_access) = grants(ThreadKind::Device, &cfg, None)
        .into_iter()
        .find(|(p, _)| *p == key)
        .unwrap();
    assert_eq!(key_access, make_bitflags!(AccessFs::{ReadFile}));
}

#[test]
fn an_older_kernel_is_told_what_is_not_confined() {
    assert!(shortfall(0).unwrap().contains("no Landlock"));
    let two = shortfall(2).unwrap();
    assert!(two.contains("ABI 2") && two.contains("truncating (ABI 3), device ioctls (ABI 5)"));
    assert!(!two.contains("linking"), "{two}");
    assert!(shortfall(1).unwrap().contains("linking and renaming"));
    assert_eq!(shortfall(5), None);
    assert_eq!(shortfall(7), None);
}

#[test]
fn a_device_thread_reads_its_key_file_and_nothing_else() {
    if !landlock_here() {
        return;
    }
    let (keys, read_dir, plugins) = (dir("d-keys"), dir("d-read"), dir("d-plugins"));
    let key = keys.join("disk.key");
    std::fs::write(&key, [7u8; 32]).unwrap();
    std::fs::write(keys.join("other.key"), [8u8; 32]).unwrap();
    std::fs::write(read_dir.join("extra"), b"extra").unwrap();
    let cfg = config(&key, &read_dir, &plugins);
    let rules: &'static Rulesets = Box::leak(Box::new(
        Rulesets::build(LandlockMode::On, &cfg, None).unwrap(),
    ));
    let other = keys.join("other.key");
    let extra = read_dir.join("extra");
    let results = on_thread(rules, ThreadKind::Device, move || {
        [
            read(&key).map(|b| b.len()),
            read(&extra).map(|b| b.len()),
            read(Path::new("/proc/meminfo")).map(|b| b.len()),
            read(&other).map(|b| b.len()),
            read(Path::new("/etc/passwd")).map(|b| b.len()),
            std::fs::write(&extra, b"changed").map(|_| 0),
        ]
    });
    let kinds: Vec<Option<ErrorKind>> = results
        .iter()
        .map(|r| r.as_ref().err().map(|e| e.kind()))
        .collect();
    let denied = Some(ErrorKind::PermissionDenied);
    assert_eq!(
        kinds,
        vec![None, None, None, denied, denied, denied],
        "{results:?}"
    );
    // The thread that built the rules, and any other, is not confined.
    assert!(read(Path::new("/etc/passwd")).is_ok());
}

#[test]
fn a_vcpu_thread_opens_nothing_and_its_children_inherit_that() {
    if !landlock_here() {
        return;
    }
    let d = dir("v");
    let cfg = config(&d.join("none.key"), &d, &d);
    let rules: &'static Rulesets = Box::leak(Box::new(
        Rulesets::build(LandlockMode::On, &cfg, None).unwrap(),
    ));
    let (own, child) = on_thread(rules, ThreadKind::Vcpu, || {
        let own = read(Path::new("/proc/meminfo")).map(|_| ());
        let child = std::thread::spawn(|| read(Path::new("/proc/meminfo")).map(|_| ()))
            .join()
            .unwrap();
        (own, child)
    });
    assert_eq!(own.unwrap_err().kind(), ErrorKind::PermissionDenied);
    assert_eq!(child.unwrap_err().kind(), ErrorKind::PermissionDenied);
}

#[test]
fn off_confines_nothing_and_says_so() {
    let d = dir("off");
    let cfg = config(&d.join("none.key"), &d, &d);
    let rules: &'static Rulesets = Box::leak(Box::new(
        Rulesets::build(LandlockMode::Off, &cfg, None).unwrap(),
    ));
    assert!(rules.note().unwrap().contains("--landlock off"));
    let r = on_thread(rules, ThreadKind::Vcpu, || {
        read(Path::new("/etc/passwd")).map(|_| ())
    });
    assert!(r.is_ok(), "{r:?}");
}
