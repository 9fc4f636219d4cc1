//! The link between the management node and its host agents: message types, framing and the
//! codec, shared by both ends, and the MN's end of the link.
//!
//! - [`msg`]: the handshake (protocol version and token), commands and their replies (each
//!   with an id and a deadline, so a repeat is answered from the first result), events the
//!   agent pushes, heartbeats.
//! - [`codec`]: length-prefixed frames of bincode, the link's one codec.
//! - [`client`]: [`Link`], one TCP connection multiplexing requests by id, with heartbeats.
//!
//! This crate knows nothing of the runtime or the store: the agent depends on it alone.

pub mod client;
pub mod codec;
pub mod msg;

pub use client::{Link, LinkConfig, LinkError, Welcome};
pub use msg::*;
