//! Faults on a seeded schedule.
//!
//! The whole schedule is drawn from the seed before the run starts, so the same seed gives
//! the same faults at the same times. Faults live on lanes (the MN, and each host) and never
//! overlap on one lane: one host is not killed while it is partitioned, for instance. The
//! MN's host ping bound is about 8 s (2 s interval, 2 s timeout, 3 misses), so partitions are
//! drawn below it (the link must survive) and above it (the host must go Disconnected and
//! come back).

use std::time::Duration;

use crate::cluster::Cluster;
use crate::proxy::FrameFaults;

/// The failpoints a faulty MN runs with: panics inside actor operations (at their start, and
/// between two agent commands of a VM start) and store write errors.
pub const MN_FAILPOINTS: &str =
    "actor-op=1%panic;vm-start-after-define=15%panic;store-apply=1%return";

/// One fault.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// kill -9 the MN, restart it after `down`.
    KillMn { down: Duration },
    /// Restart the MN with [`MN_FAILPOINTS`] armed for `length`, then restart it clean (each
    /// restart is a kill -9).
    FaultyMn { length: Duration },
    /// kill -9 an agent, restart it after `down`.
    KillAgent { host: usize, down: Duration },
    /// Cut a host's link for `length`.
    Partition { host: usize, length: Duration },
    /// Cut and heal a host's link `cycles` times.
    Flap { host: usize, cycles: u32, cut: Duration, healed: Duration },
    /// Drop, duplicate and delay TLS records on a host's link for `length` (a dropped or
    /// duplicated record ends the connection: TLS detects it).
    Frames { host: usize, faults: FrameFaults, length: Duration },
    /// Restart an agent with every driver call slowed by `latency`, for `length`.
    SlowDriver { host: usize, latency: Duration, length: Duration },
    /// Restart an agent whose driver fails calls with probability `p`, for `length`.
    DriverErrors { host: usize, p: f64, length: Duration },
    /// kill -9 every dnsmasq a host's agent runs (its supervisor must start them again).
    KillDnsmasq { host: usize },
    /// Remove one of the namespaces a host's agent made, with what runs in it.
    RemoveNamespace { host: usize },
    /// Delete one of the nft tables a host's agent made.
    RemoveTable { host: usize },
    /// Remove a namespace, ask the MN to reconnect the host (a whole apply follows), and
    /// kill -9 its agent `after` that, in the middle of the apply; start it again 1 s later.
    KillAgentMidApply { host: usize, after: Duration },
}

impl Fault {
    /// The lane: `None` for the MN, the host's index otherwise.
    fn lane(&self) -> Option<usize> {
        match self {
            Fault::KillMn { .. } | Fault::FaultyMn { .. } => None,
            Fault::KillAgent { host, .. }
            | Fault::Partition { host, .. }
            | Fault::Flap { host, .. }
            | Fault::Frames { host, .. }
            | Fault::SlowDriver { host, .. }
            | Fault::DriverErrors { host, .. }
            | Fault::KillDnsmasq { host }
            | Fault::RemoveNamespace { host }
            | Fault::RemoveTable { host }
            | Fault::KillAgentMidApply { host, .. } => Some(*host),
        }
    }

    /// How long it lasts.
    pub fn length(&self) -> Duration {
        match self {
            Fault::KillMn { down } | Fault::KillAgent { down, .. } => *down,
            Fault::FaultyMn { length }
            | Fault::Partition { length, .. }
            | Fault::Frames { length, .. }
            | Fault::SlowDriver { length, .. }
            | Fault::DriverErrors { length, .. } => *length,
            Fault::Flap { cycles, cut, healed, .. } => (*cut + *healed) * *cycles,
            Fault::KillDnsmasq { .. }
            | Fault::RemoveNamespace { .. }
            | Fault::RemoveTable { .. } => Duration::ZERO,
            Fault::KillAgentMidApply { after, .. } => *after + Duration::from_secs(1),
        }
    }
}

/// A fault and when it starts (from the start of the workload).
#[derive(Clone, Debug, PartialEq)]
pub struct Scheduled {
    /// When.
    pub at: Duration,
    /// What.
    pub fault: Fault,
}

fn secs(rng: &mut fastrand::Rng, low: f64, high: f64) -> Duration {
    Duration::from_secs_f64(low + rng.f64() * (high - low))
}

