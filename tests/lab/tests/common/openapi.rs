//! Checks live API answers against `docs/api.yaml`: the documented paths and methods, and
//! JSON bodies against their schemas (type, nullable, enum, required, properties,
//! additionalProperties: false, items, $ref).

use serde_json::Value;

pub struct Spec(pub Value);

impl Spec {
    pub fn load() -> Spec {
        let text = std::fs::read_to_string(super::repo().join("docs/api.yaml")).unwrap();
        let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
        Spec(serde_json::to_value(yaml).unwrap())
    }

    /// Every (path, METHOD) the document describes.
    pub fn operations(&self) -> Vec<(String, String)> {
        let mut ops = Vec::new();
        for (path, item) in self.0["paths"].as_object().unwrap() {
            for method in ["get", "put", "patch", "delete", "post"] {
                if item.get(method).is_some() {
                    ops.push((path.clone(), method.to_uppercase()));
                }
            }
        }
        ops
    }

    fn resolve<'a>(&'a self, schema: &'a Value) -> &'a Value {
        match schema.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let name = r.trim_start_matches("#/components/schemas/");
                &self.0["components"]["schemas"][name]
            }
            None => schema,
        }
    }

    /// The documented schema of `method path`'s answer with `status`, if JSON.
    pub fn response_schema(&self, path: &str, method: &str, status: u16) -> Option<&Value> {
        let op = &self.0["paths"][path][method.to_lowercase()];
        let mut r = &op["responses"][status.to_string()];
        if let Some(name) = r.get("$ref").and_then(Value::as_str) {
            r = &self.0["components"]["responses"]
                [name.trim_start_matches("#/components/responses/")];
        }
        if r.is_null() {
            panic!("{method} {path}: status {status} is not documented");
        }
        r.get("content")?
            .get("application/json")
            .map(|c| &c["schema"])
    }

    /// Errors in `value` against `schema`, each with its JSON path.
    pub fn check(&self, schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
        let schema = self.resolve(schema);
        if value.is_null() {
            if schema["nullable"] != Value::Bool(true) {
                errors.push(format!("{at}: null where {} is expected", schema["type"]));
            }
            return;
        }
        let ok = match schema["type"].as_str() {
            Some("object") => value.is_object(),
            Some("array") => value.is_array(),
            Some("string") => value.is_string(),
            Some("integer") => value.is_u64() || value.is_i64(),
            Some("number") => value.is_number(),
            Some("boolean") => value.is_boolean(),
            _ => true,
        };
        if !ok {
            errors.push(format!("{at}: {value} is not {}", schema["type"]));
            return;
        }
        if let Some(allowed) = schema["enum"].as_array() {
            if !allowed.contains(value) {
                errors.push(format!("{at}: {value} is not one of {allowed:?}"));
            }
        }
        if let Some(obj) = value.as_object() {
            let props = schema["properties"].as_object();
            for r in schema["required"].as_array().into_iter().flatten() {
                let name = r.as_str().unwrap_or_default();
                if !obj.contains_key(name) {
                    errors.push(format!("{at}: missing {name}"));
                }
            }
            for (k, v) in obj {
                match props.and_then(|p| p.get(k)) {
                    Some(s) => self.check(s, v, &format!("{at}.{k}"), errors),
                    None if schema["additionalProperties"] == Value::Bool(false) => {
                        errors.push(format!("{at}: undocumented property {k}"))
                    }
                    None => {}
                }
            }
        }
        if let Some(items) = value.as_array() {
            for (i, v) in items.iter().enumerate() {
                self.check(&schema["items"], v, &format!("{at}[{i}]"), errors);
            }
        }
    }

    /// Panics unless `body` is what the document says `method path` answers with `status`.
    pub fn assert_answer(&self, path: &str, method: &str, status: u16, body: &str) {
        let Some(schema) = self.response_schema(path, method, status) else {
            return;
        };
        let value: Value = serde_json::from_str(body)
            .unwrap_or_else(|e| panic!("{method} {path} {status}: not JSON ({e}): {body}"));
        let mut errors = Vec::new();
        self.check(schema, &value, "$", &mut errors);
        assert!(
            errors.is_empty(),
            "{method} {path} {status}: {errors:#?}\n{body}"
        );
    }
}
