//! Behaviour of the Redis store beyond the shared suite: key expiry, the key layout,
//! notifications between processes, reconnection, lost answers, corrupt records and
//! configuration errors. Against the servers of `IDEM_TEST_REDIS_URL` and
//! `IDEM_TEST_REDIS_CLUSTER_URL` (`scripts/test` starts them).

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{CLUSTER, STANDALONE};
use idem_core::{
    ClaimOutcome, ClaimRequest, Error, Fingerprint, RecordId, RecordState, Store, WaitForCompletion,
};
use idem_redis::{RedisOptions, RedisStore};
use redis::aio::ConnectionLike;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A plain connection to the same server, to look at what the store wrote.
enum Raw {
    Standalone(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl ConnectionLike for Raw {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Raw::Standalone(c) => c.req_packed_command(cmd),
            Raw::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Raw::Standalone(c) => c.req_packed_commands(cmd, offset, count),
            Raw::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        0
    }
}

async fn raw(var: &str) -> Raw {
    let url = common::url(var);
    match url.strip_prefix("redis+cluster://") {
        Some(hosts) => {
            let nodes: Vec<String> = hosts.split(',').map(|h| format!("redis://{h}")).collect();
            let client = redis::cluster::ClusterClient::new(nodes).unwrap();
            Raw::Cluster(client.get_async_connection().await.unwrap())
        }
        None => {
            let client = redis::Client::open(url).unwrap();
            Raw::Standalone(client.get_multiplexed_async_connection().await.unwrap())
        }
    }
}

fn request(label: &str) -> ClaimRequest {
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    ClaimRequest::new(
        RecordId::for_event("idem-redis-tests", &format!("{label}/{run}")),
        Fingerprint::of_bytes(b"a"),
    )
    .with_lease(Duration::from_secs(5))
    .with_retention(Duration::from_secs(30))
}

/// Two stores on one server and prefix: two gateway replicas.
async fn two_replicas(var: &str) -> (Arc<RedisStore>, Arc<RedisStore>) {
    let options = RedisOptions {
        key_prefix: common::unique_prefix(),
        ..RedisOptions::default()
    };
    let url = common::url(var);
    let a = RedisStore::connect(&url, options.clone()).await.unwrap();
    let b = RedisStore::connect(&url, options).await.unwrap();
    (Arc::new(a), Arc::new(b))
}

async fn pexpiretime(conn: &mut Raw, key: &str) -> i64 {
    redis::cmd("PEXPIRETIME")
        .arg(key)
        .query_async(conn)
        .await
        .unwrap()
}

/// Every write sets the key's expiry to the record's `expires_at`: in flight, completed,
/// released, renewed.
async fn keys_expire_at_the_records_expiry(var: &str) {
    let store = common::connect(var).await;
    let mut conn = raw(var).await;
    for settle in ["complete", "release", "renew"] {
        let req = request(settle);
        let key = store.record_key(&req.id);
        let lease = *store.claim(&req).await.unwrap().lease().unwrap();
        let record = store.get(&req.id).await.unwrap().unwrap();
        assert_eq!(
            pexpiretime(&mut conn, &key).await,
            record.expires_at.as_millis() as i64
        );
        assert_eq!(
            record.expires_at,
            lease.lease_until.saturating_add(req.retention)
        );
        match settle {
            "complete" => store
                .complete(&req.id, lease.token, Bytes::from_static(b"r"))
                .await
                .unwrap(),
            "release" => store.release(&req.id, lease.token).await.unwrap(),
            _ => {
                store
                    .renew(&req.id, lease.token, Duration::from_secs(60))
                    .await
                    .unwrap();
            }
        }
        let record = store.get(&req.id).await.unwrap().unwrap();
        assert_eq!(
            pexpiretime(&mut conn, &key).await,
            record.expires_at.as_millis() as i64,
            "{settle}"
        );
    }
}

#[tokio::test]
async fn standalone_keys_expire_at_the_records_expiry() {
    keys_expire_at_the_records_expiry(STANDALONE).await;
}

#[tokio::test]
async fn cluster_keys_expire_at_the_records_expiry() {
    keys_expire_at_the_records_expiry(CLUSTER).await;
}

/// A record is one string under `<prefix>:{<hex id>}`: a claim on a fresh key writes the
/// short form, every later write the full one (fixed fields, then the response).
#[tokio::test]
async fn a_record_is_one_string_under_its_hash_tagged_key() {
    let store = common::connect(STANDALONE).await;
    let mut conn = raw(STANDALONE).await;
    let req = request("layout");
    let lease = *store.claim(&req).await.unwrap().lease().unwrap();
    let key = store.record_key(&req.id);
    assert_eq!(
        key,
        format!("{}:{{{}}}", store.key_prefix(), req.id.to_hex())
    );
    let fingerprint = hex(req.fingerprint.as_bytes());
    let claimed = get_string(&mut conn, &key).await;
    let fields: Vec<&str> = claimed.split(' ').collect();
    assert_eq!(fields.len(), 7, "{claimed}");
    assert_eq!(fields[0], "c");
    assert_eq!(fields[1], fingerprint);
    assert_eq!(fields[2].len(), 32);
    let (secs, micros): (u64, u64) = (fields[3].parse().unwrap(), fields[4].parse().unwrap());
    assert_eq!((secs * 1000 + micros / 1000) * 1000, lease.token.get());
    assert_eq!(fields[5], req.lease.as_millis().to_string());
    assert_eq!(fields[6], req.retention.as_millis().to_string());
    let holder = fields[2].to_owned();

    store
        .complete(&req.id, lease.token, Bytes::from_static(b"the answer\n\0 "))
        .await
        .unwrap();
    let record = store.get(&req.id).await.unwrap().unwrap();
    let RecordState::Completed { completed_at, .. } = record.state else {
        panic!("{record:?}");
    };
    let full = get_bytes(&mut conn, &key).await;
    assert_eq!(&full[..2], b"fc");
    assert_eq!(&full[2..66], fingerprint.as_bytes());
    assert_eq!(&full[66..98], holder.as_bytes());
    let settled_by = &full[98..130];
    assert!(
        settled_by.iter().all(u8::is_ascii_hexdigit),
        "{settled_by:?}"
    );
    assert_ne!(settled_by, holder.as_bytes());
    let numbers: Vec<f64> = full[130..186]
        .chunks_exact(8)
        .map(|b| f64::from_be_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(
        numbers,
        [
            lease.token.get() as f64,
            lease.lease_until.as_millis() as f64,
            req.retention.as_millis() as f64,
            record.expires_at.as_millis() as f64,
            completed_at.as_millis() as f64,
            -1.0,
            -1.0,
        ]
    );
    assert_eq!(&full[186..], b"the answer\n\0 ");
}

/// A record in the full form, in `state` with `token`; every other number 1.
fn full_form(state: u8, token: f64) -> Vec<u8> {
    let mut record = vec![b'f', state];
    record.extend_from_slice(&[b'a'; 64]);
    record.extend_from_slice(&[b'b'; 32]);
    record.extend_from_slice(&[b'-'; 32]);
    record.extend_from_slice(&token.to_be_bytes());
    for _ in 0..6 {
        record.extend_from_slice(&1f64.to_be_bytes());
    }
    record
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn get_string(conn: &mut Raw, key: &str) -> String {
    redis::cmd("GET").arg(key).query_async(conn).await.unwrap()
}

async fn get_bytes(conn: &mut Raw, key: &str) -> Vec<u8> {
    redis::cmd("GET").arg(key).query_async(conn).await.unwrap()
}

async fn key_type(conn: &mut Raw, key: &str) -> String {
    redis::cmd("TYPE").arg(key).query_async(conn).await.unwrap()
}

/// The server's time in ms, as the scripts read it.
async fn server_millis(conn: &mut Raw, key: &str) -> u64 {
    // TIME on the key's node: the scripts' clock.
    let (secs, micros): (u64, u64) = redis::Script::new("return redis.call('TIME')")
        .key(key)
        .invoke_async(conn)
        .await
        .unwrap();
    secs * 1000 + micros / 1000
}

/// A claim on a fresh key stores the short form; every operation reads it as the record it
/// is, and the first write that changes it stores the full form.
async fn a_fresh_claim_is_one_string_every_operation_reads(var: &str) {
    let store = common::connect(var).await;
    let mut conn = raw(var).await;
    for next in ["complete", "release", "renew", "remove", "claim"] {
        let req = request(&format!("string-{next}"));
        let key = store.record_key(&req.id);
        let lease = *store.claim(&req).await.unwrap().lease().unwrap();
        let stored = get_string(&mut conn, &key).await;
        assert!(stored.starts_with("c "), "{stored}");

        // What get reads from the string is what the claim answered.
        let record = store.get(&req.id).await.unwrap().unwrap();
        assert_eq!(record.token, lease.token, "{next}");
        assert_eq!(record.fingerprint, req.fingerprint);
        assert_eq!(record.retention, req.retention);
        assert_eq!(
            record.state,
            RecordState::InFlight {
                lease_until: lease.lease_until
            }
        );
        assert_eq!(
            record.expires_at,
            lease.lease_until.saturating_add(req.retention)
        );
        assert_eq!(
            pexpiretime(&mut conn, &key).await,
            record.expires_at.as_millis() as i64
        );
        // A stale token changes nothing.
        let stale = idem_core::FencingToken::new(lease.token.get() - 1);
        assert!(matches!(
            store.complete(&req.id, stale, Bytes::new()).await,
            Err(Error::LeaseLost { .. })
        ));
        assert_eq!(get_string(&mut conn, &key).await, stored, "{next}");

        match next {
            "complete" => {
                store
                    .complete(&req.id, lease.token, Bytes::from_static(b"done"))
                    .await
                    .unwrap();
                assert!(get_bytes(&mut conn, &key).await.starts_with(b"f"));
                match store.claim(&req).await.unwrap() {
                    ClaimOutcome::Completed(c) => {
                        assert_eq!(c.token, lease.token);
                        assert_eq!(c.response, &b"done"[..]);
                    }
                    other => panic!("{other:?}"),
                }
            }
            "release" => {
                store.release(&req.id, lease.token).await.unwrap();
                assert!(get_bytes(&mut conn, &key).await.starts_with(b"f"));
                let again = *store.claim(&req).await.unwrap().lease().unwrap();
                assert!(again.token > lease.token);
            }
            "renew" => {
                let until = store
                    .renew(&req.id, lease.token, Duration::from_secs(60))
                    .await
                    .unwrap();
                assert!(until > lease.lease_until);
                assert!(get_bytes(&mut conn, &key).await.starts_with(b"f"));
                let record = store.get(&req.id).await.unwrap().unwrap();
                assert_eq!(record.token, lease.token);
                assert_eq!(record.state, RecordState::InFlight { lease_until: until });
                store
                    .complete(&req.id, lease.token, Bytes::new())
                    .await
                    .unwrap();
            }
            "remove" => {
                assert!(store.inspector().unwrap().remove(&req.id).await.unwrap());
                assert_eq!(key_type(&mut conn, &key).await, "none");
            }
            _ => {
                // Other claims of the id: in flight, or a mismatch for another body.
                assert!(matches!(
                    store.claim(&req).await.unwrap(),
                    ClaimOutcome::InFlight { lease_until, now }
                        if lease_until == lease.lease_until && now < lease_until
                ));
                let other = ClaimRequest {
                    fingerprint: Fingerprint::of_bytes(b"another body"),
                    ..req.clone()
                };
                assert_eq!(store.claim(&other).await.unwrap(), ClaimOutcome::Mismatch);
                assert_eq!(get_string(&mut conn, &key).await, stored);
            }
        }
    }
}

#[tokio::test]
async fn standalone_a_fresh_claim_is_one_string_every_operation_reads() {
    a_fresh_claim_is_one_string_every_operation_reads(STANDALONE).await;
}

#[tokio::test]
async fn cluster_a_fresh_claim_is_one_string_every_operation_reads() {
    a_fresh_claim_is_one_string_every_operation_reads(CLUSTER).await;
}

/// An in-flight record stored as a hash, as earlier versions stored every record, keeps
/// working: other claims see it in flight, its holder completes it (which stores it as a
/// string), and it replays.
async fn records_stored_as_hashes_keep_working(var: &str) {
    let store = common::connect(var).await;
    let mut conn = raw(var).await;
    let req = request("earlier-hash");
    let key = store.record_key(&req.id);
    let now = server_millis(&mut conn, &key).await;
    let (token, lease_until, retention) = (now * 1000, now + 5_000, 30_000u64);
    let fingerprint = hex(req.fingerprint.as_bytes());
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg("fingerprint")
        .arg(&fingerprint)
        .arg("token")
        .arg(token)
        .arg("state")
        .arg("in_flight")
        .arg("lease_until")
        .arg(lease_until)
        .arg("retention")
        .arg(retention)
        .arg("expires_at")
        .arg(lease_until + retention)
        .arg("holder")
        .arg("00112233445566778899aabbccddeeff")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("PEXPIREAT")
        .arg(&key)
        .arg(lease_until + retention)
        .query_async(&mut conn)
        .await
        .unwrap();

    let lease_until = idem_core::Timestamp::from_millis(lease_until);
    assert!(matches!(
        store.claim(&req).await.unwrap(),
        ClaimOutcome::InFlight { lease_until: until, .. } if until == lease_until
    ));
    let record = store.get(&req.id).await.unwrap().unwrap();
    assert_eq!(record.token.get(), token);
    assert_eq!(record.state, RecordState::InFlight { lease_until });
    let token = idem_core::FencingToken::new(token);
    store
        .complete(&req.id, token, Bytes::from_static(b"kept"))
        .await
        .unwrap();
    match store.claim(&req).await.unwrap() {
        ClaimOutcome::Completed(c) => {
            assert_eq!(c.token, token);
            assert_eq!(c.response, &b"kept"[..]);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(key_type(&mut conn, &key).await, "string");
}

#[tokio::test]
async fn standalone_records_stored_as_hashes_keep_working() {
    records_stored_as_hashes_keep_working(STANDALONE).await;
}

#[tokio::test]
async fn cluster_records_stored_as_hashes_keep_working() {
    records_stored_as_hashes_keep_working(CLUSTER).await;
}

/// A waiter in one replica is woken when another replica completes, releases or removes the
/// record: the message crosses processes through the server.
async fn waiters_are_woken_by_another_replica(var: &str) {
    let (waiting, settling) = two_replicas(var).await;
    for how in ["complete", "release", "remove"] {
        let req = request(how);
        let lease = *settling.claim(&req).await.unwrap().lease().unwrap();
        let id = req.id;
        let waiter = {
            let waiting = waiting.clone();
            tokio::spawn(async move { waiting.wait_settled(&id).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiter.is_finished(), "{how}: the record is in flight");
        match how {
            "complete" => settling
                .complete(&id, lease.token, Bytes::new())
                .await
                .unwrap(),
            "release" => settling.release(&id, lease.token).await.unwrap(),
            _ => assert!(settling.inspector().unwrap().remove(&id).await.unwrap()),
        }
        tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .unwrap_or_else(|_| panic!("{how}: the waiter was not woken"))
            .unwrap()
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_waiters_are_woken_by_another_replica() {
    waiters_are_woken_by_another_replica(STANDALONE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_waiters_are_woken_by_another_replica() {
    waiters_are_woken_by_another_replica(CLUSTER).await;
}

/// The `redis://` URLs of the server's nodes (one for a standalone server).
fn node_urls(var: &str) -> Vec<String> {
    let url = common::url(var);
    match url.strip_prefix("redis+cluster://") {
        Some(hosts) => hosts.split(',').map(|h| format!("redis://{h}")).collect(),
        None => vec![url],
    }
}

/// Runs a command on every node of the server.
async fn on_every_node(var: &str, cmd: &redis::Cmd) -> Vec<redis::Value> {
    let mut replies = Vec::new();
    for url in node_urls(var) {
        let client = redis::Client::open(url).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        replies.push(cmd.query_async(&mut conn).await.unwrap());
    }
    replies
}

/// A store that connects as a user of its own (created on every node), so a test can kill
/// its connections and no other store's: `CLIENT KILL USER`.
async fn store_as_own_user(var: &str, prefix: &str) -> (RedisStore, String) {
    let user = format!(
        "idem-test-{}-{}",
        std::process::id(),
        common::unique_prefix().len()
    );
    let user = format!("{user}-{}", prefix.replace(':', "-"));
    on_every_node(
        var,
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg(&user)
            .arg("on")
            .arg("nopass")
            .arg("~*")
            .arg("&*")
            .arg("+@all"),
    )
    .await;
    let url = common::url(var);
    let url = match url.strip_prefix("redis+cluster://") {
        Some(hosts) => format!("redis+cluster://{user}:x@{hosts}"),
        None => url.replacen("redis://", &format!("redis://{user}:x@"), 1),
    };
    let options = RedisOptions {
        key_prefix: prefix.to_owned(),
        ..RedisOptions::default()
    };
    (RedisStore::connect(&url, options).await.unwrap(), user)
}

/// After the waiting store's connections are killed (its subscriber's included), it
/// reconnects, and its waiters are woken by settlements made after that: the standalone
/// subscriber reconnects by itself; on a cluster the driver subscribes the record's channel
/// again.
async fn waiters_survive_lost_connections(var: &str) {
    let prefix = common::unique_prefix();
    let (waiting, user) = store_as_own_user(var, &prefix).await;
    let waiting = Arc::new(waiting);
    let settling = RedisStore::connect(
        &common::url(var),
        RedisOptions {
            key_prefix: prefix,
            ..RedisOptions::default()
        },
    )
    .await
    .unwrap();
    let req = request("reconnect");
    let lease = *settling.claim(&req).await.unwrap().lease().unwrap();
    let id = req.id;
    let waiter = {
        let waiting = waiting.clone();
        tokio::spawn(async move { waiting.wait_settled(&id).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let killed: i64 = on_every_node(var, redis::cmd("CLIENT").arg("KILL").arg("USER").arg(&user))
        .await
        .into_iter()
        .map(|v| redis::from_redis_value::<i64>(v).unwrap())
        .sum();
    assert!(killed >= 1);
    // Woken by the reconnection, the waiter reads the record again and keeps waiting.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!waiter.is_finished(), "the record is still in flight");
    settling
        .complete(&id, lease.token, Bytes::new())
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("woken after the connections were restored")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_waiters_survive_lost_connections() {
    waiters_survive_lost_connections(STANDALONE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_waiters_survive_lost_connections() {
    waiters_survive_lost_connections(CLUSTER).await;
}

/// A TCP proxy in front of the standalone server that can lose one answer: armed, it lets
/// the next script call through to the server and then drops that connection instead of
/// passing the server's answer on.
struct LossyProxy {
    port: u16,
    armed: Arc<AtomicBool>,
}

impl LossyProxy {
    async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let armed = Arc::new(AtomicBool::new(false));
        let proxy_armed = armed.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                tokio::spawn(forward(client, server, proxy_armed.clone()));
            }
        });
        Self { port, armed }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn lose_next_answer(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    fn lost_one(&self) -> bool {
        !self.armed.load(Ordering::SeqCst)
    }
}

async fn forward(client: TcpStream, server: TcpStream, armed: Arc<AtomicBool>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    // Set once this connection carried the armed script call: its answer is dropped.
    let lose = Arc::new(AtomicBool::new(false));
    let lose_answer = lose.clone();
    let requests = tokio::spawn(async move {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = match client_read.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let script_call = buffer[..n].windows(7).any(|w| w == b"EVALSHA");
            if script_call && armed.swap(false, Ordering::SeqCst) {
                lose_answer.store(true, Ordering::SeqCst);
            }
            if server_write.write_all(&buffer[..n]).await.is_err() {
                break;
            }
        }
    });
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = match server_read.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if lose.load(Ordering::SeqCst) {
            // The server ran the script; its answer is lost with the connection.
            break;
        }
        if client_write.write_all(&buffer[..n]).await.is_err() {
            break;
        }
    }
    requests.abort();
}

fn upstream() -> String {
    let url = common::url(STANDALONE);
    let rest = url.strip_prefix("redis://").unwrap();
    rest.split('/').next().unwrap().to_owned()
}

/// The connection fails after the claim ran on the server: the store sends it again with the
/// same holder nonce and gets the lease the claim took, not "in flight".
#[tokio::test]
async fn a_lost_claim_answer_is_recovered() {
    let proxy = LossyProxy::start(upstream()).await;
    let options = RedisOptions {
        key_prefix: common::unique_prefix(),
        ..RedisOptions::default()
    };
    let store = RedisStore::connect(&proxy.url(), options).await.unwrap();
    // Scripts are loaded, so the armed exchange is the claim itself.
    store.claim(&request("warm-up")).await.unwrap();

    let req = request("lost-claim");
    proxy.lose_next_answer();
    let outcome = store.claim(&req).await.unwrap();
    assert!(proxy.lost_one(), "an answer was lost");
    let lease = match outcome {
        ClaimOutcome::Acquired(lease) => lease,
        other => panic!("expected the lease the lost claim took, got {other:?}"),
    };
    let record = store.get(&req.id).await.unwrap().unwrap();
    assert_eq!(record.token, lease.token);

    // The same for completing: sent again, it reports success rather than a lost lease.
    proxy.lose_next_answer();
    store
        .complete(&req.id, lease.token, Bytes::from_static(b"once"))
        .await
        .unwrap();
    assert!(proxy.lost_one(), "an answer was lost");
    match store.claim(&req).await.unwrap() {
        ClaimOutcome::Completed(c) => assert_eq!(c.response, "once"),
        other => panic!("expected Completed, got {other:?}"),
    }
}

/// A batch whose answer is lost is sent again with the same nonces and answers as the
/// first run would have.
#[tokio::test]
async fn a_lost_batch_answer_is_recovered() {
    let proxy = LossyProxy::start(upstream()).await;
    let options = RedisOptions {
        key_prefix: common::unique_prefix(),
        ..RedisOptions::default()
    };
    let store = RedisStore::connect(&proxy.url(), options).await.unwrap();
    store.claim(&request("warm-up")).await.unwrap();
    let a = request("lost-batch-a");
    let b = request("lost-batch-b");
    proxy.lose_next_answer();
    let outcomes = store
        .claim_batch(&[a.clone(), b.clone(), a.clone()])
        .await
        .unwrap();
    assert!(proxy.lost_one(), "an answer was lost");
    assert!(
        matches!(outcomes[0], ClaimOutcome::Acquired(_)),
        "{outcomes:?}"
    );
    assert!(
        matches!(outcomes[1], ClaimOutcome::Acquired(_)),
        "{outcomes:?}"
    );
    assert!(
        matches!(outcomes[2], ClaimOutcome::InFlight { .. }),
        "{outcomes:?}"
    );
}

/// A record that does not decode is reported as corrupt, never replayed, never a panic.
async fn corrupt_records_are_reported(var: &str) {
    let store = common::connect(var).await;
    let mut conn = raw(var).await;
    let req = request("corrupt");
    let key = store.record_key(&req.id);
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg("token")
        .arg("not a number")
        .arg("state")
        .arg("completed")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(matches!(
        store.claim(&req).await,
        Err(Error::Corrupt { .. })
    ));
    assert!(matches!(
        store.get(&req.id).await,
        Err(Error::Corrupt { .. })
    ));
    assert!(matches!(
        store
            .complete(&req.id, idem_core::FencingToken::new(1), Bytes::new())
            .await,
        Err(Error::Corrupt { .. })
    ));
    // The operator's way out.
    assert!(store.inspector().unwrap().remove(&req.id).await.unwrap());
    assert!(matches!(
        store.claim(&req).await.unwrap(),
        ClaimOutcome::Acquired(_)
    ));

    // A hash without a token is a record too (not a fresh key), and a claim leaves it as
    // it is.
    let req = request("corrupt-no-token");
    let key = store.record_key(&req.id);
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg("response")
        .arg("r")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(matches!(
        store.claim(&req).await,
        Err(Error::Corrupt { .. })
    ));
    let fields: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(fields, vec![("response".to_owned(), "r".to_owned())]);
    assert!(store.inspector().unwrap().remove(&req.id).await.unwrap());

    // A string that is not a record the way a fresh claim writes it: reported, and left
    // as it is by every operation but the operator's remove.
    for garbage in [
        &b"c 1 2 3"[..],
        b"c x 1 1 1 ab cd",
        b"not a record",
        b"f",
        &full_form(b'x', 1.0),
        // Tokens that are not whole numbers below 2^53.
        &full_form(b'c', 1.5),
        &full_form(b'c', -2.0),
        &full_form(b'i', f64::NAN),
        &full_form(b'i', 2f64.powi(53)),
    ] {
        let req = request("corrupt-string");
        let key = store.record_key(&req.id);
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg(garbage)
            .query_async(&mut conn)
            .await
            .unwrap();
        let token = idem_core::FencingToken::new(1);
        assert!(
            matches!(store.claim(&req).await, Err(Error::Corrupt { .. })),
            "{garbage:?}"
        );
        assert!(matches!(
            store.get(&req.id).await,
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            store.complete(&req.id, token, Bytes::new()).await,
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            store.release(&req.id, token).await,
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            store.renew(&req.id, token, Duration::from_secs(1)).await,
            Err(Error::Corrupt { .. })
        ));
        assert_eq!(get_bytes(&mut conn, &key).await, garbage);
        assert!(store.inspector().unwrap().remove(&req.id).await.unwrap());
        assert!(matches!(
            store.claim(&req).await.unwrap(),
            ClaimOutcome::Acquired(_)
        ));
    }
}

#[tokio::test]
async fn standalone_corrupt_records_are_reported() {
    corrupt_records_are_reported(STANDALONE).await;
}

#[tokio::test]
async fn cluster_corrupt_records_are_reported() {
    corrupt_records_are_reported(CLUSTER).await;
}

/// Listing finds records on every master of the cluster, in id order.
#[tokio::test]
async fn cluster_listing_covers_every_master() {
    let store = common::connect(CLUSTER).await;
    let mut ids = Vec::new();
    for i in 0..60 {
        let req = request(&format!("list-{i}"));
        store.claim(&req).await.unwrap();
        ids.push(req.id);
    }
    ids.sort();
    let listed = store
        .inspector()
        .unwrap()
        .list(&idem_core::ListFilter {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    let listed: Vec<RecordId> = listed.iter().map(|r| r.id).collect();
    assert_eq!(listed, ids);
    assert!(
        store
            .get(&ids[0])
            .await
            .unwrap()
            .is_some_and(|r| matches!(r.state, RecordState::InFlight { .. }))
    );
}

#[tokio::test]
async fn configuration_errors_are_reported() {
    for url in [
        "http://127.0.0.1:1",
        "redis+cluster://",
        "rediss+cluster://a:1",
    ] {
        assert!(
            matches!(
                RedisStore::connect(url, RedisOptions::default()).await,
                Err(Error::InvalidRequest { .. })
            ),
            "{url}"
        );
    }
    let bad_prefix = RedisOptions {
        key_prefix: "a{b}".into(),
        ..RedisOptions::default()
    };
    assert!(matches!(
        RedisStore::connect(&common::url(STANDALONE), bad_prefix).await,
        Err(Error::InvalidRequest { .. })
    ));
    // Nothing listens on port 1.
    let options = RedisOptions {
        connect_timeout: Duration::from_millis(500),
        ..RedisOptions::default()
    };
    assert!(matches!(
        RedisStore::connect("redis://127.0.0.1:1", options).await,
        Err(Error::Unavailable { .. })
    ));
}