/// Draws the schedule for a run of `duration` on `hosts` hosts. Faults end at least 5 s
/// before the run does, so the checks see the cluster heal. With `network` (the agents make
/// their hosts' networks), faults on those networks are drawn from a stream of their own
/// into the gaps of the hosts' lanes, so a seed's other faults stay what they were.
pub fn schedule(seed: u64, duration: Duration, hosts: usize, network: bool) -> Vec<Scheduled> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut busy_until: Vec<Duration> = vec![Duration::ZERO; hosts + 1];
    let mut faults = Vec::new();
    let end = duration.saturating_sub(Duration::from_secs(5));
    let mut at = secs(&mut rng, 2.0, 4.0);
    while at < end {
        let host = rng.usize(..hosts.max(1));
        let fault = match rng.u32(..100) {
            0..=11 => Fault::KillMn { down: secs(&mut rng, 0.2, 2.0) },
            12..=19 => Fault::FaultyMn { length: secs(&mut rng, 5.0, 12.0) },
            20..=34 => Fault::KillAgent { host, down: secs(&mut rng, 0.2, 3.0) },
            35..=44 => Fault::Partition { host, length: secs(&mut rng, 1.0, 4.0) },
            45..=54 => Fault::Partition { host, length: secs(&mut rng, 10.0, 16.0) },
            55..=62 => Fault::Flap {
                host,
                cycles: rng.u32(3..6),
                cut: secs(&mut rng, 0.5, 3.0),
                healed: secs(&mut rng, 0.5, 3.0),
            },
            63..=79 => Fault::Frames {
                host,
                faults: FrameFaults {
                    drop: rng.f64() * 0.1,
                    duplicate: rng.f64() * 0.3,
                    delay: secs(&mut rng, 0.0, 0.3),
                },
                length: secs(&mut rng, 3.0, 10.0),
            },
            // Up to 12 s a call: beyond the 10 s deadline of the MN's state checks, so the MN
            // gives up on some calls while the agent still runs them.
            80..=89 => Fault::SlowDriver {
                host,
                latency: secs(&mut rng, 2.0, 12.0),
                length: secs(&mut rng, 5.0, 12.0),
            },
            _ => Fault::DriverErrors {
                host,
                p: 0.2 + rng.f64() * 0.3,
                length: secs(&mut rng, 5.0, 12.0),
            },
        };
        let lane = fault.lane().map_or(hosts, |h| h);
        if busy_until[lane] <= at && at + fault.length() < end {
            busy_until[lane] = at + fault.length() + Duration::from_secs(1);
            faults.push(Scheduled { at, fault });
        }
        at += secs(&mut rng, 1.5, 5.0);
    }
    if network {
        let mut rng = fastrand::Rng::with_seed(seed ^ 0x006e_6574_776f_726b);
        let mut at = secs(&mut rng, 3.0, 6.0);
        while at < end {
            let host = rng.usize(..hosts.max(1));
            let fault = match rng.u32(..4) {
                0 => Fault::KillDnsmasq { host },
                1 => Fault::RemoveNamespace { host },
                2 => Fault::RemoveTable { host },
                _ => Fault::KillAgentMidApply { host, after: secs(&mut rng, 0.05, 0.6) },
            };
            let until = at + fault.length() + Duration::from_secs(1);
            let free = faults
                .iter()
                .filter(|s| s.fault.lane() == Some(host))
                .all(|s| s.at + s.fault.length() + Duration::from_secs(1) <= at || until <= s.at);
            if free && at + fault.length() < end {
                faults.push(Scheduled { at, fault });
            }
            at += secs(&mut rng, 4.0, 9.0);
        }
        faults.sort_by_key(|s| s.at);
    }
    faults
}

/// Host `i`'s agent's namespace and prefix, or why the fault cannot be made.
fn host_network(cluster: &Cluster, host: usize) -> Result<(String, String), crate::Error> {
    cluster.host_network(host).ok_or_else(|| "the host makes no real network".into())
}

/// Asks the MN to reconnect host `i` (not waiting for the job).
fn reconnect(cluster: &Cluster, host: usize) -> Result<(), crate::Error> {
    use strato_api::client;
    use strato_api::types::actions::{HostAction, NoParams};
    let (_, hosts) = client::request(cluster.api(), "GET", "/v1/hosts", None)?;
    let port = cluster.host_addr(host).port();
    let uuid = hosts["inventories"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|h| h["agentPort"].as_u64() == Some(u64::from(port)))
        .and_then(|h| h["uuid"].as_str())
        .ok_or("the host is not registered")?
        .to_owned();
    let body = client::body(&HostAction::ReconnectHost(NoParams {}));
    client::request(cluster.api(), "PUT", &format!("/v1/hosts/{uuid}/actions"), Some(&body))?;
    Ok(())
}

