//! What each subcommand does, from parsed arguments to an exit status.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, anyhow};
use idem_core::{RecordId, Store};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::admin::{self, AdminState};
use crate::cli::{DemoArgs, KeysCommand, MigrateArgs, RecordArgs, ServeArgs};
use crate::config::{Config, ConfigError, Encryption, Env, FileConfig, Overrides, SECRET_ENV};
use crate::records::{self, Purged, Released, ScopeParts};
use crate::secret;
use crate::server::{self, App};
use crate::store::StoreUrl;

/// How a command failed, and so the process's exit status.
#[derive(Debug)]
pub enum Failure {
    /// A bad configuration or bad arguments: exit status 64.
    Usage(anyhow::Error),
    /// Anything else: exit status 1.
    Runtime(anyhow::Error),
}

impl Failure {
    /// The exit status (64 as in sysexits' `EX_USAGE`).
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Usage(_) => 64,
            Failure::Runtime(_) => 1,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // One line: the error and its causes, joined by ": ".
        match self {
            Failure::Usage(e) | Failure::Runtime(e) => write!(f, "{e:#}"),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Runtime(e)
    }
}

fn invalid_config(e: ConfigError) -> Failure {
    Failure::Usage(anyhow!("invalid configuration: {e}"))
}

/// `idem serve`: config → secret → store → bind → serve → drain.
pub async fn serve(args: ServeArgs) -> Result<(), Failure> {
    let overrides = Overrides {
        listen: args.listen,
        upstream: args.upstream,
        store: args.store,
        admin_listen: args.admin_listen,
    };
    let config = Config::load(args.config.as_deref(), overrides).map_err(invalid_config)?;
    if args.check_config {
        println!(
            "configuration is valid: {} route(s), upstream {}, store {}",
            config.routes.len(),
            config.upstream,
            config.store
        );
        return Ok(());
    }

    let secret = secret::resolve(config.principal_secret.as_deref(), &config.store.sharing())
        .context("principal secret")?;
    let store = config
        .store
        .open()
        .await
        .with_context(|| format!("cannot open the store {}", config.store))?;
    // Encryption at rest: the gateway, the admin API and the purger all see the decorator.
    let store = match &config.encryption {
        Some(encryption) => encryption.wrap(store),
        None => store,
    };
    let app = App::new(&config, store.clone(), &secret)
        .map_err(|e| anyhow!("cannot set up the gateway: {e}"))?;

    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let admin_listener = match config.admin_listen {
        Some(addr) => {
            // A non-loopback address without a token was refused by the validation.
            Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr} (admin_listen)"))?,
            )
        }
        None => None,
    };
    info!(
        upstream = %config.upstream,
        store = %config.store,
        routes = config.routes.len(),
        mode = ?config.mode,
        encryption = config.encryption.is_some(),
        admin_token = config.admin_token.is_some(),
        "idem gateway starting"
    );

    let purger = tokio::spawn(crate::store::purge_expired_every(
        store.clone(),
        config.purge_interval,
    ));
    let stop = shutdown_on_signals();
    let admin = admin_listener.map(|listener| {
        tokio::spawn(admin::run(
            listener,
            AdminState::new(&app).with_token(config.admin_token.as_deref()),
            stopped(stop.clone()),
        ))
    });
    server::run(listener, app, stopped(stop.clone()))
        .await
        .context("the gateway failed")?;
    if let Some(admin) = admin {
        admin.abort();
    }
    purger.abort();
    // Closing the embedded store waits for its writer thread: off the runtime's threads.
    let _ = tokio::task::spawn_blocking(move || drop(store)).await;
    Ok(())
}

