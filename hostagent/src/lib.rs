//! The host agent, `strato-agent`: the process on every KVM host that the management node
//! commands.
//!
//! It will serve one persistent link to the management node (framed by `strato-proto`),
//! run each command at most once per command id and never past its deadline, drive the
//! hypervisor through a driver trait (libvirt through the `virt` crate, and `sim`, a pure-Rust
//! hypervisor with configurable latency and failures for tests and large simulated clusters),
//! manage root volumes with qemu-img, and push domain lifecycle events as they happen.
//!
//! It depends only on `strato-proto`: never on the runtime, the store or the domain, so an
//! agent can be upgraded and reasoned about on its own. It is empty until the vertical-slice
//! issue.
