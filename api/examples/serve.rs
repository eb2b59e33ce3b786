//! A live API server without a VM, for schema testing (docs/api.md, "Schema testing"): a
//! stand-in VM and two disks over temporary files, with optional plugin instances in their
//! chains, served on a Unix socket, and, for tools that speak only TCP, bridged to a loopback
//! port. Test use only; `vmm` never runs this.
//!
//! ```sh
//! cargo run -p vmm-api --example serve -- --sock /tmp/api.sock --tcp 127.0.0.1:8787 \
//!     --plugin count=/abs/libinterceptor_counter.so
//! ```
//!
//! Each `--plugin ID=PATH` puts an instance (config `{}`) at the top of `vda`'s chain.

#[path = "../tests/common/mod.rs"]
mod common;

use compat::{InstanceSpec, PluginRegistry};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use vmm_api::{ApiState, Disk};

fn usage() -> ! {
    eprintln!("usage: serve --sock PATH [--tcp ADDR] [--plugin ID=PATH]...");
    std::process::exit(2)
}

fn main() {
    let mut sock = None;
    let mut tcp = None;
    let mut plugins = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let value = args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--sock" => sock = Some(PathBuf::from(value)),
            "--tcp" => tcp = Some(value),
            "--plugin" => match value.split_once('=') {
                Some((id, path)) => plugins.push((id.to_string(), PathBuf::from(path))),
                None => usage(),
            },
            _ => usage(),
        }
    }
    let Some(sock) = sock else { usage() };
    let dir = common::temp_dir("serve");
    let registry = Arc::new(PluginRegistry::new());
    let chain: Vec<InstanceSpec> = plugins
        .iter()
        .map(|(id, path)| InstanceSpec {
            id: id.clone(),
            plugin: registry
                .load(path, None)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display())),
            config_json: "{}".into(),
            enabled: true,
        })
        .collect();
    let vda = common::disk_with(&dir.join("vda.img"), "vda", 8 << 20, &chain);
    let vdb = common::disk(&dir.join("vdb.img"), "vdb", 8 << 20);
    let disks = [("vda", vda), ("vdb", vdb)]
        .into_iter()
        .map(|(id, stack)| Disk {
            id: id.into(),
            read_only: false,
            stack,
            queues: Arc::new(Vec::new),
        })
        .collect();
    let state = ApiState::new(Arc::new(common::StandInVm::default()), disks, registry);
    vmm_api::serve(&sock, state).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("serving on {}", sock.display());
    match tcp {
        Some(addr) => bridge(&addr, sock),
        None => loop {
            std::thread::park();
        },
    }
}

/// Every TCP connection to `addr` becomes a connection to the Unix socket, bytes copied both
/// ways until either side closes.
fn bridge(addr: &str, sock: PathBuf) -> ! {
    let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    eprintln!("bridged from tcp {addr}");
    loop {
        let Ok((tcp, _)) = listener.accept() else {
            continue;
        };
        let sock = sock.clone();
        std::thread::spawn(move || {
            let Ok(unix) = UnixStream::connect(&sock) else {
                return;
            };
            pipe(tcp, unix);
        });
    }
}

fn pipe(tcp: TcpStream, unix: UnixStream) {
    let (Ok(mut tcp_in), Ok(mut unix_out)) = (tcp.try_clone(), unix.try_clone()) else {
        return;
    };
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut tcp_in, &mut unix_out);
        let _ = unix_out.shutdown(std::net::Shutdown::Write);
    });
    let (mut unix_in, mut tcp_out) = (unix, tcp);
    let _ = std::io::copy(&mut unix_in, &mut tcp_out);
    let _ = tcp_out.shutdown(std::net::Shutdown::Write);
    let _ = up.join();
}
