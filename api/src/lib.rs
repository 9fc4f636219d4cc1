//! The management node's front: the HTTP API and the `strato` binary.
//!
//! It serves the versioned HTTP API with axum in ZStack's v1 shape ([`routes`]), with async
//! jobs persisted before they are acknowledged ([`jobs`]), on a management node assembled in
//! [`mn`]. It is the only crate that speaks HTTP, and [`error`] is the one place where errors
//! of every layer are mapped to HTTP statuses and stable error codes. Every list answers ZStack's
//! queries ([`query`]). Still to come here: accounts, OpenAPI, `/metrics`, the debug console
//! and the CLI.
//!
//! The `strato` binary runs the main job (`strato up`: the server, a local agent and the
//! resources a first VM needs, [`up`]), the server alone (`strato server`), prints the
//! agents' token (`strato agent-token`), and keeps the runtime demonstration ([`demo`]).

pub mod auth;
pub mod catalog;
pub mod cli;
pub mod client;
pub mod demo;
pub mod error;
pub mod jobs;
pub mod metrics;
pub mod mn;
pub mod openapi;
pub mod query;
pub mod routes;
pub mod server;
pub mod store_source;
pub mod tagging;
pub mod up;
