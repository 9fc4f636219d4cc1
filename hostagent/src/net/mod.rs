//! The host's network: one trait, the real one ([`host::HostNet`]: bridges, VXLAN, flat
//! DHCP namespaces with dnsmasq, security groups and isolation in nftables, all made with
//! the host's own tools) and a fake
//! ([`SimNet`]) beside it for simulated hosts.
//!
//! The MN sends the whole desired state every time ([`NetworkConfig`]); an apply converges
//! the host to it and removes what the agent made before that is no longer wanted, so it is
//! safe to repeat, to interrupt and to run after anything was removed behind its back.
//! Applies run one at a time (the implementations hold a lock), since two converging at once
//! would each undo the other's half-made state.

use std::sync::Mutex;

use strato_proto::net::{DhcpReport, NetworkConfig, NetworkReport};
use strato_proto::{AgentError, InterfaceAddress};

pub mod dhcp;
pub mod firewall;
pub mod host;
pub mod metadata;
pub mod nft;
pub mod vip;

/// A host's network, as the agent manages it.
pub trait Network: Send + Sync + 'static {
    /// The host's IPv4 addresses, for its facts (where a VXLAN tunnel can end).
    fn addresses(&self) -> Result<Vec<InterfaceAddress>, AgentError>;
    /// Makes the host's network `config`: blocking, one apply at a time.
    fn apply(&self, config: &NetworkConfig) -> Result<NetworkReport, AgentError>;
    /// What the agent finds on the host now.
    fn status(&self) -> Result<NetworkReport, AgentError>;
}

/// The network of a simulated host: it keeps the last configuration applied and reports
/// it as made. Nothing on the machine changes, so thousands of simulated hosts can share it.
#[derive(Debug, Default)]
pub struct SimNet {
    applied: Mutex<NetworkConfig>,
}

impl Network for SimNet {
    fn addresses(&self) -> Result<Vec<InterfaceAddress>, AgentError> {
        Ok(Vec::new())
    }

    fn apply(&self, config: &NetworkConfig) -> Result<NetworkReport, AgentError> {
        let mut applied = self.applied.lock().expect("sim network lock");
        let changed = *applied != *config;
        *applied = config.clone();
        let mut report = sim_report(&applied);
        if changed {
            report.changes.push("configuration replaced".into());
        }
        Ok(report)
    }

    fn status(&self) -> Result<NetworkReport, AgentError> {
        Ok(sim_report(&self.applied.lock().expect("sim network lock")))
    }
}

fn sim_report(config: &NetworkConfig) -> NetworkReport {
    NetworkReport {
        bridges: config.bridges.iter().map(|b| b.name.clone()).collect(),
        dhcp: config
            .dhcp
            .iter()
            .map(|d| DhcpReport {
                l3: d.l3,
                namespace: format!("sim:{}", d.l3),
                pid: None,
                hosts: d.hosts.clone(),
            })
            .collect(),
        changes: Vec::new(),
    }
}
