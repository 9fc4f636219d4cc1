//! The VM: its state machine today; its actor, records and flows as the slice grows.

pub mod state;
