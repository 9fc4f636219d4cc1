//! The chaos harness, `strato-chaos`: proves Strato under load and faults, with real
//! processes driven through the HTTP API.
//!
//! Today it has the load run ([`load`]): a real management node and one agent process
//! simulating many hosts, many VMs created through the API, and the figures. The chaos run of
//! its own issue will add a seeded model-based workload, faults on a seeded schedule (kill -9,
//! partitions, dropped and delayed frames, slow and failing drivers, panics, store write
//! errors) and the invariant checks of DESIGN section 8. Nothing depends on this crate.

pub mod load;
