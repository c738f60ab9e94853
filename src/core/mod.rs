//! The service's core, free of HTTP: the model registry, the per-device inference scheduler, versions and
//! aliases, the jobs that edit models on the per-device edit worker, and the datasets and evaluations that
//! score versions.

pub mod caller;
pub mod cpu_pool;
pub mod datasets;
pub mod directories;
pub mod edit_worker;
mod error;
pub mod evaluations;
pub mod exemplars;
pub mod jobs;
pub mod registry;
pub mod scheduler;
pub mod versions;

pub use error::{Conflict, CoreError, Resource};
