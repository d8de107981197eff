//! Mutual TLS for every gRPC link of the cluster (gateway → coordinator, coordinator → worker, and the
//! command-line clients that speak gRPC). One [`ClusterTls`] per process holds its certificate, key
//! and the cluster CA, re-read from their files when they change (certificate rotation without a
//! restart); servers accept through [`incoming`] (a rustls handshake per connection, the client's
//! certificate verified against the CA) and clients connect through [`channel`] / [`connect`] (the
//! server's certificate verified against the same CA, this process's certificate presented).
//! [`dev`] issues a development CA and per-component certificates (`epserve certs`, `epserve up`).
//!
//! Boundaries: transport security only. Which peer may call which RPC is not decided here (every
//! certificate the cluster CA signed is a member of the cluster), nothing here touches the HTTP edge
//! (API keys are the gateway's) or etcd (whose client takes its own TLS options, see
//! `epserve-control`), and the crate never chooses between TLS and plaintext: the caller passes
//! `Option<&ClusterTls>`.

mod client;
pub mod dev;
mod errors;
mod identity;
mod server;

pub use client::{TlsConnector, channel, connect};
pub use errors::TlsError;
pub use identity::{ClusterTls, TlsFiles, crypto_provider};
pub use server::incoming;
