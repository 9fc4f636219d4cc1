//! The chaos harness, `strato-chaos`: proves Strato under faults.
//!
//! It will start a real management node and agent processes (in network namespaces when it
//! can), drive a seeded model-based random workload through the HTTP API, inject faults on a
//! seeded schedule (kill -9, partitions, dropped and delayed frames, slow and failing drivers,
//! panics, store write errors) and check the invariants of DESIGN section 8 against a recorded
//! history. Nothing depends on it. It is empty until the chaos issue.
