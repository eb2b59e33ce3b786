//! The resources. Each path has one handler that dispatches on the method itself, so a
//! wrong method gets a 405 with `Allow` and a JSON fault like every other error.

use crate::body;
use crate::views::{self, json_body};
use crate::{ApiError, ApiState};
use axum::body::Body;
use axum::extract::{rejection::PathRejection, Path, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use compat::InstanceSpec;
use serde::Deserialize;
use std::sync::Arc;

type Shared = State<Arc<ApiState>>;
type Answer = Result<Response, ApiError>;

pub(crate) fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/vm", any(vm))
        .route("/vm/kvm", any(vm_kvm))
        .route("/vm/vcpus", any(vm_vcpus))
        .route("/devices", any(devices))
        .route("/interceptors", any(interceptors))
        .route("/interceptors/{id}", any(interceptor))
        .route("/actions", any(actions))
        .route("/metrics", any(metrics))
        .fallback(not_found)
        .with_state(state)
}

fn only(method: &Method, path: &'static str, allow: &'static str) -> Result<(), ApiError> {
    if allow.split(", ").any(|m| m == method.as_str()) {
        Ok(())
    } else {
        Err(ApiError::MethodNotAllowed {
            method: method.to_string(),
            path,
            allow,
        })
    }
}

fn ok_json(v: &serde_json::Value) -> Response {
    json_body(v).into_response()
}

fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::NotFound(format!("no resource at {}; see docs/api.yaml", uri.path()))
}

async fn vm(State(s): Shared, method: Method) -> Answer {
    only(&method, "/vm", "GET")?;
    Ok(ok_json(&views::vm(&s)))
}

async fn vm_kvm(State(s): Shared, method: Method) -> Answer {
    only(&method, "/vm/kvm", "GET")?;
    Ok(ok_json(&s.vm.kvm_state().map_err(ApiError::Conflict)?))
}

/// Blocks a worker of the runtime for as long as the vCPUs take to answer (at most 2 s
/// each): a diagnostic, not a hot path.
async fn vm_vcpus(State(s): Shared, method: Method) -> Answer {
    only(&method, "/vm/vcpus", "GET")?;
    let state = tokio::task::spawn_blocking(move || s.vm.vcpu_state())
        .await
        .map_err(|e| ApiError::Conflict(format!("reading the vCPUs failed: {e}")))?;
    Ok(ok_json(&state.map_err(ApiError::Conflict)?))
}

async fn devices(State(s): Shared, method: Method) -> Answer {
    only(&method, "/devices", "GET")?;
    Ok(ok_json(&views::devices(&s)))
}

async fn interceptors(State(s): Shared, method: Method) -> Answer {
    only(&method, "/interceptors", "GET")?;
    Ok(ok_json(&views::interceptors(&s)))
}

async fn metrics(State(s): Shared, method: Method) -> Answer {
    only(&method, "/metrics", "GET")?;
    let text = crate::metrics::render(&s);
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        text,
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Action {
    action_type: String,
}

async fn actions(State(s): Shared, method: Method, body: Body) -> Answer {
    only(&method, "/actions", "PUT")?;
    let action: Action = body::json(body, s.body_timeout).await?;
    match action.action_type.as_str() {
        "Shutdown" => {
            s.vm.shutdown().map_err(ApiError::Conflict)?;
            Ok(no_content())
        }
        other => Err(ApiError::BadRequest(format!(
            "unknown action_type `{other}`; supported: Shutdown"
        ))),
    }
}

/// `PATCH /interceptors/{id}`: enable or disable it, give it a new config, or both.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Patch {
    enabled: Option<bool>,
    config: Option<serde_json::Map<String, serde_json::Value>>,
}

/// `PUT /interceptors/{id}`: a new instance in one device's chain.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Load {
    /// Absolute path of the plugin's shared object.
    path: std::path::PathBuf,
    device: String,
    /// 0 = top of the chain (next to the guest); the chain's length = bottom.
    #[serde(default)]
    position: usize,
    #[serde(default)]
    config: serde_json::Map<String, serde_json::Value>,
    #[serde(default = "yes")]
    enabled: bool,
    blake3: Option<String>,
    /// The layers below hold nothing the guest needs (required for a plugin that owns its
    /// format).
    #[serde(default)]
    fresh: bool,
}

fn yes() -> bool {
    true
}

/// Ids as the config allows them: 1 to 64 of `[A-Za-z0-9_.-]`.
fn check_id(id: &str) -> Result<(), ApiError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "interceptor id `{}` must be 1 to 64 of A-Z a-z 0-9 _ . -",
            id.escape_debug()
        )))
    }
}

async fn interceptor(
    State(s): Shared,
    method: Method,
    id: Result<Path<String>, PathRejection>,
    body: Body,
) -> Answer {
    const PATH: &str = "/interceptors/{id}";
    only(&method, PATH, "GET, PATCH, PUT, DELETE")?;
    let Path(id) = id.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    check_id(&id)?;
    let unknown = || ApiError::NotFound(format!("no interceptor `{id}`"));
    match method {
        Method::GET => views::interceptor(&s, &id)
            .map(|v| ok_json(&v))
            .ok_or_else(unknown),
        Method::PATCH => {
            let patch: Patch = body::json(body, s.body_timeout).await?;
            if patch.enabled.is_none() && patch.config.is_none() {
                return Err(ApiError::BadRequest(
                    "give `enabled`, `config` or both".into(),
                ));
            }
            if views::instances(&s, &id).is_empty() {
                return Err(unknown());
            }
            if let Some(config) = patch.config {
                let (state, who) = (s.clone(), id.clone());
                edit(state, move |s| reconfigure_instance(s, &who, config)).await?;
            }
            if let Some(on) = patch.enabled {
                for (_, _, instance) in views::instances(&s, &id) {
                    instance.set_enabled(on);
                }
                tracing::info!("api: interceptor {id} enabled={on}");
            }
            Ok(no_content())
        }
        Method::PUT => {
            let load: Load = body::json(body, s.body_timeout).await?;
            edit(s, move |s| load_instance(s, id, load)).await
        }
        _ => edit(s, move |s| remove_instance(s, &id)).await,
    }
}

