//! `protloc serve`: an HTTP prediction endpoint for a run directory.
//!
//! - `options`: [`ServeOptions`] and the server's [`Limits`] (declared once, with defaults;
//!   the CLI flattens them).
//! - `request` / `response`: the JSON bodies, parsed and documented from the same types.
//! - `parse`: request bodies (JSON forms, FASTA, CSV) to validated sequences.
//! - `error`: [`ApiError`], the JSON error answer.
//! - `routes`: axum handlers, content negotiation, auth and limits.
//! - `queue`: [`MicroBatcher`], the server's token-budget micro-batching queue on dedicated
//!   inference threads.
//! - `state`: what the handlers share; `server`: binding, accept loop, graceful shutdown.
//! - `metrics`: Prometheus text. `openapi`: the OpenAPI document.
//!
//! The async runtime only parses, queues and answers; inference runs on its own threads,
//! so `/ping` and `/metrics` answer at once while a big batch computes.

pub mod error;
pub mod metrics;
pub mod openapi;
pub mod options;
pub mod parse;
pub mod queue;
pub mod request;
pub mod response;
pub mod routes;
pub mod server;
pub mod state;

pub use error::ApiError;
pub use options::{Limits, ServeOptions};
pub use queue::MicroBatcher;
pub use response::Info;
pub use server::{run, serve_on, spawn, ServerHandle};
pub use state::{build_state, AppState};
