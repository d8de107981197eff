//! Test support shared by the crates' tests and the end-to-end tests in `tests/`: a throw-away etcd
//! server ([`etcd_server::EtcdServer`]), the `epserve` binary the end-to-end tests start
//! ([`epserve_binary`]) and the location of the fixtures kept in the repository.
//!
//! Boundaries: a dev-dependency only, never a dependency of a serving crate; it depends on no
//! epserve crate, so that any crate's unit tests (the model's included) can use it.

mod binary;
pub mod etcd_server;
pub mod fixtures;
pub mod golden;

pub use binary::epserve_binary;

/// The repository's root directory (this crate sits one level below it).
pub fn repository_root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}
