//! Claims on Redis Cluster without the cluster connection's routing task: one multiplexed
//! connection per master, chosen by the key's hash slot from a slot map of the store's own.
//!
//! The driver's cluster connection hands every command to a task of its own, which passes
//! it to the node's connection and the answer back: two more task wake-ups per command,
//! which cost most when claims are sequential. Here a claim goes straight to the node the
//! slot map names. The map is only a guess; the node decides:
//!
//! - a node that does not serve the slot answers `MOVED` or `ASK` without running the
//!   script, as it does while the cluster is down or a node is loading (`CLUSTERDOWN`,
//!   `MASTERDOWN`, `TRYAGAIN`, `LOADING`); the claim then goes through the cluster
//!   connection, which follows redirections and waits out refusals, and a `MOVED` has the
//!   map read again (`CLUSTER SLOTS`) in the background;
//! - a slot the map does not know (no map yet, a master whose address is unknown or
//!   unreachable) goes through the cluster connection too, and has the map read again;
//! - when the node's connection fails, whether the script ran is unknown: the claim is sent
//!   again, with the same arguments and so the same holder nonce, through the cluster
//!   connection (which does the same after a failure of its own connections), the
//!   connection is set aside and the map read again, which connects anew.
//!
//! Sending a claim again is safe because the script recognises its own nonce (see the
//! crate documentation, "Lost answers"). Every other command keeps to the cluster
//! connection.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{
    AsyncConnectionConfig, Cmd, ConnectionAddr, ConnectionInfo, ProtocolVersion, RedisResult,
    ServerErrorKind, Value,
};

/// Hash slots in a Redis Cluster.
pub(crate) const SLOTS: usize = 16384;

/// A slot no known node serves.
const UNKNOWN: u16 = u16::MAX;

/// The least time between two readings of the slot map.
const REFRESH_INTERVAL: Duration = Duration::from_millis(200);

/// CRC16-XMODEM (polynomial 0x1021), one entry per byte value.
const CRC16_TABLE: [u16; 256] = {
    let mut table = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

fn crc16(bytes: &[u8]) -> u16 {
    bytes.iter().fold(0u16, |crc, &b| {
        (crc << 8) ^ CRC16_TABLE[usize::from((crc >> 8) as u8 ^ b)]
    })
}

/// The hash slot of a key, as Redis Cluster computes it: of the hash tag (the bytes between
/// the first `{` and the first `}` after it, when there are any) or else of the whole key.
pub(crate) fn key_slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    crc16(hashed) % SLOTS as u16
}

/// A master and the store's connection to it.
struct Node {
    host: String,
    port: u16,
    conn: MultiplexedConnection,
    /// The connection failed once: no more commands on it; the next map replaces it.
    failed: AtomicBool,
}

/// Which master serves each slot, as last read.
struct SlotMap {
    /// Per slot, an index into `nodes`, or [`UNKNOWN`].
    slots: Box<[u16]>,
    nodes: Vec<Arc<Node>>,
}

impl SlotMap {
    fn empty() -> Self {
        Self {
            slots: vec![UNKNOWN; SLOTS].into_boxed_slice(),
            nodes: Vec::new(),
        }
    }

    fn node(&self, slot: u16) -> Option<&Arc<Node>> {
        let index = *self.slots.get(usize::from(slot))?;
        self.nodes
            .get(usize::from(index))
            .filter(|node| !node.failed.load(Ordering::Relaxed))
    }
}

/// The slot ranges of a `CLUSTER SLOTS` reply, each with its master's address; ranges whose
/// master has no usable address (`""` or `"?"`: unknown to the node asked) are left out.
fn slot_ranges(reply: Value) -> Option<Vec<(u16, u16, String, u16)>> {
    let Value::Array(ranges) = reply else {
        return None;
    };
    let mut parsed = Vec::with_capacity(ranges.len());
    for range in ranges {
        let Value::Array(range) = range else {
            return None;
        };
        let (Some(start), Some(end), Some(Value::Array(master))) =
            (range.first(), range.get(1), range.get(2))
        else {
            return None;
        };
        let start: u16 = redis::from_redis_value_ref(start).ok()?;
        let end: u16 = redis::from_redis_value_ref(end).ok()?;
        let host: String = redis::from_redis_value_ref(master.first()?).ok()?;
        let port: u16 = redis::from_redis_value_ref(master.get(1)?).ok()?;
        if start > end || usize::from(end) >= SLOTS {
            return None;
        }
        if host.is_empty() || host == "?" {
            continue;
        }
        parsed.push((start, end, host, port));
    }
    Some(parsed)
}

/// Whether a node answered without running the command, because it does not serve the
/// slot or cannot serve it now.
fn not_run(value: &Value) -> Option<ServerErrorKind> {
    let Value::ServerError(e) = value else {
        return None;
    };
    e.kind().filter(|kind| {
        matches!(
            kind,
            ServerErrorKind::Moved
                | ServerErrorKind::Ask
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::MasterDown
                | ServerErrorKind::BusyLoading
        )
    })
}

