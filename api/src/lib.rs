//! The management node's front: the HTTP API and the `strato` binary.
//!
//! The API is served with axum in ZStack's v1 shape. Its parts, by role, each depending only
//! on those listed before it:
//!
//! - [`codes`]: every error code, listed once with its HTTP status and meaning.
//! - [`error`]: the API's one error type and the one mapping of every layer's errors to its
//!   codes.
//! - [`types`]: the wire types (creation parameters, the action enums, answers), shared by
//!   the handlers, the catalog, the CLI and the programs that drive the API.
//! - [`auth`]: accounts, sessions and API keys, who may reach what, what tenants are never
//!   shown, and the middleware that decides it on every request.
//! - [`query`]: ZStack's query language over every kind, on the store or a tenant's view of
//!   it.
//! - [`jobs`]: jobs persisted before they are acknowledged, followed and cancelled.
//! - [`mn`]: the management node assembled (store, runtime, actor kinds, flows, GC).
//! - [`http`]: the route table and the handlers by area; each kind's query, read and deletion
//!   come from its declaration (`strato_actors::kinds`).
//! - [`catalog`]: every API by name, for the CLI, and the OpenAPI document.
//! - [`ops`]: the debug console and `/debug`, and Prometheus metrics.
//! - [`server`]: the application put together and served under time limits.
//! - [`client`]: the one HTTP client, the CLI, `strato up` and the runtime demonstration.
//!
//! `auth` and `query` never import `http`; `http` never imports `ops`, `catalog` or `client`.
//! The `strato` binary runs the main job (`strato up`), the server alone (`strato server`),
//! writes the bootstrap files that enroll agents (`strato agent-bootstrap`), prints the
//! OpenAPI document (`strato openapi`), is the client (`strato <ApiName> ...`, `strato
//! shell`), and keeps the runtime demonstration.

pub mod auth;
pub mod catalog;
pub mod client;
pub mod codes;
pub mod error;
pub mod http;
pub mod jobs;
pub mod mn;
pub mod ops;
pub mod query;
pub mod server;
pub mod types;

/// The modules' dependencies, read from the source: each module may name (`crate::...`) only
/// the modules before it in [`LAYERS`], so there is no import cycle between them, and the
/// rules of the list above hold.
#[cfg(test)]
mod layering {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    /// The modules, lowest first.
    const LAYERS: &[&str] = &[
        "codes", "error", "types", "auth", "query", "jobs", "mn", "http", "catalog", "ops",
        "server", "client",
    ];

    /// Adds the modules the source at `path` (a file, or a folder of them) names to
    /// `found[top]`.
    fn collect(path: &Path, top: &str, found: &mut BTreeMap<String, BTreeSet<String>>) {
        if path.is_dir() {
            for entry in std::fs::read_dir(path).unwrap() {
                collect(&entry.unwrap().path(), top, found);
            }
            return;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            return;
        }
        let text = std::fs::read_to_string(path).unwrap();
        // A path that climbs out of its folder would name a module unseen here.
        assert!(!text.contains("super::super"), "{}: use `crate::` paths", path.display());
        let named = found.entry(top.to_owned()).or_default();
        for (at, _) in text.match_indices("crate::") {
            let rest = &text[at + "crate::".len()..];
            let module: String =
                rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if module != top {
                named.insert(module);
            }
        }
    }

    #[test]
    fn the_modules_depend_only_downward() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut found = BTreeMap::new();
        for entry in std::fs::read_dir(&src).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            if name != "lib" && name != "main" {
                collect(&path, &name, &mut found);
            }
        }
        for (module, named) in &found {
            let at = LAYERS.iter().position(|m| m == module);
            let at = at.unwrap_or_else(|| panic!("module `{module}` is not in LAYERS"));
            for other in named {
                let below = LAYERS[..at].contains(&other.as_str());
                assert!(
                    below,
                    "`{module}` names `crate::{other}`, which is not below it in LAYERS"
                );
            }
        }
        // The rules the issue of the renovation set, said again for the reader.
        let names = |m: &str| found.get(m).cloned().unwrap_or_default();
        assert!(!names("auth").contains("http") && !names("query").contains("http"));
        for never in ["ops", "client", "catalog"] {
            assert!(!names("http").contains(never), "http names {never}");
        }
    }
}
