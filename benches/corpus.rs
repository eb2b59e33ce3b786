//! The data the compression and dedup benchmarks run on, the same for the plugin and its
//! peer: a file named on the command line, or else the first 64 MiB of a tar of this host's
//! programs, libraries and documentation (written once to build/bench-corpus.tar): real
//! binaries and text, as a guest's disk holds, and no archives that are compressed already.

use std::path::{Path, PathBuf};
use std::process::Command;

const CORPUS_BYTES: usize = 64 << 20;

/// The corpus' path and bytes.
pub fn corpus(arg: Option<&str>) -> Result<(PathBuf, Vec<u8>), String> {
    let path = match arg {
        Some(p) => PathBuf::from(p),
        None => {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
            let path = root.join("build/bench-corpus.tar");
            if !path.exists() {
                std::fs::create_dir_all(root.join("build")).map_err(|e| e.to_string())?;
                std::fs::write(&path, tar_of_usr()?).map_err(|e| e.to_string())?;
            }
            path
        }
    };
    let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((path, bytes))
}

/// The first [`CORPUS_BYTES`] of a tar of the directories of /usr that hold programs,
/// libraries and text.
fn tar_of_usr() -> Result<Vec<u8>, String> {
    use std::io::Read;
    let dirs: Vec<&str> = [
        "usr/bin",
        "usr/sbin",
        "usr/lib/x86_64-linux-gnu",
        "usr/include",
        "usr/share/doc",
        "usr/share/man",
        "usr/share/perl",
        "usr/lib/python3",
    ]
    .into_iter()
    .filter(|d| Path::new("/").join(d).is_dir())
    .collect();
    let mut child = Command::new("tar")
        .args(["cf", "-", "-C", "/"])
        .args(&dirs)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("tar: {e}"))?;
    let mut out = Vec::with_capacity(CORPUS_BYTES);
    if let Some(stdout) = child.stdout.take() {
        stdout
            .take(CORPUS_BYTES as u64)
            .read_to_end(&mut out)
            .map_err(|e| format!("tar: {e}"))?;
    }
    let _ = child.kill();
    let _ = child.wait();
    if out.len() < CORPUS_BYTES {
        return Err(format!("a tar of {dirs:?} gave only {} bytes", out.len()));
    }
    Ok(out)
}

/// The median of `v` (not empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
