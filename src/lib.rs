//! Tally: a real-time metrics node. See README.md and docs/ for the whole picture.

pub mod actors;
pub mod alerting;
pub mod alertmanager;
pub mod app;
pub mod audit;
pub mod auth;
pub mod background;
pub mod clock;
pub mod config;
pub mod demo;
pub mod domain;
pub mod experiments;
pub mod http;
pub mod ingest;
pub mod keys;
pub mod live;
pub mod lookups;
pub mod memory;
pub mod node;
pub mod read;
pub mod registry;
pub mod storage;
pub mod telemetry;
pub mod tenants;
