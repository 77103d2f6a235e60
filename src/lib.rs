//! Tally: a real-time metrics node. See README.md and docs/ for the whole picture.

pub mod domain;