/// Applies one fault, blocking for its length, and heals it.
pub fn apply(cluster: &std::sync::Mutex<Cluster>, fault: &Fault) -> Result<(), crate::Error> {
    let lock = || cluster.lock().expect("cluster lock");
    match fault {
        Fault::KillMn { down } => {
            lock().kill_mn();
            std::thread::sleep(*down);
            lock().start_mn(None)?;
        }
        Fault::FaultyMn { length } => {
            // A faulty MN may die starting (an injected store error in its recovery pass
            // stops it, as a real one would): the clean one starts after the fault anyway.
            let started = lock().start_mn(Some(MN_FAILPOINTS));
            std::thread::sleep(*length);
            lock().start_mn(None)?;
            started?;
        }
        Fault::KillAgent { host, down } => {
            lock().kill_agent(*host);
            std::thread::sleep(*down);
            lock().start_agent(*host, &[])?;
        }
        Fault::Partition { host, length } => {
            lock().partition(*host, true)?;
            std::thread::sleep(*length);
            lock().partition(*host, false)?;
        }
        Fault::Flap { host, cycles, cut, healed } => {
            for _ in 0..*cycles {
                lock().partition(*host, true)?;
                std::thread::sleep(*cut);
                lock().partition(*host, false)?;
                std::thread::sleep(*healed);
            }
        }
        Fault::Frames { host, faults, length } => {
            lock().proxy(*host).set_faults(*faults);
            std::thread::sleep(*length);
            lock().proxy(*host).set_faults(FrameFaults::default());
        }
        Fault::SlowDriver { host, latency, length } => {
            let extra = vec!["--sim-latency-ms".to_owned(), latency.as_millis().to_string()];
            lock().start_agent(*host, &extra)?;
            std::thread::sleep(*length);
            lock().start_agent(*host, &[])?;
        }
        Fault::DriverErrors { host, p, length } => {
            let mut extra = Vec::new();
            for command in ["define-domain", "start-domain", "shutdown-domain", "destroy-domain"] {
                extra.push("--sim-fail".to_owned());
                extra.push(format!("{command}={p:.2}"));
            }
            lock().start_agent(*host, &extra)?;
            std::thread::sleep(*length);
            lock().start_agent(*host, &[])?;
        }
        Fault::KillDnsmasq { host } => {
            let (_, prefix) = host_network(&lock(), *host)?;
            crate::hostnet::kill_dnsmasq(&prefix)?;
        }
        Fault::RemoveNamespace { host } => {
            let (_, prefix) = host_network(&lock(), *host)?;
            crate::hostnet::remove_namespace(&prefix)?;
        }
        Fault::RemoveTable { host } => {
            let (ns, _) = host_network(&lock(), *host)?;
            crate::hostnet::remove_table(&ns)?;
        }
        Fault::KillAgentMidApply { host, after } => {
            let (_, prefix) = host_network(&lock(), *host)?;
            crate::hostnet::remove_namespace(&prefix)?;
            reconnect(&lock(), *host)?;
            std::thread::sleep(*after);
            lock().kill_agent(*host);
            std::thread::sleep(Duration::from_secs(1));
            lock().start_agent(*host, &[])?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_seed_one_schedule_and_lanes_never_overlap() {
        let a = schedule(7, Duration::from_secs(120), 3, true);
        assert_eq!(a, schedule(7, Duration::from_secs(120), 3, true));
        assert_ne!(a, schedule(8, Duration::from_secs(120), 3, true));
        // The network's faults come on top of the others, which stay as they were.
        let plain = schedule(7, Duration::from_secs(120), 3, false);
        assert!(plain.iter().all(|s| a.contains(s)));
        assert!(a.iter().any(|s| matches!(s.fault, Fault::KillDnsmasq { .. })), "{a:?}");
        for lane in [None, Some(0), Some(1), Some(2)] {
            let mut on_lane: Vec<&Scheduled> =
                a.iter().filter(|s| s.fault.lane() == lane).collect();
            on_lane.sort_by_key(|s| s.at);
            for pair in on_lane.windows(2) {
                assert!(pair[0].at + pair[0].fault.length() <= pair[1].at, "{pair:?}");
            }
        }
        assert!(a.iter().all(|s| s.at + s.fault.length() <= Duration::from_secs(115)));
    }
}
