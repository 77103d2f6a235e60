//! A config file through the loader and the checker, with one environment
//! override: problems come back as issues, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let env = vec![("TALLY_SERVER__LISTEN".to_string(), "127.0.0.1:0".to_string())];
    if let Ok(config) = tally::config::Config::parse(text, env) {
        let _ = config.check();
    }
});
