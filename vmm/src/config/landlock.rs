//! The `[landlock]` section: what the vmm may open once the guest runs, beyond the files
//! the rest of the config names (docs/security.md, "Landlock").

use super::*;

/// The most paths in each of the section's lists.
pub const MAX_LANDLOCK_PATHS: usize = 64;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LandlockConfig {
    /// Folders whose plugins `PUT /interceptors/{id}` may load at run time; none: the API
    /// loads no plugin.
    #[serde(default)]
    pub plugin_dirs: Vec<PathBuf>,
    /// Files and folders plugins may read once the guest runs, besides the `*_file` values
    /// of the `[[interceptor]]` entries: the key files of instances loaded over the API.
    #[serde(default)]
    pub read_paths: Vec<PathBuf>,
}

impl LandlockConfig {
    pub(super) fn resolve_paths(&mut self, base: &Path) {
        for p in self.plugin_dirs.iter_mut().chain(&mut self.read_paths) {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    /// Bounded lists of paths that exist; `plugin_dirs` are folders.
    pub(super) fn validate(&self) -> Result<(), (String, String)> {
        for (name, list) in [
            ("plugin_dirs", &self.plugin_dirs),
            ("read_paths", &self.read_paths),
        ] {
            if list.len() > MAX_LANDLOCK_PATHS {
                return Err((
                    format!("landlock.{name}"),
                    format!("{} paths; at most {MAX_LANDLOCK_PATHS}", list.len()),
                ));
            }
            for (i, p) in list.iter().enumerate() {
                let field = format!("landlock.{name}[{i}]");
                match std::fs::metadata(p) {
                    Ok(m) if name == "plugin_dirs" && !m.is_dir() => {
                        return Err((field, format!("{} is not a folder", shown(p))))
                    }
                    Ok(_) => {}
                    Err(e) => return Err((field, format!("{}: {e}", shown(p)))),
                }
            }
        }
        Ok(())
    }
}
