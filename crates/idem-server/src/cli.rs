//! The command line: `idem serve | migrate | keys | demo`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::telemetry::LogFormat;

/// idem: retried mutations never produce a second side effect.
#[derive(Debug, Parser)]
#[command(name = "idem", version, about, long_about = None)]
pub struct Cli {
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway: a reverse proxy that deduplicates retried requests.
    Serve(ServeArgs),
    /// Apply the store's pending schema migrations and exit.
    Migrate(MigrateArgs),
    /// Inspect, release or purge idempotency records.
    Keys {
        /// The action.
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Run the whole story on this machine: a payments upstream, the gateway, a client
    /// retrying through a lossy network, and the same run without idem for contrast.
    Demo(DemoArgs),
}

/// `idem serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The TOML configuration file.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Listen on this address (overrides `listen`).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Forward to this upstream (overrides `upstream`).
    #[arg(long, value_name = "URL")]
    pub upstream: Option<String>,
    /// The store URL (overrides `store`): memory://, sqlite://PATH, postgres://...
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,
    /// Serve metrics, health and the admin API on this address (overrides `admin_listen`).
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// Validate the configuration and exit (64 if it is invalid).
    #[arg(long)]
    pub check_config: bool,
}

/// `idem migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The store URL (default: the configuration's `store`).
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,
    /// A configuration file to take the store from.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Which store, and which record.
#[derive(Debug, Args)]
pub struct RecordArgs {
    /// The store URL (default: the configuration's `store`).
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,
    /// A configuration file to take the store and the principal secret from.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The record id (64 hex digits), as the admin API and the logs show it.
    #[arg(long, value_name = "HEX", conflicts_with_all = ["route", "path", "key", "principal", "namespace"])]
    pub id: Option<String>,
    /// The route pattern as configured (`/v1/charges/{id}`), or the route's scope name.
    #[arg(long, requires = "key")]
    pub route: Option<String>,
    /// The request's path, for prefix routes (`/v1/*`, the implicit `/*`), whose records
    /// are scoped by the concrete path.
    #[arg(long, requires = "route")]
    pub path: Option<String>,
    /// The request method.
    #[arg(long, default_value = "POST")]
    pub method: String,
    /// The idempotency key as the client sent it.
    #[arg(long, requires = "route")]
    pub key: Option<String>,
    /// The raw principal (the value of the route's principal header, e.g. the
    /// Authorization header); omit for requests that had none.
    #[arg(long)]
    pub principal: Option<String>,
    /// The route's namespace.
    #[arg(long)]
    pub namespace: Option<String>,
}

/// `idem keys ...`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Show a record (the stored response's body only with --body).
    Show {
        /// Which record.
        #[command(flatten)]
        record: RecordArgs,
        /// Include the stored response's headers and body.
        #[arg(long)]
        body: bool,
    },
    /// Release an in-flight record: the next request with its key executes again.
    Release {
        /// Which record.
        #[command(flatten)]
        record: RecordArgs,
    },
    /// Delete a record whatever its state: the next request with its key executes again.
    Purge {
        /// Which record.
        #[command(flatten)]
        record: RecordArgs,
    },
    /// Print the id of the record that scope parts name.
    Id {
        /// Which record.
        #[command(flatten)]
        record: RecordArgs,
    },
    /// List in-flight records.
    InFlight {
        /// The store URL (default: the configuration's `store`).
        #[arg(long, value_name = "URL")]
        store: Option<String>,
        /// A configuration file to take the store from.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: Option<PathBuf>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

/// `idem demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How many payments the client makes.
    #[arg(long, default_value_t = 100)]
    pub payments: usize,
    /// The share of answers the network drops, from 0 to 0.9.
    #[arg(long, default_value_t = 0.3)]
    pub drop_rate: f64,
    /// Payments in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Seed of the network's dice (the same seed drops the same answers).
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}
