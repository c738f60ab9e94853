//! editserve: an HTTP inference-and-edit service for image classifiers.
//!
//! Layers, top to bottom: `api` (HTTP) over `core` (registry, scheduler) over `models` (architectures on
//! tch) and `imaging` (decoding, preprocessing).

pub mod alloc;
pub mod api;
pub mod cli;
pub mod config;
pub mod core;
pub mod edit;
pub mod imaging;
pub mod models;
pub mod server;
pub mod store;
pub mod telemetry;
