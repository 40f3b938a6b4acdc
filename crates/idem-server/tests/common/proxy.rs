//! A TCP proxy in front of a store server that can lose the answer to one chosen request:
//! the request reaches the server and runs there, and the connection then fails before the
//! answer gets back, so the client cannot know whether it took effect.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// What the armed proxy waits for.
#[derive(Clone)]
struct Arm {
    /// The first client write containing these bytes is the request whose answer is lost.
    pattern: Vec<u8>,
    /// The answer is complete once the server sent these bytes (for PostgreSQL the
    /// `ReadyForQuery` message, sent after the commit); `None`: its first bytes.
    until: Option<Vec<u8>>,
    /// Requests containing `pattern` to let through (answered) before the one whose answer
    /// is lost.
    skip: usize,
    /// From then on, cut every other connection and refuse new ones, until
    /// [`LossyProxy::heal`]: the server is unreachable, so the client cannot read back what
    /// happened.
    then_refuse: bool,
    /// Keep the connection open, answering nothing more on it, until
    /// [`LossyProxy::drop_held`]: the client waits for an answer that does not come.
    hold: bool,
}

#[derive(Default)]
struct State {
    arm: Mutex<Option<Arm>>,
    lost: AtomicU64,
    refusing: AtomicBool,
    /// Ends the connections holding an answer.
    drop_held: tokio::sync::Notify,
    held_dropped: AtomicBool,
    /// The open connections' forwarding tasks, by connection number.
    connections: Mutex<HashMap<u64, AbortHandle>>,
    next: AtomicU64,
}

pub struct LossyProxy {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

/// PostgreSQL's `ReadyForQuery` message with status idle: the server finished a request
/// and committed its implicit transaction.
pub const PG_READY_FOR_QUERY: &[u8] = b"Z\x00\x00\x00\x05I";

impl LossyProxy {
    /// A proxy on a loopback port that forwards every connection to `server`.
    pub async fn start(server: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let accepting = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if accepting.refusing.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(upstream) = TcpStream::connect(server).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = upstream.set_nodelay(true);
                let n = accepting.next.fetch_add(1, Ordering::SeqCst);
                let mut connections = accepting.connections.lock().unwrap();
                let task = tokio::spawn(forward(n, client, upstream, accepting.clone()));
                connections.insert(n, task.abort_handle());
            }
        });
        Self { addr, state, task }
    }

    /// Loses the answer to the next request that contains `pattern` (see [`Arm`]).
    pub fn lose_answer_to(&self, pattern: &[u8], until: Option<&[u8]>, then_refuse: bool) {
        self.lose_later_answer_to(pattern, until, then_refuse, 0);
    }

    /// Lets `skip` requests that contain `pattern` through, and loses the answer to the
    /// next one (see [`Arm`]).
    pub fn lose_later_answer_to(
        &self,
        pattern: &[u8],
        until: Option<&[u8]>,
        then_refuse: bool,
        skip: usize,
    ) {
        *self.state.arm.lock().unwrap() = Some(Arm {
            pattern: pattern.to_vec(),
            until: until.map(<[u8]>::to_vec),
            skip,
            then_refuse,
            hold: false,
        });
    }

    /// Holds back the answer to the next request that contains `pattern` (the request runs
    /// on the server), and every later answer on its connection, until
    /// [`drop_held`](Self::drop_held).
    pub fn hold_answer_to(&self, pattern: &[u8], until: Option<&[u8]>) {
        *self.state.arm.lock().unwrap() = Some(Arm {
            pattern: pattern.to_vec(),
            until: until.map(<[u8]>::to_vec),
            skip: 0,
            then_refuse: false,
            hold: true,
        });
    }

    /// Closes the connections holding an answer: the answer is lost.
    pub fn drop_held(&self) {
        self.state.held_dropped.store(true, Ordering::SeqCst);
        self.state.drop_held.notify_waiters();
    }

    /// How many answers were lost so far.
    pub fn lost(&self) -> u64 {
        self.state.lost.load(Ordering::SeqCst)
    }

    /// Accepts connections again.
    pub fn heal(&self) {
        self.state.refusing.store(false, Ordering::SeqCst);
    }
}

impl Drop for LossyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

async fn forward(n: u64, client: TcpStream, server: TcpStream, state: Arc<State>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    // Set once this connection carried the armed request: its answer is lost.
    let losing: Mutex<Option<Arm>> = Mutex::new(None);
    let requests = async {
        let mut buffer = vec![0u8; 64 * 1024];
        // The end of the previous read, so a pattern split across two reads is found.
        let mut tail: Vec<u8> = Vec::new();
        loop {
            let n_read = match client_read.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n_read) => n_read,
            };
            let mut window = std::mem::take(&mut tail);
            window.extend_from_slice(&buffer[..n_read]);
            let hit = {
                let mut arm = state.arm.lock().unwrap();
                match arm.as_mut() {
                    Some(a) if contains(&window, &a.pattern) && a.skip > 0 => {
                        a.skip -= 1;
                        // The pattern must not be found again in this request's bytes.
                        window.clear();
                        None
                    }
                    Some(a) if contains(&window, &a.pattern) => arm.take(),
                    _ => None,
                }
            };
            if let Some(arm) = hit {
                if arm.then_refuse {
                    state.refusing.store(true, Ordering::SeqCst);
                    let mut connections = state.connections.lock().unwrap();
                    let others: Vec<u64> =
                        connections.keys().copied().filter(|&m| m != n).collect();
                    for other in others {
                        if let Some(task) = connections.remove(&other) {
                            task.abort();
                        }
                    }
                }
                *losing.lock().unwrap() = Some(arm);
            }
            let keep = window.len().min(256);
            tail = window[window.len() - keep..].to_vec();
            if server_write.write_all(&buffer[..n_read]).await.is_err() {
                break;
            }
        }
    };
    let answers = async {
        let mut buffer = vec![0u8; 64 * 1024];
        let mut discarded: Vec<u8> = Vec::new();
        loop {
            let n_read = match server_read.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n_read) => n_read,
            };
            let arm = losing.lock().unwrap().clone();
            if let Some(arm) = arm {
                // The server ran the request; its answer is lost with the connection.
                discarded.extend_from_slice(&buffer[..n_read]);
                if arm.until.as_ref().is_none_or(|u| contains(&discarded, u)) {
                    state.lost.fetch_add(1, Ordering::SeqCst);
                    if arm.hold {
                        loop {
                            let dropped = state.drop_held.notified();
                            if state.held_dropped.load(Ordering::SeqCst) {
                                break;
                            }
                            dropped.await;
                        }
                    }
                    break;
                }
                continue;
            }
            if client_write.write_all(&buffer[..n_read]).await.is_err() {
                break;
            }
        }
    };
    // Either side ending ends the connection: both sockets close when this returns.
    tokio::select! {
        () = requests => {}
        () = answers => {}
    }
    state.connections.lock().unwrap().remove(&n);
}
