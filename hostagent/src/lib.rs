//! The host agent, `strato-agent`: the process on every KVM host that the management node
//! commands.
//!
//! - [`server`]: the link's agent end: TLS that admits the MN's certificate alone, one live
//!   MN session, the handshake, commands run at most once per id and never past their
//!   deadline, heartbeats, pushed events.
//! - [`credentials`]: the agent's certificate from its MN, or its bootstrap secret until it
//!   enrolls.
//! - [`driver`]: the hypervisor behind one trait: [`driver::libvirt`] through the `virt`
//!   crate, and [`driver::sim`], a pure-Rust hypervisor with latency and injected failures,
//!   for tests and for simulating many hosts from one process.
//! - [`net`]: the host's network behind one trait: [`net::host::HostNet`] makes bridges,
//!   VXLAN tunnels, flat DHCP namespaces with supervised dnsmasq and nftables isolation;
//!   [`net::SimNet`] keeps the desired state for simulated hosts.
//! - [`volumes`]: the image cache and qcow2 root volumes, with qemu-img.
//!
//! It depends only on `strato-proto`: never on the runtime, the store or the domain, so an
//! agent can be upgraded and reasoned about on its own.

pub mod credentials;
pub mod driver;
pub mod mount;
pub mod net;
pub mod server;
pub mod volumes;
