//! What `PUT /interceptors/{id}` may load at run time: plugins from the folders the vmm's
//! config declares (`[landlock] plugin_dirs`), with instance configs that name only files
//! the config lets plugins read. The vmm's Landlock rules enforce the same in the kernel
//! where it has Landlock; this check gives the clear answer, and holds where it has not.

use crate::ApiError;
use std::path::{Path, PathBuf};

/// The folders plugins may be loaded from and the paths their instances may read, each
/// compared after symbolic links are resolved.
#[derive(Clone, Debug, Default)]
pub struct LoadPolicy {
    plugin_dirs: Vec<PathBuf>,
    readable: Vec<PathBuf>,
}

impl LoadPolicy {
    /// `plugin_dirs`: where plugins may come from; `readable`: the files and folders an
    /// instance's `*_file` values may name. Paths that do not resolve are left out (they
    /// allow nothing).
    ///
    /// ```
    /// let policy = vmm_api::LoadPolicy::new(&["/usr/lib".into()], &[]);
    /// assert!(policy.check_plugin(std::path::Path::new("/etc/passwd")).is_err());
    /// ```
    pub fn new(plugin_dirs: &[PathBuf], readable: &[PathBuf]) -> LoadPolicy {
        let resolved =
            |paths: &[PathBuf]| paths.iter().filter_map(|p| p.canonicalize().ok()).collect();
        LoadPolicy {
            plugin_dirs: resolved(plugin_dirs),
            readable: resolved(readable),
        }
    }

    /// Refuses (403) a plugin outside every plugin folder. A path that does not resolve
    /// passes, for the loader to answer (404-like "not found" from the registry).
    pub fn check_plugin(&self, path: &Path) -> Result<(), ApiError> {
        let Ok(real) = path.canonicalize() else {
            return Ok(());
        };
        if self.plugin_dirs.iter().any(|d| real.starts_with(d)) {
            return Ok(());
        }
        Err(ApiError::Forbidden(if self.plugin_dirs.is_empty() {
            format!(
                "path `{}`: this vmm loads no plugins at run time (its config has no \
                 [landlock] plugin_dirs)",
                path.display()
            )
        } else {
            format!(
                "path `{}` is outside the folders this vmm may load plugins from at run time \
                 ([landlock] plugin_dirs: {})",
                path.display(),
                shown(&self.plugin_dirs)
            )
        }))
    }

    /// Refuses (403) an instance config whose `*_file` value ([`compat::FILE_KEY_SUFFIX`])
    /// is not an absolute path under what plugins may read.
    pub fn check_config(
        &self,
        config: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), ApiError> {
        for (key, value) in config {
            if !key.ends_with(compat::FILE_KEY_SUFFIX) {
                continue;
            }
            let Some(text) = value.as_str() else {
                continue;
            };
            let path = Path::new(text);
            if !path.is_absolute() {
                return Err(ApiError::BadRequest(format!(
                    "config.{key}: `{}` must be an absolute path",
                    text.escape_debug()
                )));
            }
            // A file that does not exist passes: the plugin says so, naming it.
            let Ok(real) = path.canonicalize() else {
                continue;
            };
            if !self.readable.iter().any(|r| real.starts_with(r)) {
                return Err(ApiError::Forbidden(format!(
                    "config.{key}: `{}` is not a file plugins may read here (the config's \
                     key files and [landlock] read_paths{}{})",
                    path.display(),
                    if self.readable.is_empty() { "" } else { ": " },
                    shown(&self.readable)
                )));
            }
        }
        Ok(())
    }
}

fn shown(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmm-api-policy-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_plugin_loads_only_from_a_declared_folder_whatever_the_spelling() {
        let (ok, other) = (dir("ok"), dir("other"));
        std::fs::write(ok.join("p.so"), b"x").unwrap();
        std::fs::write(other.join("p.so"), b"x").unwrap();
        std::os::unix::fs::symlink(other.join("p.so"), ok.join("link.so")).unwrap_or(());
        let policy = LoadPolicy::new(std::slice::from_ref(&ok), &[]);
        assert!(policy.check_plugin(&ok.join("p.so")).is_ok());
        // A symbolic link inside the folder to a file outside it, and `..` out of it.
        for outside in [
            ok.join("link.so"),
            ok.join("..").join(other.file_name().unwrap()).join("p.so"),
            other.join("p.so"),
        ] {
            let e = policy.check_plugin(&outside).unwrap_err();
            assert_eq!(e.status(), 403, "{outside:?}");
            assert!(e.to_string().contains("plugin_dirs: "), "{e}");
        }
        let none = LoadPolicy::default()
            .check_plugin(&ok.join("p.so"))
            .unwrap_err();
        assert!(
            none.to_string().contains("loads no plugins at run time"),
            "{none}"
        );
    }

    #[test]
    fn an_instance_names_only_files_the_config_lets_plugins_read() {
        let keys = dir("keys");
        std::fs::write(keys.join("k"), b"x").unwrap();
        let policy = LoadPolicy::new(&[], std::slice::from_ref(&keys));
        let config = |v: &str| {
            serde_json::json!({ "key_file": v, "note": "/etc/passwd" })
                .as_object()
                .unwrap()
                .clone()
        };
        assert!(policy
            .check_config(&config(keys.join("k").to_str().unwrap()))
            .is_ok());
        let e = policy.check_config(&config("/etc/passwd")).unwrap_err();
        assert_eq!(e.status(), 403);
        assert!(
            e.to_string().starts_with("config.key_file: `/etc/passwd`"),
            "{e}"
        );
        let e = policy.check_config(&config("k")).unwrap_err();
        assert_eq!(e.status(), 400, "{e}");
    }
}
