//! A live client message through the parser: a message or an error to
//! answer with, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = tally::live::protocol::parse_client_message(text);
    }
});