/// A channel that turns `true` on SIGTERM or SIGINT. A second signal during the drain
/// ends the process at once.
fn shutdown_on_signals() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("shutdown signal received");
        let _ = tx.send(true);
        wait_for_signal().await;
        warn!("second shutdown signal: exiting without waiting for requests in flight");
        std::process::exit(130);
    });
    rx
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// `idem migrate`.
pub async fn migrate(args: MigrateArgs) -> Result<(), Failure> {
    let (url, _) = store_and_secret(args.store.as_deref(), args.config.as_deref())?;
    let done = url
        .migrate()
        .await
        .with_context(|| format!("migrating {} failed", url))?;
    println!("{done}");
    Ok(())
}

/// The store URL (from `--store`, else the file's `store`) and the configured principal
/// secret (the environment's, else the file's), for tools that do not run the gateway.
fn store_and_secret(
    store: Option<&str>,
    config: Option<&Path>,
) -> Result<(StoreUrl, Option<String>), Failure> {
    let (url, secret, _) = store_secret_and_encryption(store, config)?;
    Ok((url, secret))
}

/// [`store_and_secret`], and the encryption at rest the file or the environment
/// configures.
fn store_secret_and_encryption(
    store: Option<&str>,
    config: Option<&Path>,
) -> Result<(StoreUrl, Option<String>, Option<Encryption>), Failure> {
    let file = match config {
        Some(path) => FileConfig::read(path).map_err(invalid_config)?,
        None => FileConfig::default(),
    };
    let encryption = crate::config::encryption(file.encryption.as_ref(), &Env::from_process())
        .map_err(invalid_config)?;
    let text = store.map(str::to_string).or(file.store).ok_or_else(|| {
        Failure::Usage(anyhow!(
            "no store: pass --store URL or --config FILE with a `store`"
        ))
    })?;
    let url =
        StoreUrl::parse(&text).map_err(|e| Failure::Usage(anyhow!("invalid --store: {e}")))?;
    let secret = std::env::var(SECRET_ENV)
        .ok()
        .filter(|s| !s.is_empty())
        .or(file.principal_secret);
    Ok((url, secret, encryption))
}

async fn open(url: &StoreUrl) -> Result<Arc<dyn Store>, Failure> {
    if *url == StoreUrl::Memory {
        return Err(Failure::Usage(anyhow!(
            "memory:// lives inside one gateway process: use its admin API instead"
        )));
    }
    Ok(url
        .open()
        .await
        .with_context(|| format!("cannot open the store {url}"))?)
}

/// Opens the store of `idem keys`, seen through the configured encryption.
async fn open_record_store(record: &RecordArgs) -> Result<Arc<dyn Store>, Failure> {
    let (url, _, encryption) =
        store_secret_and_encryption(record.store.as_deref(), record.config.as_deref())?;
    let store = open(&url).await?;
    Ok(match encryption {
        Some(encryption) => encryption.wrap(store),
        None => store,
    })
}

fn record_id(args: &RecordArgs, url: &StoreUrl, secret: Option<&str>) -> Result<RecordId, Failure> {
    if let Some(hex) = &args.id {
        return records::parse_id(hex).map_err(|e| Failure::Usage(anyhow!(e)));
    }
    let (Some(route), Some(key)) = (&args.route, &args.key) else {
        return Err(Failure::Usage(anyhow!(
            "name the record with --id HEX, or with --route and --key (and --method, \
             --principal, --namespace as the request had them)"
        )));
    };
    let hasher = match &args.principal {
        // Without a principal the secret plays no part.
        None => idem_core::PrincipalHasher::new(b""),
        Some(_) => {
            let secret = secret::existing(secret, &url.sharing()).map_err(|e| {
                Failure::Usage(anyhow!(
                    "--principal needs the gateway's principal secret: {e} (pass --config \
                     FILE or set {SECRET_ENV})"
                ))
            })?;
            idem_core::PrincipalHasher::new(&secret)
        }
    };
    let parts = ScopeParts {
        namespace: args.namespace.clone(),
        principal: args.principal.clone(),
        method: args.method.clone(),
        route: route.clone(),
        path: args.path.clone(),
        key: key.clone(),
    };
    parts
        .record_id(&hasher)
        .map_err(|e| Failure::Usage(anyhow!("{e}")))
}

fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
    );
}

/// `idem keys ...`.
pub async fn keys(command: KeysCommand) -> Result<(), Failure> {
    match command {
        KeysCommand::Id { record } => {
            let (url, secret) =
                store_and_secret(record.store.as_deref(), record.config.as_deref())?;
            println!("{}", record_id(&record, &url, secret.as_deref())?);
            Ok(())
        }
        KeysCommand::Show { record, body } => {
            let (url, secret) =
                store_and_secret(record.store.as_deref(), record.config.as_deref())?;
            let id = record_id(&record, &url, secret.as_deref())?;
            let store = open_record_store(&record).await?;
            match store.get(&id).await.context("reading the record")? {
                Some(found) => {
                    print_json(&records::record_json(&found, body));
                    Ok(())
                }
                None => Err(Failure::Runtime(anyhow!("no live record {id}"))),
            }
        }
        KeysCommand::Release { record } => {
            let (url, secret) =
                store_and_secret(record.store.as_deref(), record.config.as_deref())?;
            let id = record_id(&record, &url, secret.as_deref())?;
            let store = open(&url).await?;
            match records::release(&store, &id).await.context("releasing")? {
                Released::Released => {
                    println!("released {id}");
                    Ok(())
                }
                Released::NotInFlight(kind) => Err(Failure::Runtime(anyhow!(
                    "record {id} is {}, not in flight",
                    kind.as_str()
                ))),
                Released::NotFound => Err(Failure::Runtime(anyhow!("no live record {id}"))),
            }
        }
        KeysCommand::Purge { record } => {
            let (url, secret) =
                store_and_secret(record.store.as_deref(), record.config.as_deref())?;
            let id = record_id(&record, &url, secret.as_deref())?;
            let store = open(&url).await?;
            match records::purge(&store, &id).await.context("purging")? {
                Purged::Purged => {
                    println!("purged {id}");
                    Ok(())
                }
                Purged::NotFound => Err(Failure::Runtime(anyhow!("no live record {id}"))),
                Purged::Unsupported => Err(Failure::Runtime(anyhow!(
                    "this store cannot delete single records"
                ))),
            }
        }
        KeysCommand::InFlight {
            store,
            config,
            limit,
        } => {
            let (url, _) = store_and_secret(store.as_deref(), config.as_deref())?;
            let store = open(&url).await?;
            match records::in_flight(&store, None, limit.max(1))
                .await
                .context("listing")?
            {
                Some(found) => {
                    let list: Vec<_> = found
                        .iter()
                        .map(|r| records::record_json(r, false))
                        .collect();
                    print_json(&serde_json::Value::Array(list));
                    Ok(())
                }
                None => Err(Failure::Runtime(anyhow!("this store cannot list records"))),
            }
        }
    }
}

/// `idem demo`.
pub async fn demo(args: DemoArgs) -> Result<(), Failure> {
    if !(0.0..=0.9).contains(&args.drop_rate) {
        return Err(Failure::Usage(anyhow!(
            "--drop-rate must be between 0 and 0.9"
        )));
    }
    if args.payments == 0 || args.concurrency == 0 {
        return Err(Failure::Usage(anyhow!(
            "--payments and --concurrency must be at least 1"
        )));
    }
    let report = crate::demo::run(crate::demo::DemoOptions {
        payments: args.payments,
        drop_rate: args.drop_rate,
        concurrency: args.concurrency,
        seed: args.seed,
    })
    .await?;
    print!("{report}");
    if report.with_idem.duplicate_charges > 0 {
        return Err(Failure::Runtime(anyhow!(
            "{} payment(s) were charged twice through idem",
            report.with_idem.duplicate_charges
        )));
    }
    Ok(())
}
