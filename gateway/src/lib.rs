//! The gateway: the OpenAI-compatible HTTP API in front of the coordinators. It owns the tokenizer
//! and the chat template of the checkpoint, incremental detokenization and stop strings, API-key
//! authentication, and the choice of a coordinator (healthy, least loaded; a request that has not
//! produced a token yet is retried on another). [`run`](mod@run) is the gateway process's lifecycle:
//! registration and discovery of the ready coordinators.
//!
//! Chat requests may carry images ([`images`]): they are decoded and cut into tiles here, and travel
//! to the coordinator as uint8 tiles with the prompt whose `<|patch|>` runs their features fill.
//!
//! `response_format` and tools become a grammar ([`constraints`], checked here, enforced by the
//! coordinator), and an answer that calls tools is read back as OpenAI tool calls ([`tool_calls`]).
//!
//! Boundaries: no model weights, no sampling (the coordinator's), no state beyond requests in flight.

pub mod batch;
pub mod chat_template;
pub mod completions;
pub mod constraints;
pub mod drain;
pub mod edge;
pub mod errors;
pub mod images;
pub mod openai;
pub mod routing;
pub mod run;
pub mod server;
pub mod text;
pub mod tool_calls;

pub use edge::EdgeConfig;
pub use images::{ImageConfig, ImageInput};
pub use routing::CoordinatorPool;
pub use run::{GatewayConfig, ReadyGateway, RunError, run, served_model_name, start};
pub use server::{AppState, router};
pub use text::TextCodec;
