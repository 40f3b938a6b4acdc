//! The `idem` binary's library: the gateway (a reverse proxy with the idempotency layer in
//! front of a pooled HTTP client), its configuration, the store factory, the admin API and
//! metrics, the `idem keys` and `idem migrate` tools, and `idem demo`.
//!
//! The binary (`src/main.rs`) reads top to bottom: command line → telemetry →
//! configuration → store → bind → serve → drain. Tests and embedders use
//! [`server::run`] with a listener on `127.0.0.1:0` and their own shutdown future:
//!
//! ```
//! use idem_server::config::Config;
//! use idem_server::server::{self, App};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let config = Config::from_toml(
//!     r#"
//!     upstream = "http://127.0.0.1:3000"
//!     store = "memory://"
//!
//!     [[routes]]
//!     path = "/v1/charges"
//!     key = "required"
//!     "#,
//! )?;
//! let store = config.store.open().await?;
//! let app = App::new(&config, store, b"principal secret")?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let gateway = tokio::spawn(server::run(listener, app, async {
//!     let _ = stopped.await;
//! }));
//! // ... send requests ...
//! let _ = stop.send(());
//! gateway.await??;
//! # Ok::<(), idem_core::BoxError>(())
//! # }).unwrap();
//! ```
//!
//! The configuration reference, the command line, the admin API and the metrics are in
//! `docs/operating.md`; the HTTP contract in `docs/http-contract.md`.
//!
//! # Features
//!
//! This crate has no optional features.

pub mod admin;
pub mod cli;
pub mod commands;
pub mod config;
pub mod demo;
pub mod late;
pub mod metrics;
pub mod payments;
pub mod proxy;
pub mod records;
pub mod secret;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod timeout;
