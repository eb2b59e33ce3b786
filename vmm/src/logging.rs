//! The log on stderr, for `vmm` and `vmm-img`: `RUST_LOG` or a default level, and colour
//! only when stderr is a terminal (a log file or a pipe gets plain text, no escape codes).

use std::io::IsTerminal;

/// Installs the subscriber; `default` is the level without `RUST_LOG` ("warn", "error").
pub fn init(default: &str) {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .init();
}
