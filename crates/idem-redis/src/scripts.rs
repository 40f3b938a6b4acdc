//! The Lua scripts, one per transition, each with the small function that runs it.
//!
//! Scripts run with `EVALSHA`; [`redis::Script`] loads a script the server does not know
//! (`NOSCRIPT`) and sends it again. Every script reads the server's clock with `TIME`, and
//! starts with `record.lua`, which reads and writes a record in its two string forms and
//! reads the hashes of earlier versions.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use idem_core::{ClaimRequest, FencingToken, RecordId, duration_millis};
use redis::{Cmd, ErrorKind, RedisResult, Script, ServerErrorKind, Value};

use crate::conn::Conn;
use crate::keys::Keys;
use crate::slots::Routes;

/// `record.lua`, which every script starts with: reading and writing a record.
const RECORD: &str = include_str!("../scripts/record.lua");

/// A script's source with [`RECORD`] after its first line (the `#!lua` line, which must
/// stay first).
fn with_record(script: &str) -> Script {
    let (shebang, body) = script.split_once('\n').unwrap_or((script, ""));
    Script::new(&format!("{shebang}\n{RECORD}\n{body}"))
}

static CLAIM: LazyLock<Script> =
    LazyLock::new(|| with_record(include_str!("../scripts/claim.lua")));
static COMPLETE: LazyLock<Script> =
    LazyLock::new(|| with_record(include_str!("../scripts/complete.lua")));
static RELEASE: LazyLock<Script> =
    LazyLock::new(|| with_record(include_str!("../scripts/release.lua")));
static RELEASE_LOST: LazyLock<Script> =
    LazyLock::new(|| with_record(include_str!("../scripts/release_lost.lua")));
static RENEW: LazyLock<Script> =
    LazyLock::new(|| with_record(include_str!("../scripts/renew.lua")));
static GET: LazyLock<Script> = LazyLock::new(|| with_record(include_str!("../scripts/get.lua")));
static REMOVE: LazyLock<Script> =
    LazyLock::new(|| with_record(include_str!("../scripts/remove.lua")));

/// Durations beyond 2^50 ms (about 35,000 years) are taken as 2^50 ms, so that every time
/// the scripts compute stays below 2^53, where Lua's numbers are exact.
const MAX_MILLIS: u64 = 1 << 50;

pub(crate) fn millis(d: Duration) -> u64 {
    duration_millis(d).min(MAX_MILLIS)
}

/// `claim.lua` as a command, for pipelines (the caller handles `NOSCRIPT`).
pub(crate) fn claim_cmd(keys: &Keys, request: &ClaimRequest, holder: &str) -> Cmd {
    claim_cmd_on(&keys.record(&request.id), request, holder)
}

fn claim_cmd_on(key: &str, request: &ClaimRequest, holder: &str) -> Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(CLAIM.get_hash())
        .arg(1)
        .arg(key)
        .arg(crate::keys::hex(request.fingerprint.as_bytes()))
        .arg(millis(request.lease))
        .arg(millis(request.retention))
        .arg(holder);
    cmd
}

/// Loads `claim.lua` into the server's script cache (before pipelining `EVALSHA`s).
pub(crate) async fn load_claim(conn: &mut Conn) -> RedisResult<()> {
    CLAIM.load_async(conn).await.map(drop)
}

pub(crate) async fn claim(
    conn: &mut Conn,
    keys: &Keys,
    request: &ClaimRequest,
    holder: &str,
) -> RedisResult<Value> {
    CLAIM
        .key(keys.record(&request.id))
        .arg(crate::keys::hex(request.fingerprint.as_bytes()))
        .arg(millis(request.lease))
        .arg(millis(request.retention))
        .arg(holder)
        .invoke_async(conn)
        .await
}

/// [`claim`] on a cluster, straight to the key's master when the slot map knows it (see
/// [`Routes`]).
pub(crate) async fn claim_routed(
    routes: &Arc<Routes>,
    keys: &Keys,
    request: &ClaimRequest,
    holder: &str,
) -> RedisResult<Value> {
    let key = keys.record(&request.id);
    let cmd = claim_cmd_on(&key, request, holder);
    match routes.query(&cmd, key.as_bytes()).await?.extract_error() {
        Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
            // On every master (the script did not run), then once more.
            CLAIM.load_async(&mut routes.cluster()).await?;
            routes.query(&cmd, key.as_bytes()).await?.extract_error()
        }
        result => result,
    }
}

pub(crate) async fn complete(
    conn: &mut Conn,
    keys: &Keys,
    id: &RecordId,
    token: FencingToken,
    response: &[u8],
    nonce: &str,
) -> RedisResult<Value> {
    COMPLETE
        .key(keys.record(id))
        .arg(token.get())
        .arg(response)
        .arg(nonce)
        .arg(keys.publish_command())
        .arg(keys.channel(id))
        .arg(id.to_hex())
        .invoke_async(conn)
        .await
}

pub(crate) async fn release(
    conn: &mut Conn,
    keys: &Keys,
    id: &RecordId,
    token: FencingToken,
    nonce: &str,
) -> RedisResult<Value> {
    RELEASE
        .key(keys.record(id))
        .arg(token.get())
        .arg(nonce)
        .arg(keys.publish_command())
        .arg(keys.channel(id))
        .arg(id.to_hex())
        .invoke_async(conn)
        .await
}

/// `release_lost.lua`: releases `id` if a lost claim with holder nonce `holder` (hex) took
/// it; `true` if it did.
pub(crate) async fn release_lost(
    conn: &mut Conn,
    keys: &Keys,
    id: &RecordId,
    holder: &str,
    nonce: &str,
) -> RedisResult<bool> {
    let reply: Vec<String> = RELEASE_LOST
        .key(keys.record(id))
        .arg(holder)
        .arg(nonce)
        .arg(keys.publish_command())
        .arg(keys.channel(id))
        .arg(id.to_hex())
        .invoke_async(conn)
        .await?;
    Ok(reply.first().is_some_and(|r| r == "released"))
}

pub(crate) async fn renew(
    conn: &mut Conn,
    keys: &Keys,
    id: &RecordId,
    token: FencingToken,
    lease: Duration,
) -> RedisResult<Value> {
    RENEW
        .key(keys.record(id))
        .arg(token.get())
        .arg(millis(lease))
        .invoke_async(conn)
        .await
}

pub(crate) async fn get(conn: &mut Conn, keys: &Keys, id: &RecordId) -> RedisResult<Value> {
    GET.key(keys.record(id)).invoke_async(conn).await
}

pub(crate) async fn remove(conn: &mut Conn, keys: &Keys, id: &RecordId) -> RedisResult<bool> {
    REMOVE
        .key(keys.record(id))
        .arg(keys.publish_command())
        .arg(keys.channel(id))
        .arg(id.to_hex())
        .invoke_async(conn)
        .await
}
