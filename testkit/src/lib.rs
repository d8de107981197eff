//! Support for the workspace's tests: a dev-dependency only. It depends on no epserve crate, so that
//! any crate's own unit tests (the model's included) can use it.

pub mod fixtures;
