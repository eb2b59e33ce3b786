//! The loader runs exactly the bytes it hashed: C plugins built here whose constructor
//! appends their name to a marker file show which code ran.

use super::*;
use std::process::Command;

/// A scratch directory for one test.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("compat-loader-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Builds a plugin named `name` whose constructor appends `name` to `marker`.
fn build(dir: &Path, name: &str, marker: &Path, extra: &[&str]) -> PathBuf {
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("../interceptors/include");
    build_with(dir, name, marker, extra, &include)
}

/// As `build`, against the header in `include`.
fn build_with(dir: &Path, name: &str, marker: &Path, extra: &[&str], include: &Path) -> PathBuf {
    let src = dir.join("plugin.c");
    std::fs::write(
        &src,
        r#"#include <stdio.h>
#include <vmm_interceptor.h>
__attribute__((constructor)) static void mark(void)
{
    FILE *f = fopen(MARKER, "a");
    if (f != NULL) {
        fputs(NAME "\n", f);
        fclose(f);
    }
}
static void *create(const struct vmm_create_args *a, char *e, size_t n)
{
    (void)a; (void)e; (void)n;
    return (void *)1;
}
static uint32_t pre(void *i, const struct vmm_request *r, void **s)
{
    (void)i; (void)r; (void)s;
    return VMM_CONTINUE;
}
static uint32_t post(void *i, const struct vmm_request *r, void *s, uint32_t st)
{
    (void)i; (void)r; (void)s;
    return st;
}
static void destroy(void *i) { (void)i; }
static const struct vmm_interceptor_table t = {
    .abi_version = VMM_INTERCEPTOR_ABI_VERSION,
    .supported_devices = 1u << VMM_DEVICE_BLOCK,
    .name = NAME,
    .create = create,
    .pre = pre,
    .post = post,
    .destroy = destroy,
};
const struct vmm_interceptor_table *vmm_interceptor_entry(void) { return &t; }
"#,
    )
    .unwrap();
    let out = dir.join(format!("lib{name}.so"));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(cc)
        .args(["-shared", "-fPIC", "-O1", "-I"])
        .arg(include)
        .arg(format!("-DNAME=\"{name}\""))
        .arg(format!("-DMARKER=\"{}\"", marker.display()))
        .args(extra)
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .status()
        .expect("running the C compiler");
    assert!(status.success(), "cc failed for {name}");
    out
}

fn hash(path: &Path) -> String {
    blake3::hash(&std::fs::read(path).unwrap())
        .to_hex()
        .to_string()
}

