//! The link between the management node and its host agents: message types, framing and the
//! codec, shared by both ends.
//!
//! It will define the handshake (protocol version and token), commands and their replies
//! (each with an id and a deadline, so a repeat is answered from the first result), events
//! the agent pushes, heartbeats, length-prefixed frames encoded with bincode behind one codec
//! module, and the client side of the link with reconnects and backoff. It is empty until the
//! vertical-slice issue.
