//! Builds the example and test interceptor plugins for the tests: the Rust ones with cargo
//! (into their own target directory, so this works while an outer cargo holds the main
//! one's lock), the C one with the system C compiler from the header alone.

use crate::paths::repo_root;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

#[derive(Clone, Debug)]
pub struct Plugins {
    pub counter: PathBuf,
    pub remap: PathBuf,
    pub encrypt: PathBuf,
    pub cache: PathBuf,
    pub compress: PathBuf,
    pub dedup: PathBuf,
    pub faulty: PathBuf,
    pub xor: PathBuf,
    pub net_filter: PathBuf,
    pub net_encrypt: PathBuf,
    pub throttle: PathBuf,
}

/// Where test builds of plugins go.
pub fn plugin_dir() -> PathBuf {
    repo_root().join("target/plugins")
}

/// Compiles a C plugin source with `cc -shared` against `interceptors/include`, into a file
/// of this process's own, then renamed over `out_name`: test binaries run side by side, each
/// building the plugins, and one must never load the library another is still writing
/// ("file too short").
pub fn build_c(source: &std::path::Path, out_name: &str) -> Result<PathBuf> {
    build_c_with(source, out_name, &repo_root().join("interceptors/include"))
}

/// As [`build_c`], against the header in `include` (e.g. `interceptors/include/v1`, the
/// first ABI's, as third parties built their plugins).
pub fn build_c_with(
    source: &std::path::Path,
    out_name: &str,
    include: &std::path::Path,
) -> Result<PathBuf> {
    let out = plugin_dir().join(out_name);
    let partial = plugin_dir().join(format!(".{out_name}.{}.tmp", std::process::id()));
    std::fs::create_dir_all(plugin_dir())?;
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args([
            "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-I",
        ])
        .arg(include)
        .arg(source)
        .arg("-o")
        .arg(&partial)
        .status()
        .with_context(|| format!("running the C compiler {cc}"))?;
    if !status.success() {
        let _ = std::fs::remove_file(&partial);
        bail!("{cc} failed on {}", source.display());
    }
    std::fs::rename(&partial, &out)
        .with_context(|| format!("renaming {} to {}", partial.display(), out.display()))?;
    Ok(out)
}

fn build() -> Result<Plugins> {
    let target = plugin_dir().join("cargo");
    let lib = |name: &str| target.join("debug").join(format!("lib{name}.so"));
    let found = Plugins {
        counter: lib("interceptor_counter"),
        remap: lib("interceptor_remap"),
        encrypt: lib("interceptor_encrypt"),
        cache: lib("interceptor_cache"),
        compress: lib("interceptor_compress"),
        dedup: lib("interceptor_dedup"),
        faulty: lib("interceptor_faulty"),
        xor: plugin_dir().join("libxor.so"),
        net_filter: lib("interceptor_net_filter"),
        net_encrypt: lib("interceptor_net_encrypt"),
        throttle: lib("interceptor_throttle"),
    };
    // The lab VM has no toolchain: a command that needs plugins in there builds them
    // before it enters (as every test does), and finds them here.
    if std::env::var_os(crate::labvm::INSIDE_ENV).is_some() {
        if let Some(missing) = found.all().into_iter().find(|p| !p.exists()) {
            bail!(
                "{} is not built (the lab VM has no cargo; build the plugins before entering it)",
                missing.display()
            );
        }
        return Ok(found);
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .current_dir(repo_root())
        .args(["build", "--quiet"])
        .args([
            "-p",
            "interceptor-counter",
            "-p",
            "interceptor-remap",
            "-p",
            "interceptor-encrypt",
            "-p",
            "interceptor-cache",
            "-p",
            "interceptor-compress",
            "-p",
            "interceptor-dedup",
            "-p",
            "interceptor-faulty",
            "-p",
            "interceptor-net-filter",
            "-p",
            "interceptor-net-encrypt",
            "-p",
            "interceptor-throttle",
        ])
        .arg("--target-dir")
        .arg(&target)
        .status()
        .with_context(|| format!("running {cargo}"))?;
    if !status.success() {
        bail!("building the Rust plugins failed");
    }
    build_c(&repo_root().join("interceptors/xor/xor.c"), "libxor.so")?;
    Ok(found)
}

impl Plugins {
    fn all(&self) -> Vec<&PathBuf> {
        vec![
            &self.counter,
            &self.remap,
            &self.encrypt,
            &self.cache,
            &self.compress,
            &self.dedup,
            &self.faulty,
            &self.xor,
            &self.net_filter,
            &self.net_encrypt,
            &self.throttle,
        ]
    }
}

/// The plugins, built once per process.
pub fn plugins() -> Result<Plugins> {
    static BUILT: OnceLock<Result<Plugins, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}
