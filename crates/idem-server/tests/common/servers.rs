//! Private store servers for tests that stop and restart them: each test starts its own,
//! so stopping it disturbs no other test.
//!
//! - [`PgServer`]: PostgreSQL through `scripts/pg-server` (which runs it as the `postgres`
//!   user when the tests run as root), data in a temporary directory, restarted on the same
//!   port with the same data.
//! - [`RedisServer`]: `redis-server` on a free loopback port with `appendonly yes` and
//!   `appendfsync always` (every acknowledged write is on disk before the answer), killed
//!   with SIGKILL and restarted on the same port from its append-only file.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

/// A store server a test can stop and start again.
pub trait Control: Send {
    /// The URL the gateway connects to.
    fn url(&self) -> String;
    /// The address the server listens on.
    fn addr(&self) -> SocketAddr;
    /// Stops the server (at once, as in a crash), keeping its data; returns once it no
    /// longer accepts connections.
    fn stop(&mut self);
    /// Starts it again on the same port with the same data; returns once it accepts
    /// connections.
    fn restart(&mut self);
}

fn repository() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn accepts(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

/// Waits (up to a generous minute) until `addr` does or does not accept connections.
fn wait_until_accepting(addr: SocketAddr, accepting: bool) {
    for _ in 0..600 {
        if accepts(addr) == accepting {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "{addr} still {} connections after a minute",
        if accepting { "refuses" } else { "accepts" }
    );
}

/// A temporary directory the `postgres` user can traverse.
fn open_tempdir() -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir
}

/// A PostgreSQL server of the test's own, through `scripts/pg-server`.
pub struct PgServer {
    dir: TempDir,
    url: String,
    addr: SocketAddr,
}

impl PgServer {
    /// Whether PostgreSQL's server binaries are installed.
    pub fn available() -> bool {
        std::fs::read_dir("/usr/lib/postgresql").is_ok_and(|versions| {
            versions
                .flatten()
                .any(|v| v.path().join("bin/pg_ctl").exists())
        })
    }

    fn script(&self, command: &str) -> String {
        let output = Command::new(repository().join("scripts/pg-server"))
            .arg(command)
            .arg(self.dir.path().join("pg"))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "scripts/pg-server {command} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Starts a fresh server (fsync off, as for every test server).
    pub fn start() -> Self {
        let mut server = Self {
            dir: open_tempdir(),
            url: String::new(),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let printed = server.script("start");
        let url = printed
            .trim()
            .strip_prefix("export IDEM_TEST_POSTGRES_URL=")
            .unwrap_or_else(|| panic!("unexpected output of scripts/pg-server: {printed}"))
            .to_string();
        let port: u16 = std::fs::read_to_string(server.dir.path().join("pg/port"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        server.url = url;
        server.addr = SocketAddr::from(([127, 0, 0, 1], port));
        server
    }
}

impl Control for PgServer {
    fn url(&self) -> String {
        self.url.clone()
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn stop(&mut self) {
        self.script("stop-keep");
        wait_until_accepting(self.addr, false);
    }

    fn restart(&mut self) {
        self.script("restart");
        wait_until_accepting(self.addr, true);
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = Command::new(repository().join("scripts/pg-server"))
            .arg("stop")
            .arg(self.dir.path().join("pg"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A Redis server of the test's own, with an append-only file synced on every write.
pub struct RedisServer {
    dir: TempDir,
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Whether `redis-server` is installed.
    pub fn available() -> bool {
        Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn spawn(&self) -> std::io::Result<Child> {
        Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--logfile", "redis.log", "--daemonize", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
    }

    /// Starts it on a free loopback port below the ephemeral range, so no outgoing
    /// connection holds the port when the server starts again on it.
    pub fn start() -> Self {
        let mut server = Self {
            dir: tempfile::tempdir().unwrap(),
            port: 0,
            child: None,
        };
        let first = 20_000 + (std::process::id() % 5_000) as u16 * 2;
        for port in (first..first + 2_000).step_by(7) {
            if TcpListener::bind(("127.0.0.1", port)).is_err() {
                continue;
            }
            server.port = port;
            let mut child = server.spawn().unwrap();
            for _ in 0..100 {
                if accepts(server.addr()) {
                    server.child = Some(child);
                    return server;
                }
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            let log = server.dir.path().join("redis.log");
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(
                text.contains("Address already in use"),
                "redis-server did not start on port {port}: {text}"
            );
            let _ = std::fs::remove_file(log);
        }
        panic!("no free port for a redis-server");
    }
}

impl Control for RedisServer {
    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// SIGKILL: no chance to save anything; the append-only file has every acknowledged
    /// write.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
        wait_until_accepting(self.addr(), false);
    }

    fn restart(&mut self) {
        assert!(self.child.is_none(), "the server is running");
        self.child = Some(self.spawn().unwrap());
        wait_until_accepting(self.addr(), true);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
