//! The connection: a self-reconnecting standalone connection or a Redis Cluster connection,
//! behind one type the scripts run on.

use idem_core::Error;
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// Where the store connects, from its URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// `redis://host:port[/db]`, passed to the driver as is.
    Standalone(String),
    /// `redis+cluster://host:port,host:port,...`: one `redis://` URL per seed node.
    Cluster(Vec<String>),
}

const CLUSTER_SCHEME: &str = "redis+cluster://";

impl Target {
    pub(crate) fn parse(url: &str) -> Result<Self, Error> {
        let invalid = |why: &str| Error::InvalidRequest {
            reason: format!("invalid Redis URL: {why}"),
        };
        let Some(rest) = url.strip_prefix(CLUSTER_SCHEME) else {
            if !url.starts_with("redis://")
                && !url.starts_with("redis+unix://")
                && !url.starts_with("unix://")
            {
                return Err(invalid(
                    "expected redis://host:port[/db] or redis+cluster://host:port,host:port,...",
                ));
            }
            return Ok(Target::Standalone(url.to_owned()));
        };
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        if !path.is_empty() {
            return Err(invalid(
                "a Redis Cluster URL takes no database or options (a cluster has only database 0)",
            ));
        }
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (Some(userinfo), hosts),
            None => (None, authority),
        };
        let nodes: Vec<String> = hosts
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(|host| match userinfo {
                Some(userinfo) => format!("redis://{userinfo}@{host}"),
                None => format!("redis://{host}"),
            })
            .collect();
        if nodes.is_empty() {
            return Err(invalid("a Redis Cluster URL needs at least one host:port"));
        }
        Ok(Target::Cluster(nodes))
    }
}

/// The connection every operation runs on; cloning it is cheap and shares the connection.
#[derive(Clone)]
pub(crate) enum Conn {
    /// Reconnects by itself after a failure.
    Standalone(ConnectionManager),
    /// Routes each command by its key's slot; follows redirections and failovers.
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Standalone(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Standalone(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Standalone(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_pick_the_mode() {
        assert_eq!(
            Target::parse("redis://127.0.0.1:6379/2").unwrap(),
            Target::Standalone("redis://127.0.0.1:6379/2".into())
        );
        assert_eq!(
            Target::parse("redis+cluster://a:1, b:2,c:3").unwrap(),
            Target::Cluster(vec![
                "redis://a:1".into(),
                "redis://b:2".into(),
                "redis://c:3".into()
            ])
        );
        assert_eq!(
            Target::parse("redis+cluster://user:secret@a:1,b:2/").unwrap(),
            Target::Cluster(vec![
                "redis://user:secret@a:1".into(),
                "redis://user:secret@b:2".into()
            ])
        );
        for bad in [
            "http://x",
            "rediss+cluster://a:1",
            "redis+cluster://",
            "redis+cluster://a:1/3",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }
}
