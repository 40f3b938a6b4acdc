//! Prometheus metrics: what the idempotency layer did, how long the store took, what the
//! upstream did, and the configured windows.
//!
//! Each gateway owns its recorder (nothing is installed globally), so several gateways in
//! one process (tests, the demo) keep separate counts. `GET /metrics` on the admin
//! listener renders it.
//!
//! | metric | type | labels | meaning |
//! |---|---|---|---|
//! | `idem_requests_total` | counter | `route`, `outcome` | what the layer did with a request (one request may count twice: `waited`, then `replayed`) |
//! | `idem_releases_total` | counter | `route`, `reason` | claims released without a stored answer (a retry executes again) |
//! | `idem_store_latency_seconds` | histogram | `op`, `result` | store operation latency |
//! | `idem_in_flight_requests` | gauge | | requests executing upstream under a claim in this gateway |
//! | `idem_upstream_requests_total` | counter | `result` | upstream calls: `ok`, `connect_error`, `timeout`, `connection_lost` |
//! | `idem_route_retention_seconds` | gauge | `route`, `methods` | the replay window of each route |
//! | `idem_route_lease_seconds` | gauge | `route`, `methods` | the lease of each route |
//! | `idem_late_retries_total` | counter | `route` | requests that executed again because their record's retention had ended within `late_retry_window` (see [`late`](crate::late)) |
//! | `idem_connections_rejected_total` | counter | | connections closed at once because `max_connections` were open |

use std::sync::Arc;
use std::time::Duration;

use idem_tower::{Event, IdempotencyEvents, Routes, StoreOp};
use std::collections::HashMap;
use std::sync::{OnceLock, PoisonError, RwLock};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Level, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

const REQUESTS: &str = "idem_requests_total";
const RELEASES: &str = "idem_releases_total";
const STORE_LATENCY: &str = "idem_store_latency_seconds";
const IN_FLIGHT: &str = "idem_in_flight_requests";
const UPSTREAM: &str = "idem_upstream_requests_total";
const RETENTION: &str = "idem_route_retention_seconds";
const LEASE: &str = "idem_route_lease_seconds";
const LATE_RETRIES: &str = "idem_late_retries_total";
const CONNECTIONS_REJECTED: &str = "idem_connections_rejected_total";

/// Store latency buckets, in seconds: from a memory store's microseconds to a slow
/// network round trip.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// The gateway's metrics; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    recorder: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
    handles: Arc<Handles>,
}

/// Handles already registered, by their labels. Registering a metric hashes and compares
/// its whole key (name and labels, built as owned strings) in the registry; a request
/// records four or five metrics, so they are looked up here instead, by borrowed labels.
#[derive(Default)]
struct Handles {
    /// Route-labelled counters: route, then (metric name, the second label's value).
    routed: RwLock<HashMap<Box<str>, RouteCounters>>,
    /// Store latencies: (operation, succeeded).
    latencies: RwLock<HashMap<(&'static str, bool), Histogram>>,
    /// Upstream calls, by result.
    upstream: RwLock<HashMap<&'static str, Counter>>,
    in_flight: OnceLock<Gauge>,
}

/// One route's counters, by (metric name, the second label's value).
type RouteCounters = HashMap<(&'static str, &'static str), Counter>;

/// The handle cached under `key` in `map`, registered with `register` the first time.
fn cached<K, Q, H>(map: &RwLock<HashMap<K, H>>, key: &Q, register: impl FnOnce() -> (K, H)) -> H
where
    K: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
    Q: std::hash::Hash + Eq + ?Sized,
    H: Clone,
{
    if let Some(handle) = map.read().unwrap_or_else(PoisonError::into_inner).get(key) {
        return handle.clone();
    }
    let (key, handle) = register();
    map.write()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(key)
        .or_insert(handle)
        .clone()
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// How the upstream call of one request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamResult {
    /// Response headers arrived.
    Ok,
    /// The connection could not be made: the request was not sent.
    ConnectError,
    /// No answer within the upstream timeout.
    Timeout,
    /// The connection failed after the request was sent.
    ConnectionLost,
}

impl UpstreamResult {
    fn as_str(self) -> &'static str {
        match self {
            UpstreamResult::Ok => "ok",
            UpstreamResult::ConnectError => "connect_error",
            UpstreamResult::Timeout => "timeout",
            UpstreamResult::ConnectionLost => "connection_lost",
        }
    }
}

