//! The OpenAI Batch API's groundwork (issue 18): the Files store ([`files`]), the checking of a
//! batch's input file ([`input`]), and the batch object with its life cycle and store ([`job`]). Not
//! yet served: no `/v1/files` or `/v1/batches` route and no runner exist in this tree
//! (docs/gateway.md, "Batch", says what is decided and what remains).

pub mod files;
pub mod input;
pub mod job;

pub use files::{FileObject, FileStore, StoreError};
pub use input::{BatchLine, Endpoint, LineError, LineRequest, MAX_INPUT_BYTES, MAX_INPUT_LINES, parse_input};
pub use job::{Batch, JobStore, JobStoreError, RequestCounts, Status};
