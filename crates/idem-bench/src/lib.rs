//! Benchmark helpers for idem, run by hand (see `docs/benchmarks.md`):
//!
//! - `bench-upstream`: the fast upstream of the gateway benchmark, a hyper server that
//!   answers every `POST` with a small JSON body (optionally after a fixed delay) and counts
//!   them (`GET /stats`);
//! - `retained-keys`: memory per retained key and claim latency as the memory and embedded
//!   stores fill up to millions of completed records.
//!
//! The library part holds what both need: command-line flags and percentiles.

use std::time::Duration;

/// The value of `--name VALUE` in `args`, parsed; `default` when the flag is absent.
///
/// # Panics
///
/// When the value is missing or does not parse: these are hand-run tools.
pub fn flag<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    match args.iter().position(|a| a == name) {
        None => default,
        Some(at) => {
            let Some(value) = args.get(at + 1) else {
                panic!("{name} needs a value");
            };
            match value.parse() {
                Ok(parsed) => parsed,
                Err(_) => panic!("{name}: cannot parse {value:?}"),
            }
        }
    }
}

/// The `p`-th percentile (0 to 100) of sorted samples, by the nearest-rank method.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(percentile(&samples, 50.0), Duration::from_micros(50));
        assert_eq!(percentile(&samples, 99.0), Duration::from_micros(99));
        assert_eq!(percentile(&samples, 100.0), Duration::from_micros(100));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }

    #[test]
    fn flags_parse_or_default() {
        let args: Vec<String> = ["--delay-ms", "5"].iter().map(|s| s.to_string()).collect();
        assert_eq!(flag(&args, "--delay-ms", 0u64), 5);
        assert_eq!(flag(&args, "--other", 7u64), 7);
    }
}