fn ran(marker: &Path) -> Vec<String> {
    std::fs::read_to_string(marker)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

/// Puts `from`'s bytes at `to` by renaming a copy over it (a new file at the same path).
fn swap(from: &Path, to: &Path) {
    let tmp = to.with_extension("tmp");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

/// The same path with new content loads the new code and reports its hash, while the old
/// library is still in use; the old content, at any path, is the library already loaded.
#[test]
fn a_changed_file_at_the_same_path_runs_its_new_code_and_reports_its_hash() {
    let dir = scratch("changed");
    let marker = dir.join("ran");
    let v1 = build(&dir, "v1", &marker, &[]);
    let v2 = build(&dir, "v2", &marker, &[]);
    let (h1, h2) = (hash(&v1), hash(&v2));
    let path = dir.join("plugin.so");
    swap(&v1, &path);
    let registry = PluginRegistry::new();
    let a = registry.load(&path, Some(&h1)).unwrap();
    assert_eq!((a.name(), a.blake3()), ("v1", h1.as_str()));
    swap(&v2, &path);
    let b = registry.load(&path, Some(&h2)).unwrap();
    assert_eq!(
        (b.name(), b.blake3()),
        ("v2", h2.as_str()),
        "the new file's code, not the library loaded from this path before"
    );
    assert!(!Arc::ptr_eq(&a, &b));
    let e = registry.load(&path, Some(&h1)).unwrap_err().to_string();
    assert!(e.contains(&format!("BLAKE3 is {h2}")), "{e}");
    // The same bytes again, by this path or another, are the library already loaded.
    assert!(Arc::ptr_eq(&b, &registry.load(&path, None).unwrap()));
    let elsewhere = dir.join("copy-of-v1.so");
    std::fs::copy(&v1, &elsewhere).unwrap();
    assert!(Arc::ptr_eq(
        &a,
        &registry.load(&elsewhere, Some(&h1)).unwrap()
    ));
    assert_eq!(ran(&marker), ["v1", "v2"], "each library's code ran once");
    drop((a, b));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The file is read once: a file swapped in after its bytes were read and hashed is never
/// loaded, and its constructor never runs.
#[test]
fn a_file_swapped_after_hashing_never_runs() {
    let dir = scratch("swapped");
    let marker = dir.join("ran");
    let good = build(&dir, "good", &marker, &[]);
    let evil = build(&dir, "evil", &marker, &[]);
    let path = dir.join("plugin.so");
    swap(&good, &path);
    let (swap_from, swap_to) = (evil.clone(), path.clone());
    crate::loader::AFTER_READ
        .lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .insert(path.clone(), Box::new(move || swap(&swap_from, &swap_to)));
    let p = PluginRegistry::new()
        .load(&path, Some(&hash(&good)))
        .unwrap();
    assert_eq!(hash(&path), hash(&evil), "the hook swapped the file");
    assert_eq!((p.name(), p.blake3()), ("good", hash(&good).as_str()));
    assert_eq!(
        ran(&marker),
        ["good"],
        "the swapped-in file's code never ran"
    );
    drop(p);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A pin that does not match refuses the file before any of its code runs.
#[test]
fn a_mismatched_pin_runs_none_of_the_plugins_code() {
    let dir = scratch("pin");
    let marker = dir.join("ran");
    let path = build(&dir, "pinned", &marker, &[]);
    let e = PluginRegistry::new()
        .load(&path, Some(&"0".repeat(64)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("but the config pins"), "{e}");
    assert!(!marker.exists(), "the constructor ran: {:?}", ran(&marker));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A library that cannot be unloaded (`-z nodelete`) stays mapped under the descriptor
/// name it was loaded by after its descriptor is closed; a later load that gets the same
/// descriptor number still runs its own code.
#[test]
fn a_library_left_loaded_never_answers_for_new_bytes() {
    let dir = scratch("nodelete");
    let marker = dir.join("ran");
    let sticky = build(&dir, "sticky", &marker, &["-Wl,-z,nodelete"]);
    let fresh = build(&dir, "fresh", &marker, &[]);
    let registry = PluginRegistry::new();
    for _ in 0..3 {
        let p = registry.load(&sticky, None).unwrap();
        assert_eq!(p.name(), "sticky");
        drop(p);
        let p = registry.load(&fresh, None).unwrap();
        assert_eq!((p.name(), p.blake3()), ("fresh", hash(&fresh).as_str()));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Bigger than any plugin may be: refused before it is copied.
#[test]
fn a_file_over_the_size_bound_is_refused() {
    let dir = scratch("big");
    let path = dir.join("huge.so");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(MAX_PLUGIN_BYTES + 1)
        .unwrap();
    let e = PluginRegistry::new()
        .load(&path, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("larger than 256 MiB"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The copy the dynamic loader maps cannot change once sealed: no write through its
/// descriptor or a new one, no truncation or growth, no shared writable mapping.
#[test]
fn the_sealed_copy_refuses_every_change() {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let dir = scratch("sealed");
    let marker = dir.join("ran");
    let path = build(&dir, "sealed", &marker, &[]);
    let Ok((fd, found)) = crate::loader::sealed_copy(&path) else {
        panic!("no sealed copy of {}", path.display());
    };
    assert_eq!(found, hash(&path));
    let raw = fd.as_raw_fd();
    // SAFETY: fcntl and ftruncate on a descriptor this test owns.
    let seals = unsafe { libc::fcntl(raw, libc::F_GET_SEALS) };
    assert_eq!(
        seals
            & (libc::F_SEAL_FUTURE_WRITE
                | libc::F_SEAL_SHRINK
                | libc::F_SEAL_GROW
                | libc::F_SEAL_SEAL),
        libc::F_SEAL_FUTURE_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL
    );
    assert_ne!(unsafe { libc::ftruncate(raw, 0) }, 0);
    assert_ne!(unsafe { libc::ftruncate(raw, 1 << 30) }, 0);
    let mut same = std::fs::File::from(fd.try_clone().unwrap());
    assert!(same.write_all(b"evil").is_err());
    if let Ok(mut other) = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/self/fd/{raw}"))
    {
        assert!(other.write_all(b"evil").is_err());
    }
    // SAFETY: a fresh mapping request that must be refused; unmapped if it was not.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            raw,
            0,
        )
    };
    if map != libc::MAP_FAILED {
        unsafe { libc::munmap(map, 4096) };
        panic!("a shared writable mapping of the sealed copy was allowed");
    }
    assert_eq!(
        std::fs::read(format!("/proc/self/fd/{raw}")).unwrap(),
        std::fs::read(&path).unwrap()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A plugin built against the first header (version 1, kept in `interceptors/include/v1`)
/// loads under this VMM and serves requests as it always did.
#[test]
fn a_plugin_built_against_the_version_1_header_loads_and_runs() {
    let dir = scratch("v1");
    let marker = dir.join("ran");
    let v1 = Path::new(env!("CARGO_MANIFEST_DIR")).join("../interceptors/include/v1");
    let text = std::fs::read_to_string(v1.join("vmm_interceptor.h")).unwrap();
    assert!(text.contains("#define VMM_INTERCEPTOR_ABI_VERSION 1u"));
    let so = build_with(&dir, "old", &marker, &[], &v1);
    let plugin = PluginRegistry::new().load(&so, None).unwrap();
    assert_eq!(plugin.abi_version(), 1);
    use crate::tests::MemDisk;
    use crate::{BlockRequestKind, BlockStack, InstanceSpec, RequestStatus, Segment};
    let disk = MemDisk::new(1 << 20);
    let spec = InstanceSpec {
        id: "old".into(),
        plugin,
        config_json: "{}".into(),
        enabled: true,
    };
    let stack = BlockStack::build("d", disk.clone(), &[spec]).unwrap();
    let mut buf = vec![0x42u8; 4096];
    let seg = [Segment {
        base: buf.as_mut_ptr(),
        len: buf.len(),
    }];
    // SAFETY: `buf` outlives the call.
    let status = unsafe { stack.submit(BlockRequestKind::Write, 8192, &seg) };
    assert_eq!(status, RequestStatus::Ok);
    assert_eq!(disk.data.lock().unwrap()[8192..12288], [0x42u8; 4096]);
    assert_eq!(ran(&marker), ["old"]);
}
