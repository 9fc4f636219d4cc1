//! The management node's front: the HTTP API and the `strato` binary.
//!
//! This crate will serve the versioned HTTP API with axum (resource endpoints generated from
//! one declaration per resource kind, the query engine, sessions and accounts, async jobs),
//! the OpenAPI document, `/metrics`, the debug console and its `/debug` JSON, and the `strato`
//! command-line client. It is the only crate that speaks HTTP, and the one place where
//! errors of every layer are mapped to HTTP statuses and stable error codes.
//!
//! Until the management node exists, the `strato` binary runs a demonstration of the
//! runtime ([`demo`]): the README's main command starts it.

pub mod demo;
