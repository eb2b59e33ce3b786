//! `[[interceptor]]` entries: a plugin loaded by path with its own config, the files that
//! config names (its `*_file` values), and the checks of the entries and the chains that
//! name them.

use super::*;

/// One interceptor instance: a plugin loaded by path, with its own config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterceptorConfig {
    pub id: String,
    /// The plugin's shared object.
    pub path: PathBuf,
    /// When set, the file's BLAKE3 (hex) must match before it is loaded.
    pub blake3: Option<String>,
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// Handed to the plugin's create() as a JSON object.
    #[serde(default)]
    pub config: toml::Table,
}

fn default_enabled() -> bool {
    true
}

impl InterceptorConfig {
    /// The JSON object `create` gets (docs/plugins.md, "The config a plugin gets"): the
    /// `config` table as written, TOML's types as JSON's (a date or time as its TOML text),
    /// `*_file` values already made absolute; `{}` when the entry has no `config`.
    pub fn config_json(&self) -> String {
        toml_to_json(&toml::Value::Table(self.config.clone())).to_string()
    }

    /// The files its plugin reads: the string values of its config's keys that end in
    /// [`compat::FILE_KEY_SUFFIX`] (`key_file`).
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.config.iter().filter_map(|(k, v)| match v {
            toml::Value::String(s) if k.ends_with(compat::FILE_KEY_SUFFIX) => {
                Some(Path::new(s.as_str()))
            }
            _ => None,
        })
    }

    /// Takes its files relative to `base`, the config's folder, as every other path.
    pub fn resolve_files(&mut self, base: &Path) {
        for (k, v) in self.config.iter_mut() {
            if let toml::Value::String(s) = v {
                if k.ends_with(compat::FILE_KEY_SUFFIX) && Path::new(s.as_str()).is_relative() {
                    *s = base.join(&*s).to_string_lossy().into_owned();
                }
            }
        }
    }
}

fn toml_to_json(v: &toml::Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        toml::Value::String(s) => J::String(s.clone()),
        toml::Value::Integer(i) => J::from(*i),
        // TOML allows nan and inf, JSON has neither: null, which a plugin refuses by type.
        toml::Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
        toml::Value::Boolean(b) => J::Bool(*b),
        toml::Value::Datetime(d) => J::String(d.to_string()),
        toml::Value::Array(a) => J::Array(a.iter().map(toml_to_json).collect()),
        toml::Value::Table(t) => J::Object(
            t.iter()
                .map(|(k, v)| (k.clone(), toml_to_json(v)))
                .collect(),
        ),
    }
}

impl VmConfig {
    /// Instance ids are unique; each chain names known instances; an instance serves one
    /// disk (it sits over that disk's layers below); pins are BLAKE3 hex.
    pub(super) fn validate_interceptors(&self, file: &str) -> Result<(), ConfigError> {
        let invalid = |field: String, message: String| ConfigError::Invalid {
            file: file.to_string(),
            field,
            message,
        };
        if self.interceptor.len() > MAX_INTERCEPTORS {
            return Err(invalid(
                "interceptor".into(),
                format!(
                    "{} entries; at most {MAX_INTERCEPTORS} (a full chain on every disk)",
                    self.interceptor.len()
                ),
            ));
        }
        let mut ids = HashSet::new();
        for (i, ic) in self.interceptor.iter().enumerate() {
            if !valid_id(&ic.id) {
                return Err(invalid(format!("interceptor[{i}].id"), bad_id(&ic.id)));
            }
            if !ids.insert(ic.id.as_str()) {
                return Err(invalid(
                    format!("interceptor[{i}].id"),
                    format!("{} is used twice", quoted(&ic.id)),
                ));
            }
            if let Some(pin) = &ic.blake3 {
                if pin.len() != 64 || !pin.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(invalid(
                        format!("interceptor[{i}].blake3"),
                        "must be 64 hex digits".into(),
                    ));
                }
            }
        }
        let mut used: std::collections::HashMap<&str, &str> = Default::default();
        let chains = self
            .block
            .iter()
            .enumerate()
            .map(|(i, b)| ("block", i, &b.id, &b.interceptors))
            .chain(
                self.net
                    .iter()
                    .enumerate()
                    .map(|(i, n)| ("net", i, &n.id, &n.interceptors)),
            );
        for (kind, i, device, chain) in chains {
            for (j, id) in chain.iter().enumerate() {
                let field = format!("{kind}[{i}].interceptors[{j}]");
                if !ids.contains(id.as_str()) {
                    return Err(invalid(
                        field,
                        format!("no [[interceptor]] has id {}", quoted(id)),
                    ));
                }
                if let Some(other) = used.insert(id, device) {
                    return Err(invalid(
                        field,
                        format!(
                            "{} already serves device {}; an instance serves one device (add another [[interceptor]] with the same path)",
                            quoted(id),
                            quoted(other)
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}