static METADATA: Metadata<'static> = Metadata::new("idem", Level::INFO, Some(module_path!()));

impl Metrics {
    /// An empty set of metrics, with their descriptions.
    pub fn new() -> Self {
        let builder = PrometheusBuilder::new();
        let builder = builder
            .set_buckets_for_metric(Matcher::Full(STORE_LATENCY.into()), LATENCY_BUCKETS)
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        let metrics = Self {
            recorder: Arc::new(recorder),
            handle,
            handles: Arc::default(),
        };
        metrics.describe();
        metrics
    }

    fn describe(&self) {
        let describe = |name: &'static str, unit: Option<Unit>, text: &'static str| {
            self.recorder
                .describe_counter(KeyName::from_const_str(name), unit, text.into());
        };
        describe(
            REQUESTS,
            None,
            "Requests the idempotency layer handled, by route pattern and outcome.",
        );
        describe(
            RELEASES,
            None,
            "Claims released without a stored answer (a retry executes again), by reason.",
        );
        describe(
            UPSTREAM,
            None,
            "Calls to the upstream, by result (ok, connect_error, timeout, connection_lost).",
        );
        describe(
            LATE_RETRIES,
            None,
            "Requests executed again because their key's retention had ended shortly before.",
        );
        describe(
            CONNECTIONS_REJECTED,
            None,
            "Client connections closed at once because max_connections were open.",
        );
        self.recorder.describe_histogram(
            KeyName::from_const_str(STORE_LATENCY),
            Some(Unit::Seconds),
            "Latency of idempotency store operations, by operation and result.".into(),
        );
        self.recorder.describe_gauge(
            KeyName::from_const_str(IN_FLIGHT),
            None,
            "Requests executing upstream under a claim in this gateway.".into(),
        );
        self.recorder.describe_gauge(
            KeyName::from_const_str(RETENTION),
            Some(Unit::Seconds),
            "How long each route replays a completed request.".into(),
        );
        self.recorder.describe_gauge(
            KeyName::from_const_str(LEASE),
            Some(Unit::Seconds),
            "How long a claim holds a key on each route without renewal.".into(),
        );
        // Present from the start, so dashboards see zero rather than nothing.
        self.gauge(IN_FLIGHT, Vec::new()).set(0.0);
    }

    fn counter(&self, name: &'static str, labels: Vec<Label>) -> Counter {
        self.recorder
            .register_counter(&Key::from_parts(name, labels), &METADATA)
    }

    fn gauge(&self, name: &'static str, labels: Vec<Label>) -> Gauge {
        self.recorder
            .register_gauge(&Key::from_parts(name, labels), &METADATA)
    }

    /// Publishes the retention and lease of every route.
    pub fn routes(&self, routes: &Routes) {
        for route in routes.iter() {
            let methods = route
                .policy()
                .methods()
                .iter()
                .map(|m| m.as_str())
                .collect::<Vec<_>>()
                .join(",");
            let labels = || {
                vec![
                    Label::new("route", route.pattern().to_string()),
                    Label::new("methods", methods.clone()),
                ]
            };
            self.gauge(RETENTION, labels())
                .set(route.policy().retention().as_secs_f64());
            self.gauge(LEASE, labels())
                .set(route.policy().lease().as_secs_f64());
        }
    }

    /// Counts a late retry on a route.
    pub fn late_retry(&self, route: &str) {
        self.counter(LATE_RETRIES, vec![Label::new("route", route.to_string())])
            .increment(1);
    }

    /// Counts a connection refused over `max_connections`.
    pub fn connection_rejected(&self) {
        self.counter(CONNECTIONS_REJECTED, Vec::new()).increment(1);
    }

    /// Counts an upstream call.
    pub fn upstream(&self, result: UpstreamResult) {
        let result = result.as_str();
        cached(&self.handles.upstream, result, || {
            (
                result,
                self.counter(UPSTREAM, vec![Label::new("result", result)]),
            )
        })
        .increment(1);
    }

    /// Counts a request executing upstream under a claim until the guard is dropped.
    pub fn in_flight(&self) -> InFlightGuard {
        let gauge = self
            .handles
            .in_flight
            .get_or_init(|| self.gauge(IN_FLIGHT, Vec::new()))
            .clone();
        gauge.increment(1.0);
        InFlightGuard(gauge)
    }

