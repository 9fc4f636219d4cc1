//! What operators use beside the API: the actor-inspection debug console ([`console`], over
//! the `/debug/...` JSON and operator actions of [`debug`]) and Prometheus metrics
//! ([`metrics`]). All of it is the admin's alone.

pub mod console;
pub mod debug;
pub mod metrics;
