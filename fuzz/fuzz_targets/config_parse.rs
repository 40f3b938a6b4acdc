//! The gateway's TOML configuration: any text is a configuration or a `ConfigError` that
//! names a field, never a panic.

#![no_main]

use idem_server::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_toml(text) {
        Ok(config) => {
            assert!(!config.routes.is_empty());
            for route in config.routes.iter() {
                assert!(route.policy().validate().is_ok());
            }
        }
        Err(error) => {
            assert!(!error.field.is_empty());
            let _ = error.to_string();
        }
    }
});