/// Runs a chain edit on the blocking pool: it may wait for a plugin's create or for the
/// requests in flight.
async fn edit(
    s: Arc<ApiState>,
    f: impl FnOnce(&ApiState) -> Result<(), ApiError> + Send + 'static,
) -> Answer {
    tokio::task::spawn_blocking(move || f(&s))
        .await
        .map_err(|e| ApiError::Internal(format!("the edit did not finish: {e}")))??;
    Ok(no_content())
}

fn load_instance(s: &ApiState, id: String, load: Load) -> Result<(), ApiError> {
    let _edits = s.edits.lock().unwrap_or_else(|p| p.into_inner());
    if !views::instances(s, &id).is_empty() {
        return Err(ApiError::Conflict(format!(
            "interceptor `{id}` exists; DELETE it first or choose another id"
        )));
    }
    let device = views::all_devices(s).find(|d| d.id() == load.device);
    let Some(device) = device else {
        let known: Vec<String> = views::all_devices(s).map(|d| d.id().to_string()).collect();
        return Err(ApiError::BadRequest(format!(
            "no device `{}`; devices: {}",
            load.device,
            known.join(", ")
        )));
    };
    if !load.path.is_absolute() {
        return Err(ApiError::BadRequest(format!(
            "path `{}` must be absolute",
            load.path.display()
        )));
    }
    if let Some(policy) = &s.policy {
        policy.check_plugin(&load.path)?;
        policy.check_config(&load.config)?;
    }
    let plugin = s
        .registry
        .load(&load.path, load.blake3.as_deref())
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let spec = InstanceSpec {
        id: id.clone(),
        plugin,
        config_json: serde_json::Value::Object(load.config).to_string(),
        enabled: load.enabled,
    };
    match device {
        views::Device::Disk(disk) => {
            disk.stack.insert(&spec, load.position, load.fresh)?;
        }
        views::Device::Net(card) => {
            let (chain, position) = (card.chain.clone(), load.position);
            card.io
                .run(move || chain.insert(&spec, position))
                .map_err(|e| ApiError::Internal(e.to_string()))??
        }
    }
    tracing::info!(
        "api: interceptor {id} loaded from {} into {} at {}",
        load.path.display(),
        device.id(),
        load.position
    );
    Ok(())
}

/// A new config for every instance named `id` (ABI version 2, the plugin's `reconfigure`),
/// on its device's I/O thread with nothing in flight.
fn reconfigure_instance(
    s: &ApiState,
    id: &str,
    config: serde_json::Map<String, serde_json::Value>,
) -> Result<(), ApiError> {
    let _edits = s.edits.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(policy) = &s.policy {
        policy.check_config(&config)?;
    }
    let json = serde_json::Value::Object(config).to_string();
    let found = views::instances(s, id);
    if let Some((_, _, i)) = found.iter().find(|(_, _, i)| !i.can_reconfigure()) {
        return Err(ApiError::Conflict(format!(
            "interceptor `{id}`: its plugin `{}` cannot change its config while it runs \
             (plugin ABI version 1); remove and load it again",
            i.plugin().name()
        )));
    }
    for (device, _, instance) in found {
        match device {
            views::Device::Disk(disk) => disk.stack.reconfigure(id, &json)?,
            views::Device::Net(card) => {
                let j = json.clone();
                card.io
                    .run(move || instance.reconfigure(&j))
                    .map_err(|e| ApiError::Internal(e.to_string()))?
                    .map_err(ApiError::BadRequest)?
            }
        }
    }
    tracing::info!("api: interceptor {id} reconfigured: {json}");
    Ok(())
}

fn remove_instance(s: &ApiState, id: &str) -> Result<(), ApiError> {
    let _edits = s.edits.lock().unwrap_or_else(|p| p.into_inner());
    let found = views::instances(s, id);
    if found.is_empty() {
        return Err(ApiError::NotFound(format!("no interceptor `{id}`")));
    }
    // Refuse before touching any device, so a refusal changes nothing.
    for (d, _, _) in &found {
        if let views::Device::Disk(disk) = d {
            disk.stack.check_removable(id)?;
        }
    }
    drop(found);
    for d in views::all_devices(s) {
        if !d.layers().iter().any(|l| l.id() == id) {
            continue;
        }
        match d {
            views::Device::Disk(disk) => disk.stack.remove(id)?,
            views::Device::Net(card) => {
                let (chain, id) = (card.chain.clone(), id.to_string());
                card.io
                    .run(move || chain.remove(&id))
                    .map_err(|e| ApiError::Internal(e.to_string()))??
            }
        }
    }
    tracing::info!("api: interceptor {id} removed");
    Ok(())
}
