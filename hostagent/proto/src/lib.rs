//! The link between the management node and its host agents: message types, framing and the
//! codec, shared by both ends, the link's TLS and the MN's certificate authority, and the
//! MN's end of the link.
//!
//! - [`msg`]: the handshake (protocol version, enrollment), commands and their replies (each
//!   with an id and a deadline, so a repeat is answered from the first result), events the
//!   agent pushes, heartbeats.
//! - [`net`]: a host's network as the MN wants it (bridges, flat DHCP), sent whole on every
//!   apply, and the names of what the agent makes for it.
//! - [`codec`]: length-prefixed frames of bincode, the link's one codec.
//! - [`tls`]: TLS 1.3 with a certificate on each end; the MN pins each host's certificate,
//!   the agent accepts only the MN's; the agent's key and certificates on disk.
//! - [`pki`]: the MN's CA and the one-time bootstrap secrets that enroll agents.
//! - [`qcow2`]: a qcow2 file's virtual size and backing file, read from its header.
//! - [`client`]: [`Link`], one TLS connection multiplexing requests by id, with heartbeats.
//!
//! This crate knows nothing of the runtime or the store: the agent depends on it alone.

pub mod client;
pub mod codec;
pub mod digest;
pub mod msg;
pub mod net;
pub mod pki;
pub mod qcow2;
pub mod tls;

pub use client::{Enrollment, Handshake, Link, LinkConfig, LinkError, Welcome};
pub use msg::*;
pub use tls::{Fingerprint, TlsError};
