//! Structured logs: `tracing` to standard error, as text or JSON lines, filtered by
//! `RUST_LOG` (default `info`).
//!
//! Keys, bodies and secrets are never logged at `info`; each request's lines carry its
//! request id in the `request` span.

use tracing_subscriber::EnvFilter;

/// The log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber; `default_filter` applies when `RUST_LOG` is unset.
/// Does nothing if one is already installed.
pub fn init(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}
