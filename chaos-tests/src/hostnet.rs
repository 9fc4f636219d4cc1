//! What an agent made of its host's network, read as an operator would read it on the host
//! (`ip netns`, `nft list tables`, `/proc`), and the faults that break it behind the agent's
//! back. Used when each agent runs in a namespace of its own and makes its network for real.

use std::process::Command;

use crate::Error;

fn output(program: &str, args: &[&str]) -> Result<String, Error> {
    let out = Command::new(program).args(args).output()?;
    if !out.status.success() {
        return Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The namespaces whose names start with `prefix` (an agent's own).
pub fn namespaces(prefix: &str) -> Result<Vec<String>, Error> {
    Ok(output("ip", &["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_owned)
        .collect())
}

/// The processes in namespace `ns`.
pub fn pids(ns: &str) -> Result<Vec<u32>, Error> {
    Ok(output("ip", &["netns", "pids", ns])?
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

/// The dnsmasq processes in namespace `ns`.
pub fn dnsmasq_in(ns: &str) -> Result<Vec<u32>, Error> {
    Ok(pids(ns)?
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim() == "dnsmasq")
        })
        .collect())
}

/// The Strato tables in namespace `ns`, as `(family, name)`.
pub fn strato_tables(ns: &str) -> Result<Vec<(String, String)>, Error> {
    Ok(output("ip", &["netns", "exec", ns, "nft", "list", "tables"])?
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace().skip(1);
            Some((words.next()?.to_owned(), words.next()?.to_owned()))
        })
        .filter(|(_, name)| name.starts_with("strato_"))
        .collect())
}

/// The links of namespace `ns` the agent marked as its own (`alias strato:...`).
pub fn strato_links(ns: &str) -> Result<Vec<String>, Error> {
    Ok(output("ip", &["-n", ns, "-o", "link", "show"])?
        .lines()
        .filter(|l| l.contains("alias strato:"))
        .filter_map(|l| Some(l.split(':').nth(1)?.trim().to_owned()))
        .collect())
}

/// Kills every dnsmasq of the agent whose namespaces start with `prefix` (its supervisor
/// must start them again). Returns how many.
pub fn kill_dnsmasq(prefix: &str) -> Result<usize, Error> {
    let mut killed = 0;
    for ns in namespaces(prefix)? {
        for pid in dnsmasq_in(&ns)? {
            output("kill", &["-9", &pid.to_string()])?;
            killed += 1;
        }
    }
    Ok(killed)
}

/// Removes the agent's first namespace (by name) with what runs in it, as an operator's
/// mistake would. Returns its name.
pub fn remove_namespace(prefix: &str) -> Result<Option<String>, Error> {
    let Some(ns) = namespaces(prefix)?.into_iter().min() else { return Ok(None) };
    for pid in pids(&ns)? {
        let _ = output("kill", &["-9", &pid.to_string()]);
    }
    output("ip", &["netns", "del", &ns])?;
    Ok(Some(ns))
}

/// Deletes one Strato table (the first by name) in the agent's namespace `ns`.
pub fn remove_table(ns: &str) -> Result<Option<String>, Error> {
    let Some((family, name)) = strato_tables(ns)?.into_iter().min_by(|a, b| a.1.cmp(&b.1)) else {
        return Ok(None);
    };
    output("ip", &["netns", "exec", ns, "nft", "delete", "table", &family, &name])?;
    Ok(Some(format!("{family} {name}")))
}
