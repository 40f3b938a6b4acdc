//! The route table: any set of patterns is accepted or rejected with a typed error, never a
//! panic; any path finds at most a route that was added, and an exact pattern finds
//! itself.

#![no_main]

use arbitrary::Arbitrary;
use http::Method;
use idem_tower::{Policy, Routes};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    patterns: Vec<(&'a str, bool)>,
    paths: Vec<&'a str>,
}

fuzz_target!(|input: Input<'_>| {
    let mut routes = Routes::new();
    let mut added = Vec::new();
    for (pattern, patch_only) in input.patterns.iter().take(16) {
        let policy = if *patch_only {
            Policy::new().with_methods([Method::PATCH])
        } else {
            Policy::new().with_methods([Method::POST])
        };
        if routes.add(pattern, policy).is_ok() {
            added.push(*pattern);
        }
    }
    assert_eq!(routes.len(), added.len());
    for path in input.paths.iter().take(16) {
        for method in [Method::POST, Method::PATCH, Method::GET] {
            if let Some(route) = routes.find(&method, path) {
                assert!(added.contains(&route.pattern()), "{:?}", route.pattern());
                assert!(route.policy().applies_to(&method));
                assert_ne!(method, Method::GET);
            }
        }
        let _ = idem_tower::scope_name("/*", path);
    }
    // A pattern of exact segments matches its own path.
    for pattern in &added {
        let exact = !pattern.contains(['{', '*']);
        if exact {
            let found = [Method::POST, Method::PATCH]
                .iter()
                .filter_map(|m| routes.find(m, pattern))
                .count();
            assert!(found >= 1, "{pattern:?} does not match itself");
        }
    }
});