/// Direct routes to the masters, with the cluster connection behind them.
pub(crate) struct Routes {
    cluster: ClusterConnection,
    /// A seed node's connection settings (credentials, protocol); each master's address
    /// replaces the seed's.
    template: ConnectionInfo,
    config: AsyncConnectionConfig,
    connect_timeout: Duration,
    /// The bound on a command, its fallback included: the cluster connection's own.
    overall_timeout: Duration,
    map: RwLock<Arc<SlotMap>>,
    /// A reading of the map is under way or planned.
    refreshing: AtomicBool,
    /// When the last reading started.
    last_refresh: std::sync::Mutex<Option<Instant>>,
    /// Commands that went through the cluster connection.
    fallbacks: AtomicU64,
}

impl Routes {
    /// Routes over `cluster`, connecting to the masters with the settings of `seed` (a
    /// `redis://` URL of the cluster). A node's reply is awaited `response_timeout`, a
    /// command with its fallback `overall_timeout`.
    pub(crate) fn new(
        cluster: ClusterConnection,
        seed: &str,
        connect_timeout: Duration,
        response_timeout: Duration,
        overall_timeout: Duration,
    ) -> RedisResult<Self> {
        let template = redis::IntoConnectionInfo::into_connection_info(seed)?;
        let redis_settings = template
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        Ok(Self {
            cluster,
            template: template.set_redis_settings(redis_settings),
            config: AsyncConnectionConfig::new()
                .set_connection_timeout(Some(connect_timeout))
                .set_response_timeout(Some(response_timeout)),
            connect_timeout,
            overall_timeout,
            map: RwLock::new(Arc::new(SlotMap::empty())),
            refreshing: AtomicBool::new(false),
            last_refresh: std::sync::Mutex::new(None),
            fallbacks: AtomicU64::new(0),
        })
    }

    /// The cluster connection.
    pub(crate) fn cluster(&self) -> ClusterConnection {
        self.cluster.clone()
    }

    fn map(&self) -> Arc<SlotMap> {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Sends `cmd`, whose one key is `key`, to the master the map names for the key's slot,
    /// or through the cluster connection (see the module documentation). Only for commands
    /// that are safe to send twice.
    pub(crate) async fn query(self: &Arc<Self>, cmd: &Cmd, key: &[u8]) -> RedisResult<Value> {
        tokio::time::timeout(self.overall_timeout, self.query_unbounded(cmd, key))
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "redis: no reply from the cluster in time",
                )
                .into())
            })
    }

    async fn query_unbounded(self: &Arc<Self>, cmd: &Cmd, key: &[u8]) -> RedisResult<Value> {
        let node = self.map().node(key_slot(key)).cloned();
        match node {
            Some(node) => {
                let mut conn = node.conn.clone();
                match conn.req_packed_command(cmd).await {
                    Ok(value) => match not_run(&value) {
                        None => return Ok(value),
                        Some(ServerErrorKind::Moved) => self.refresh_soon(),
                        Some(_) => {}
                    },
                    Err(e) => {
                        tracing::debug!(
                            error = %e,
                            node = %format_args!("{}:{}", node.host, node.port),
                            "redis: a node's connection failed; the command goes through the cluster connection"
                        );
                        node.failed.store(true, Ordering::Relaxed);
                        self.refresh_soon();
                    }
                }
            }
            None => self.refresh_soon(),
        }
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
        self.cluster.clone().req_packed_command(cmd).await
    }

    /// Reads the map again in the background, unless that is under way; not sooner than
    /// [`REFRESH_INTERVAL`] after the last reading.
    fn refresh_soon(self: &Arc<Self>) {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let wait = self
            .last_refresh
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map_or(Duration::ZERO, |at| {
                REFRESH_INTERVAL.saturating_sub(at.elapsed())
            });
        let routes: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            let Some(routes) = routes.upgrade() else {
                return;
            };
            if let Err(e) = routes.refresh().await {
                tracing::debug!(error = %e, "redis: reading the cluster's slot map failed");
            }
            routes.refreshing.store(false, Ordering::Release);
        });
    }

    /// Reads the slot map (`CLUSTER SLOTS` through the cluster connection) and connects to
    /// masters it has no working connection to. A master it cannot reach keeps its slots
    /// unknown, so they go through the cluster connection.
    pub(crate) async fn refresh(&self) -> RedisResult<()> {
        *self
            .last_refresh
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        let reply = self
            .cluster
            .clone()
            .route_command(
                redis::cmd("CLUSTER").arg("SLOTS").clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary),
            )
            .await?
            .extract_error()?;
        let ranges = slot_ranges(reply).ok_or_else(|| {
            redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "unexpected CLUSTER SLOTS reply",
            ))
        })?;

        let old = self.map();
        let mut addresses: Vec<(&str, u16)> = Vec::new();
        for (_, _, host, port) in &ranges {
            if !addresses.contains(&(host.as_str(), *port)) {
                addresses.push((host.as_str(), *port));
            }
        }
        let nodes = futures_util::future::join_all(
            addresses
                .iter()
                .map(|&(host, port)| self.node(&old, host, port)),
        )
        .await;

        let mut map = SlotMap::empty();
        for ((host, port), node) in addresses.into_iter().zip(nodes) {
            let Some(node) = node else { continue };
            let Ok(index) = u16::try_from(map.nodes.len()) else {
                break;
            };
            map.nodes.push(node);
            for (start, end, _, _) in ranges.iter().filter(|(_, _, h, p)| h == host && *p == port) {
                map.slots[usize::from(*start)..=usize::from(*end)].fill(index);
            }
        }
        *self.map.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(map);
        Ok(())
    }

    /// The working connection to a master: the one in `old`, or a new one.
    async fn node(&self, old: &SlotMap, host: &str, port: u16) -> Option<Arc<Node>> {
        if let Some(node) = old
            .nodes
            .iter()
            .find(|n| n.host == host && n.port == port && !n.failed.load(Ordering::Relaxed))
        {
            return Some(node.clone());
        }
        let info = self
            .template
            .clone()
            .set_addr(ConnectionAddr::Tcp(host.to_owned(), port));
        let connect = async {
            redis::Client::open(info)?
                .get_multiplexed_async_connection_with_config(&self.config)
                .await
        };
        match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(conn)) => Some(Arc::new(Node {
                host: host.to_owned(),
                port,
                conn,
                failed: AtomicBool::new(false),
            })),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "redis: connecting to {host}:{port} failed");
                None
            }
            Err(_) => {
                tracing::debug!("redis: connecting to {host}:{port} timed out");
                None
            }
        }
    }
}

