//! `vmmctl`: the common operations of a running vmm's REST API, with readable tables.
//!
//! `vmmctl --sock /run/vmm.sock list`, `enable ID`, `disable ID`, `load ID --path P --device D`,
//! `unload ID`, `show ID`, `devices`, `vm`, `metrics`, `shutdown`.

use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::ExitCode;
use vmm_api::client::{request, Answer};

#[derive(Parser)]
#[command(
    version,
    about = "Inspect and steer a running vmm through its API socket"
)]
struct Cli {
    /// The vmm's API socket (`--api-sock` or `[api] socket`).
    #[arg(long, short)]
    sock: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The VM: state, vCPUs, memory, uptime.
    Vm,
    /// Devices and their chains, top to bottom.
    Devices,
    /// Interceptors with their counters.
    List,
    /// One interceptor, everything the API knows (JSON).
    Show {
        id: String,
    },
    Enable {
        id: String,
    },
    Disable {
        id: String,
    },
    /// Loads a plugin into a device's chain while the guest runs.
    Load {
        id: String,
        /// Absolute path of the plugin's shared object.
        #[arg(long)]
        path: PathBuf,
        #[arg(long)]
        device: String,
        /// 0 = top of the chain (next to the guest).
        #[arg(long, default_value_t = 0)]
        position: usize,
        /// The instance's config as a JSON object.
        #[arg(long, default_value = "{}")]
        config: String,
        /// Load it disabled.
        #[arg(long)]
        disabled: bool,
        /// The layers below hold nothing the guest needs (for plugins that own their format).
        #[arg(long)]
        fresh: bool,
        /// Pin the plugin file's BLAKE3.
        #[arg(long)]
        blake3: Option<String>,
    },
    /// Removes an instance after its requests in flight drain.
    Unload {
        id: String,
    },
    /// Prometheus metrics.
    Metrics,
    /// Stops the guest (disks flushed first).
    Shutdown,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let call = |method: &str, path: &str, body: Option<Value>| {
        let body = body.map(|b| b.to_string());
        request(&cli.sock, method, path, body.as_deref())
    };
    let answer = match &cli.command {
        Command::Vm => call("GET", "/vm", None),
        Command::Devices => call("GET", "/devices", None),
        Command::List => call("GET", "/interceptors", None),
        Command::Show { id } => call("GET", &format!("/interceptors/{id}"), None),
        Command::Enable { id } => call(
            "PATCH",
            &format!("/interceptors/{id}"),
            Some(json!({"enabled": true})),
        ),
        Command::Disable { id } => call(
            "PATCH",
            &format!("/interceptors/{id}"),
            Some(json!({"enabled": false})),
        ),
        Command::Load {
            id,
            path,
            device,
            position,
            config,
            disabled,
            fresh,
            blake3,
        } => {
            let config: Value = match serde_json::from_str(config) {
                Ok(v) => v,
                Err(e) => {
                    eprintln!("vmmctl: --config is not JSON: {e}");
                    return ExitCode::from(2);
                }
            };
            let mut body = json!({
                "path": path, "device": device, "position": position, "config": config,
                "enabled": !disabled, "fresh": fresh,
            });
            if let Some(h) = blake3 {
                body["blake3"] = json!(h);
            }
            call("PUT", &format!("/interceptors/{id}"), Some(body))
        }
        Command::Unload { id } => call("DELETE", &format!("/interceptors/{id}"), None),
        Command::Metrics => call("GET", "/metrics", None),
        Command::Shutdown => call("PUT", "/actions", Some(json!({"action_type": "Shutdown"}))),
    };
    let answer = match answer {
        Ok(a) => a,
        Err(e) => {
            eprintln!("vmmctl: {}: {e}", cli.sock.display());
            return ExitCode::from(2);
        }
    };
    if !(200..300).contains(&answer.status) {
        let why = answer.json()["fault_message"]
            .as_str()
            .map_or(answer.body.clone(), str::to_string);
        eprintln!("vmmctl: {} {why}", answer.status);
        return ExitCode::FAILURE;
    }
    print!("{}", render(&cli.command, &answer));
    ExitCode::SUCCESS
}

fn render(command: &Command, answer: &Answer) -> String {
    let v = answer.json();
    match command {
        Command::Vm => table(
            &["STATE", "VCPUS", "MEMORY MIB", "UPTIME S"],
            vec![vec![
                s(&v["state"]),
                s(&v["vcpus"]),
                s(&v["memory_mib"]),
                format!("{:.1}", v["uptime_secs"].as_f64().unwrap_or(0.0)),
            ]],
        ),
        Command::Devices => table(
            &[
                "DEVICE",
                "CAPACITY",
                "REQUESTS",
                "ERRORS",
                "CHAIN (TOP FIRST)",
            ],
            rows(&v)
                .map(|d| {
                    let chain: Vec<String> = rows(&d["chain"])
                        .map(|c| {
                            let off = if c["enabled"] == json!(true) {
                                ""
                            } else {
                                " (off)"
                            };
                            format!("{}{off}", s(&c["id"]))
                        })
                        .collect();
                    vec![
                        s(&d["id"]),
                        s(&d["capacity_bytes"]),
                        s(&d["requests"]),
                        s(&d["errors"]),
                        chain.join(" > "),
                    ]
                })
                .collect(),
        ),
        Command::List => {
            let mut out = Vec::new();
            for i in rows(&v) {
                for d in rows(&i["devices"]) {
                    let c = &d["counters"];
                    out.push(vec![
                        s(&i["id"]),
                        s(&i["plugin"]),
                        s(&d["device"]),
                        s(&d["position"]),
                        if d["enabled"] == json!(true) {
                            "on".into()
                        } else {
                            "off".into()
                        },
                        s(&c["requests"]),
                        s(&c["errors"]),
                        s(&c["completed_without_driver"]),
                        micros(&c["latency_ns"]["p50"]),
                        micros(&c["latency_ns"]["p99"]),
                    ]);
                }
            }
            table(
                &[
                    "ID", "PLUGIN", "DEVICE", "POS", "STATE", "REQUESTS", "ERRORS", "ANSWERED",
                    "P50 US", "P99 US",
                ],
                out,
            )
        }
        Command::Show { .. } => {
            format!("{}\n", serde_json::to_string_pretty(&v).unwrap_or_default())
        }
        Command::Metrics => answer.body.clone(),
        _ => "ok\n".into(),
    }
}

fn rows(v: &Value) -> impl Iterator<Item = &Value> {
    v.as_array().into_iter().flatten()
}

fn s(v: &Value) -> String {
    match v {
        Value::String(t) => t.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn micros(v: &Value) -> String {
    v.as_f64()
        .map_or("-".into(), |ns| format!("{:.1}", ns / 1000.0))
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut out = line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out.push_str(&line(r));
    }
    out
}
