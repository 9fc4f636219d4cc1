//! What an agent made of its host's network, read as an operator would read it on the host
//! (`ip netns`, `nft list tables`, `/proc`), and the faults that break it behind the agent's
//! back. Used when each agent runs in a namespace of its own and makes its network for real.

use std::collections::BTreeMap;
use std::process::Command;

use serde_json::Value;

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

/// The Strato tables of namespace `ns` and of every namespace whose name starts with
/// `prefix` (the agent's own), each as its canonical JSON (`nft -j`) keyed by `namespace
/// family name`: without handles, which every replacement renews, and with set elements
/// sorted, since a set lists them in its hash's order.
pub fn strato_rules(ns: &str, prefix: &str) -> Result<BTreeMap<String, Vec<Value>>, Error> {
    let mut tables = BTreeMap::new();
    for ns in std::iter::once(ns.to_owned()).chain(namespaces(prefix)?) {
        let listed: Value = serde_json::from_str(&output(
            "ip",
            &["netns", "exec", &ns, "nft", "-j", "list", "ruleset"],
        )?)?;
        for mut entry in listed["nftables"].as_array().cloned().unwrap_or_default() {
            let Some((kind, body)) = entry.as_object().and_then(|o| o.iter().next()) else {
                continue;
            };
            let table = if kind == "table" { &body["name"] } else { &body["table"] };
            let Some(table) = table.as_str().filter(|t| t.starts_with("strato_")) else {
                continue;
            };
            let key = format!("{ns} {} {table}", body["family"].as_str().unwrap_or_default());
            canonical(&mut entry);
            tables.entry(key).or_insert_with(Vec::new).push(entry);
        }
    }
    Ok(tables)
}

/// `value` without handles and with set elements sorted.
fn canonical(value: &mut Value) {
    match value {
        Value::Object(fields) => {
            fields.remove("handle");
            for (key, field) in fields.iter_mut() {
                canonical(field);
                if let (Value::Array(elements), "elem") = (field, key.as_str()) {
                    elements.sort_by_key(|e| e.to_string());
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(canonical),
        _ => {}
    }
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn a_table_read_twice_compares_equal_whatever_its_handles_and_element_order() {
        let mut first =
            json!({ "set": { "name": "members", "handle": 3, "elem": ["10.0.0.2", "10.0.0.1"] } });
        let mut second =
            json!({ "set": { "name": "members", "handle": 9, "elem": ["10.0.0.1", "10.0.0.2"] } });
        super::canonical(&mut first);
        super::canonical(&mut second);
        assert_eq!(first, second);
        let mut other = json!({ "set": { "name": "members", "handle": 9, "elem": ["10.0.0.1"] } });
        super::canonical(&mut other);
        assert_ne!(first, other, "a missing element is a difference");
    }
}