#[cfg(test)]
impl Routes {
    /// Commands that went through the cluster connection so far.
    pub(crate) fn fallbacks(&self) -> u64 {
        self.fallbacks.load(Ordering::Relaxed)
    }

    /// Per slot, the address of the master the map names.
    pub(crate) fn addresses(&self) -> Vec<Option<(String, u16)>> {
        let map = self.map();
        map.slots
            .iter()
            .map(|&i| {
                map.nodes
                    .get(usize::from(i))
                    .map(|n| (n.host.clone(), n.port))
            })
            .collect()
    }

    /// Whether the map names a working connection for every slot.
    pub(crate) fn complete(&self) -> bool {
        let map = self.map();
        (0..SLOTS as u16).all(|slot| map.node(slot).is_some())
    }

    /// A stale map: every slot on the master of `slot`.
    pub(crate) fn pretend_every_slot_is_on_the_master_of(&self, slot: u16) {
        let old = self.map();
        let index = old.slots[usize::from(slot)];
        let map = SlotMap {
            slots: vec![index; SLOTS].into_boxed_slice(),
            nodes: old.nodes.clone(),
        };
        *self.map.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(map);
    }

    /// The direct connection to the master of `slot`.
    pub(crate) fn connection(&self, slot: u16) -> Option<MultiplexedConnection> {
        self.map().node(slot).map(|n| n.conn.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_computed_as_redis_cluster_does() {
        // The examples of the Redis Cluster specification and of CLUSTER KEYSLOT.
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(key_slot(b"somekey"), 11058);
        assert_eq!(key_slot(b"foo{hash_tag}"), 2515);
        assert_eq!(key_slot(b"hash_tag"), 2515);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"{user1000}.followers"), key_slot(b"user1000"));
        // An empty tag: the whole key.
        assert_eq!(key_slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % 16384);
        // The first '}' after the first '{'.
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
        assert_eq!(key_slot(b"foo{bar}{zap}"), key_slot(b"bar"));
        // No closing brace: the whole key.
        assert_eq!(key_slot(b"foo{bar"), crc16(b"foo{bar") % 16384);
        assert_eq!(key_slot(b""), 0);
    }

    #[test]
    fn slot_ranges_are_read_from_cluster_slots() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let range = |start: i64, end: i64, master: Value| {
            Value::Array(vec![
                Value::Int(start),
                Value::Int(end),
                master,
                node("10.0.0.9", 7000),
            ])
        };
        let reply = Value::Array(vec![
            range(0, 5460, node("10.0.0.1", 7001)),
            range(5461, 10922, node("?", 7002)),
            range(10923, 16383, node("10.0.0.3", 7003)),
        ]);
        assert_eq!(
            slot_ranges(reply).unwrap(),
            vec![
                (0, 5460, "10.0.0.1".to_owned(), 7001),
                (10923, 16383, "10.0.0.3".to_owned(), 7003)
            ]
        );
        assert!(slot_ranges(Value::Array(vec![range(0, 16384, node("a", 1))])).is_none());
        assert!(slot_ranges(Value::Int(1)).is_none());
    }
}