    /// The counter `name` of `route` whose second label (`label`) is `value`.
    fn routed(
        &self,
        name: &'static str,
        route: &str,
        label: &'static str,
        value: &'static str,
    ) -> Counter {
        let handles = &self.handles.routed;
        let found = handles
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(route)
            .and_then(|by_value| by_value.get(&(name, value)).cloned());
        if let Some(counter) = found {
            return counter;
        }
        let counter = self.counter(
            name,
            vec![
                Label::new("route", route.to_string()),
                Label::new(label, value),
            ],
        );
        handles
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(route.into())
            .or_default()
            .entry((name, value))
            .or_insert(counter)
            .clone()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.handle.render()
    }
}

/// Decrements the in-flight gauge when dropped.
#[derive(Debug)]
pub struct InFlightGuard(Gauge);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

impl IdempotencyEvents for Metrics {
    fn event(&self, route: &str, event: Event) {
        match event {
            Event::Released(reason) => self.routed(RELEASES, route, "reason", reason.as_str()),
            other => self.routed(REQUESTS, route, "outcome", other.as_str()),
        }
        .increment(1);
    }

    fn store_latency(&self, op: StoreOp, elapsed: Duration, ok: bool) {
        let key = (op.as_str(), ok);
        cached(&self.handles.latencies, &key, || {
            let labels = vec![
                Label::new("op", key.0),
                Label::new("result", if ok { "ok" } else { "error" }),
            ];
            let histogram = self
                .recorder
                .register_histogram(&Key::from_parts(STORE_LATENCY, labels), &METADATA);
            (key, histogram)
        })
        .record(elapsed.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_events_latencies_and_routes() {
        let metrics = Metrics::new();
        metrics.event("/v1/charges", Event::Executed);
        metrics.event("/v1/charges", Event::Replayed);
        metrics.event("/v1/charges", Event::Replayed);
        metrics.event(
            "/v1/charges",
            Event::Released(idem_tower::ReleaseReason::RetryableStatus),
        );
        metrics.store_latency(StoreOp::Claim, Duration::from_millis(2), true);
        metrics.upstream(UpstreamResult::Timeout);
        let guard = metrics.in_flight();
        metrics.routes(&Routes::new());
        let text = metrics.render();
        assert!(
            text.contains(r#"idem_requests_total{route="/v1/charges",outcome="replayed"} 2"#),
            "{text}"
        );
        assert!(text.contains(r#"reason="retryable_status""#), "{text}");
        assert!(text.contains("idem_store_latency_seconds_bucket"), "{text}");
        assert!(text.contains("idem_in_flight_requests 1"), "{text}");
        drop(guard);
        assert!(metrics.render().contains("idem_in_flight_requests 0"));
    }

    #[test]
    fn cached_handles_keep_routes_outcomes_and_results_apart() {
        let metrics = Metrics::new();
        for _ in 0..3 {
            metrics.event("/a", Event::Executed);
            metrics.event("/b", Event::Replayed);
            metrics.store_latency(StoreOp::Claim, Duration::from_millis(1), true);
            metrics.upstream(UpstreamResult::Ok);
        }
        metrics.event("/a", Event::Replayed);
        metrics.event(
            "/b",
            Event::Released(idem_tower::ReleaseReason::RetryableStatus),
        );
        metrics.store_latency(StoreOp::Claim, Duration::from_millis(1), false);
        metrics.upstream(UpstreamResult::Timeout);
        let text = metrics.render();
        for line in [
            r#"idem_requests_total{route="/a",outcome="executed"} 3"#,
            r#"idem_requests_total{route="/a",outcome="replayed"} 1"#,
            r#"idem_requests_total{route="/b",outcome="replayed"} 3"#,
            r#"idem_releases_total{route="/b",reason="retryable_status"} 1"#,
            r#"idem_store_latency_seconds_count{op="claim",result="ok"} 3"#,
            r#"idem_store_latency_seconds_count{op="claim",result="error"} 1"#,
            r#"idem_upstream_requests_total{result="ok"} 3"#,
            r#"idem_upstream_requests_total{result="timeout"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert!(!text.contains(r#"route="/b",outcome="executed""#), "{text}");
    }
}
