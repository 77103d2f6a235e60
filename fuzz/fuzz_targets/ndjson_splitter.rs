//! A request body through the splitter, as NDJSON and as JSON: every item is
//! a slice of the body, and NDJSON items hold no newline.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally::http::ingest::{split_events, BodyFormat};

fuzz_target!(|data: &[u8]| {
    if let Ok(items) = split_events(data, BodyFormat::Ndjson) {
        for item in items {
            assert!(!item.contains(&b'\n'));
            assert!(!item.is_empty());
        }
    }
    if let Ok(items) = split_events(data, BodyFormat::Json) {
        let total: usize = items.iter().map(|item| item.len()).sum();
        assert!(total <= data.len());
    }
});
