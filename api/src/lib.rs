//! The management node's front: the HTTP API and the `strato` binary.
//!
//! It serves the versioned HTTP API with axum in ZStack's v1 shape ([`routes`]), every API
//! declared once in [`catalog`] (which builds the router, the OpenAPI document in
//! [`openapi`] and the CLI's commands in [`cli`]), with async jobs persisted before they are
//! acknowledged ([`jobs`]), on a management node assembled in [`mn`]. Accounts, sessions
//! and who may reach what are in [`auth`]; tags in [`tagging`]; Prometheus metrics in
//! [`metrics`]. It is the only crate that speaks HTTP, and [`error`] is the one place where
//! errors of every layer are mapped to HTTP statuses and stable error codes. Every list
//! answers ZStack's queries ([`query`], over the store through [`store_source`]). The debug
//! console is [`console`] (the page) over [`debug`] (`/debug/...` JSON and operator actions).
//!
//! The `strato` binary runs the main job (`strato up`: the server, a local agent and the
//! resources a first VM needs, [`up`]), the server alone (`strato server`), writes the
//! bootstrap files that enroll agents (`strato agent-bootstrap`), prints the OpenAPI
//! document (`strato openapi`), is the client (`strato <ApiName> ...`, `strato shell`), and
//! keeps the runtime demonstration ([`demo`]).

pub mod auth;
pub mod catalog;
pub mod cli;
pub mod client;
pub mod console;
pub mod debug;
pub mod demo;
pub mod error;
pub mod exposure;
pub mod jobs;
pub mod login;
pub mod metrics;
pub mod mn;
pub mod openapi;
pub mod query;
pub mod routes;
pub mod server;
pub mod store_source;
pub mod tagging;
pub mod up;
pub mod validate;
