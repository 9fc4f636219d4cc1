//! The client commands, in zstack-cli's shape: `strato <ApiName> key=value ...`.
//!
//! Every API of the catalog ([`crate::catalog`]) is a command under its ZStack name, and its
//! parameters are the catalog's, which come from the structs the server validates with, so
//! the CLI cannot drift from the HTTP API. A value is typed from the parameter's schema
//! (`l3NetworkUuids=a,b` is a list, `cpuNum=2` a number). For a query (`QueryVmInstance`),
//! `limit`, `start`, `sort`, `count`, `replyWithCount` and `fields` shape the answer and
//! every other argument is a condition (`state=Running`, `'cpuNum>2'`, `vmNics.ip=10.0.0.5`).
//!
//! `LogInByAccount` keeps the session in the user's config directory
//! (`$STRATO_CONFIG_DIR`, else `$XDG_CONFIG_HOME/strato`, else `~/.config/strato`), with the
//! server it belongs to; later commands send it. The server is `--server URL`, else
//! `$STRATO_SERVER`, else the session's, else `http://127.0.0.1:8080`. A command that starts
//! a job follows it with a progress line and its elapsed time until it ends (`--no-wait`
//! prints the job's location at once). Answers print as tables, or as JSON with
//! `--output json`. An error prints its code, message and details (such as a placement
//! trace) and exits with status 1. `strato shell` is the same, interactive, with history and
//! completion of API names, parameters and query fields.

use std::io::{IsTerminal, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use super as client;
use crate::catalog::{self, Answer, Api, Body};

/// How answers print.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// Aligned columns.
    Table,
    /// JSON, pretty.
    Json,
}

/// The options every command takes.
#[derive(Clone, Debug)]
pub struct Options {
    /// `--server URL`.
    pub server: Option<String>,
    /// `--output table|json`.
    pub output: Output,
    /// `--no-wait`.
    pub no_wait: bool,
}

/// A failed command: what to print.
#[derive(Debug)]
pub struct Failure(pub String);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(error: E) -> Self {
        Failure(error.to_string())
    }
}

fn config_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("STRATO_CONFIG_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME") {
        return PathBuf::from(dir).join("strato");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".config").join("strato")
}

fn session_path() -> PathBuf {
    config_dir().join("session.json")
}

fn saved_session() -> Option<(String, String)> {
    let text = std::fs::read_to_string(session_path()).ok()?;
    let saved: Value = serde_json::from_str(&text).ok()?;
    Some((saved["server"].as_str()?.to_owned(), saved["session"].as_str()?.to_owned()))
}

fn save_session(server: &str, session: &str) -> Result<(), Failure> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(config_dir())?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(session_path())?;
    file.write_all(json!({ "server": server, "session": session }).to_string().as_bytes())?;
    Ok(())
}

fn server_url(options: &Options) -> String {
    options
        .server
        .clone()
        .or_else(|| std::env::var("STRATO_SERVER").ok())
        .or_else(|| saved_session().map(|(server, _)| server))
        .unwrap_or_else(|| "http://127.0.0.1:8080".to_owned())
}

fn address(url: &str) -> Result<SocketAddr, Failure> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        Failure(format!(
            "the server `{url}` must be an http:// URL (such as http://127.0.0.1:8080)"
        ))
    })?;
    let host_port = rest.split('/').next().unwrap_or_default();
    host_port
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| Failure(format!("cannot resolve the server `{url}`")))
}

/// Splits `--server`, `--output` and `--no-wait` from the command's own arguments.
pub fn split_options(args: &[String]) -> Result<(Options, Vec<String>), Failure> {
    let mut options = Options { server: None, output: Output::Table, no_wait: false };
    let mut rest = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next().cloned().ok_or_else(|| Failure(format!("{name} needs a value")))
        };
        match arg.as_str() {
            "--server" => options.server = Some(value("--server")?),
            "--output" | "-o" => {
                options.output = match value("--output")?.as_str() {
                    "json" => Output::Json,
                    "table" => Output::Table,
                    other => {
                        return Err(Failure(format!("--output is table or json, not {other}")));
                    }
                }
            }
            "--no-wait" => options.no_wait = true,
            other if other.starts_with("--server=") => {
                options.server = Some(other["--server=".len()..].to_owned());
            }
            _ => rest.push(arg.clone()),
        }
    }
    Ok((options, rest))
}

/// Runs one command (`args[0]` is the API's name); returns the process's exit status.
pub fn run(args: &[String]) -> i32 {
    match split_options(args).and_then(|(options, rest)| execute(&options, &rest)) {
        Ok(()) => 0,
        Err(Failure(message)) => {
            eprintln!("{message}");
            1
        }
    }
}

fn execute(options: &Options, args: &[String]) -> Result<(), Failure> {
    let Some((name, rest)) = args.split_first() else {
        return Err(Failure("name an API (strato shell lists them with Tab)".into()));
    };
    let api = catalog::named(name).ok_or_else(|| {
        let close: Vec<&str> = catalog::all()
            .map(|a| a.name)
            .filter(|n| n.to_lowercase().contains(&name.to_lowercase().replace("query", "")))
            .take(8)
            .collect();
        Failure(format!(
            "no API named `{name}`{}",
            if close.is_empty() {
                String::new()
            } else {
                format!("; did you mean {}?", close.join(", "))
            }
        ))
    })?;
    let pairs = rest.iter().map(|arg| parse_pair(api, arg)).collect::<Result<Vec<_>, _>>()?;
    let url = server_url(options);
    let addr = address(&url)?;
    let request = build(api, &pairs)?;
    let mut headers: Vec<(String, String)> = Vec::new();
    if api.name != "LogInByAccount"
        && let Some((server, session)) = saved_session()
        && server == url
    {
        headers.push(("Authorization".into(), format!("OAuth {session}")));
    }
    let header_refs: Vec<(&str, &str)> =
        headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (status, reply) = client::request_with_headers(
        addr,
        api.method.as_str(),
        &request.path,
        request.body.as_ref(),
        &header_refs,
    )?;
    if reply.get("error").is_some() || status >= 400 {
        return Err(Failure(render_error(status, &reply)));
    }
    if api.name == "LogInByAccount" {
        let session = reply["inventory"]["uuid"].as_str().unwrap_or_default();
        save_session(&url, session)?;
        eprintln!("logged in to {url}; the session is kept in {}", session_path().display());
    }
    if status == 202 && api.answer == Answer::Job {
        let location = reply["location"].as_str().unwrap_or_default().to_owned();
        if options.no_wait {
            print(options.output, &json!({ "location": location }));
            return Ok(());
        }
        let done = follow(addr, api.name, &location, &header_refs)?;
        if done.get("error").is_some() {
            return Err(Failure(render_error(200, &done)));
        }
        print(options.output, &done["inventory"]);
        return Ok(());
    }
    print(options.output, &reply);
    Ok(())
}

/// Follows a job to its end, showing a progress line with the elapsed time.
fn follow(
    addr: SocketAddr,
    api: &str,
    location: &str,
    headers: &[(&str, &str)],
) -> Result<Value, Failure> {
    // Each GET waits up to a second for the job's end: the command returns the moment the job
    // ends, and the progress line moves once a second.
    let path = client::job_path(location, Duration::from_secs(1));
    let job = location.rsplit('/').next().unwrap_or_default().to_owned();
    let started = Instant::now();
    let terminal = std::io::stderr().is_terminal();
    let spinner = ['|', '/', '-', '\\'];
    let mut last_line = Duration::ZERO;
    let mut tick = 0;
    eprintln!("{api}: job {job} accepted");
    loop {
        let (status, body) = client::request_with_headers(addr, "GET", &path, None, headers)?;
        let elapsed = started.elapsed();
        if status == 200 {
            let outcome = if body.get("error").is_some() { "failed" } else { "done" };
            if terminal {
                eprint!("\r\x1b[2K");
            }
            eprintln!("{api}: {outcome} in {:.1}s", elapsed.as_secs_f64());
            return Ok(body);
        }
        if status != 202 {
            return Err(Failure(render_error(status, &body)));
        }
        if terminal {
            tick += 1;
            eprint!("\r\x1b[2K{} {api}: running {:.1}s", spinner[tick % 4], elapsed.as_secs_f64());
            let _ = std::io::stderr().flush();
        } else if elapsed >= last_line + Duration::from_secs(1) {
            // Not a terminal (a log, a test): one line a second.
            last_line = elapsed;
            eprintln!("{api}: running {:.0}s", elapsed.as_secs_f64());
        }
    }
}

fn render_error(status: u16, reply: &Value) -> String {
    let error = &reply["error"];
    let mut text = format!(
        "error ({status}) {}: {}",
        error["code"].as_str().unwrap_or("?"),
        error["description"].as_str().unwrap_or_else(|| reply.as_str().unwrap_or("no description"))
    );
    if !error["details"].is_null() {
        let details = serde_json::to_string_pretty(&error["details"]).unwrap_or_default();
        text.push_str(&format!("\ndetails: {details}"));
    }
    text
}

/// One `key=value` argument, or a query condition.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pair {
    key: String,
    value: String,
    /// The whole text, for a query condition (`cpuNum>2`).
    text: String,
}

const QUERY_OPTIONS: [&str; 6] = ["limit", "start", "sort", "count", "replyWithCount", "fields"];

fn parse_pair(api: &Api, arg: &str) -> Result<Pair, Failure> {
    let (key, value) = match arg.split_once('=') {
        Some((k, v)) => (k.to_owned(), v.to_owned()),
        None if api.query_kind().is_some() => (String::new(), String::new()),
        None => return Err(Failure(format!("`{arg}` is not key=value"))),
    };
    Ok(Pair { key, value, text: arg.to_owned() })
}

struct Request {
    path: String,
    body: Option<Value>,
}

fn typed(value: &str, json_type: &str) -> Value {
    match json_type {
        "array" => json!(value.split(',').filter(|v| !v.is_empty()).collect::<Vec<_>>()),
        "integer" | "number" => {
            value.parse::<i64>().map(Value::from).unwrap_or_else(|_| json!(value))
        }
        "boolean" => value.parse::<bool>().map(Value::from).unwrap_or_else(|_| json!(value)),
        "object" => serde_json::from_str(value).unwrap_or_else(|_| json!(value)),
        _ => json!(value),
    }
}

fn encode(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(byte as char)
            }
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

fn build(api: &Api, pairs: &[Pair]) -> Result<Request, Failure> {
    let mut path = api.path.to_owned();
    let path_params = api.path_params();
    for name in &path_params {
        let pair = pairs
            .iter()
            .find(|p| p.key == *name)
            .ok_or_else(|| Failure(format!("{} needs {name}=<uuid>", api.name)))?;
        path = path.replace(&format!("{{{name}}}"), &encode(&pair.value));
    }
    let rest: Vec<&Pair> =
        pairs.iter().filter(|p| !path_params.contains(&p.key.as_str())).collect();
    if api.query_kind().is_some() {
        let mut query: Vec<String> = Vec::new();
        for pair in rest {
            if QUERY_OPTIONS.contains(&pair.key.as_str()) {
                query.push(format!("{}={}", pair.key, encode(&pair.value)));
            } else {
                query.push(format!("q={}", encode(&pair.text)));
            }
        }
        if !query.is_empty() {
            path = format!("{path}?{}", query.join("&"));
        }
        return Ok(Request { path, body: None });
    }
    let params = catalog::params(api);
    let mut object = Map::new();
    let mut system_tags = Vec::new();
    let mut user_tags = Vec::new();
    let mut query: Vec<String> = Vec::new();
    for pair in rest {
        match pair.key.as_str() {
            "systemTags" if matches!(api.body, Body::Create(_)) => {
                system_tags.extend(pair.value.split(',').map(str::to_owned))
            }
            "userTags" if matches!(api.body, Body::Create(_)) => {
                user_tags.extend(pair.value.split(',').map(str::to_owned))
            }
            "deleteMode" if api.method == catalog::Method::Delete => {
                query.push(format!("deleteMode={}", encode(&pair.value)))
            }
            key => {
                let Some(param) = params.iter().find(|p| p.name == key) else {
                    let known: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
                    return Err(Failure(format!(
                        "{} takes no `{key}`; it takes {}",
                        api.name,
                        if known.is_empty() {
                            "no parameters".to_owned()
                        } else {
                            known.join(", ")
                        }
                    )));
                };
                object.insert(key.to_owned(), typed(&pair.value, &param.json_type));
            }
        }
    }
    if let Some(missing) = params.iter().find(|p| p.required && !object.contains_key(&p.name)) {
        return Err(Failure(format!("{} needs {}=...", api.name, missing.name)));
    }
    if !query.is_empty() {
        path = format!("{path}?{}", query.join("&"));
    }
    let body = match api.body {
        Body::None => None,
        Body::Create(_) => {
            Some(json!({ "params": object, "systemTags": system_tags, "userTags": user_tags }))
        }
        Body::Action(action, _) => Some(json!({ action: object })),
    };
    Ok(Request { path, body })
}

fn print(output: Output, value: &Value) {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value).unwrap_or_default()),
        Output::Table => println!("{}", table(value)),
    }
}

fn cell(value: &Value) -> String {
    let text = match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    if text.chars().count() > 60 {
        format!("{}...", text.chars().take(57).collect::<String>())
    } else {
        text
    }
}

/// Rows of inventories as aligned columns; one inventory as name/value lines.
fn table(value: &Value) -> String {
    let rows: Vec<&Map<String, Value>> = match value {
        Value::Object(o) if o.contains_key("inventories") => {
            let rows: Vec<&Map<String, Value>> = o["inventories"]
                .as_array()
                .map(|items| items.iter().filter_map(Value::as_object).collect())
                .unwrap_or_default();
            if rows.is_empty() {
                let total = o.get("total").map(|t| format!(" (total {t})")).unwrap_or_default();
                return format!("(none){total}");
            }
            let mut out = columns(&rows);
            if let Some(total) = o.get("total") {
                out.push_str(&format!("\ntotal: {total}"));
            }
            return out;
        }
        Value::Object(o) if o.len() == 1 && o.contains_key("total") => {
            return format!("total: {}", o["total"]);
        }
        Value::Object(o) if o.contains_key("inventory") => match &o["inventory"] {
            Value::Object(one) => vec![one],
            other => return cell(other),
        },
        Value::Object(o) => vec![o],
        other => return cell(other),
    };
    let one = rows[0];
    let width = one.keys().map(|k| k.len()).max().unwrap_or(0);
    one.iter().map(|(k, v)| format!("{k:width$}  {}", cell(v))).collect::<Vec<_>>().join("\n")
}

fn columns(rows: &[&Map<String, Value>]) -> String {
    // Scalar columns first, in the first row's order; lists and objects are left to JSON.
    let keys: Vec<&String> =
        rows[0].iter().filter(|(_, v)| !v.is_array() && !v.is_object()).map(|(k, _)| k).collect();
    let cells: Vec<Vec<String>> =
        rows.iter().map(|r| keys.iter().map(|k| cell(&r[k.as_str()])).collect()).collect();
    let widths: Vec<usize> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| cells.iter().map(|c| c[i].chars().count()).max().unwrap_or(0).max(k.len()))
        .collect();
    let line = |items: Vec<String>| {
        items
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = vec![line(keys.iter().map(|k| k.to_string()).collect())];
    out.extend(cells.into_iter().map(line));
    out.join("\n")
}

/// `strato debug actors|queues|flows|gc|hosts [kind=vm status=Failed filter=web]`: the
/// console's views as tables (or JSON), from `/debug/...` with the saved admin session.
pub fn debug(args: &[String]) -> i32 {
    let result = split_options(args).and_then(|(options, rest)| {
        let Some((view, rest)) = rest.split_first() else {
            return Err(Failure("name a view: actors, queues, flows, gc or hosts".into()));
        };
        let url = server_url(&options);
        let addr = address(&url)?;
        let session = saved_session()
            .filter(|(server, _)| *server == url)
            .map(|(_, session)| format!("OAuth {session}"))
            .ok_or_else(|| Failure(format!("log in to {url} first (strato LogInByAccount ...)")))?;
        let path = match view.as_str() {
            "actors" => {
                let mut query = vec!["kind=vm".to_owned()];
                for arg in rest {
                    let (key, value) = arg.split_once('=').ok_or_else(|| Failure(format!("`{arg}` is not key=value")))?;
                    if key == "kind" {
                        query[0] = format!("kind={}", encode(value));
                    } else {
                        query.push(format!("{key}={}", encode(value)));
                    }
                }
                format!("/debug/actors?{}", query.join("&"))
            }
            "queues" => "/debug/tree".to_owned(),
            "flows" => "/debug/flows".to_owned(),
            "gc" => "/debug/gc".to_owned(),
            "hosts" => "/debug/hosts".to_owned(),
            other => return Err(Failure(format!("`{other}` is not actors, queues, flows, gc or hosts"))),
        };
        let (status, reply) =
            client::request_with_headers(addr, "GET", &path, None, &[("Authorization", &session)])?;
        if status != 200 {
            return Err(Failure(render_error(status, &reply)));
        }
        let rows = match view.as_str() {
            "actors" => reply["actors"].clone(),
            "queues" => json!(reply["kinds"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|k| {
                    k["queues"].as_array().cloned().unwrap_or_default().into_iter().map(move |q| {
                        json!({ "kind": k["kind"], "queue": q["name"], "level": q["level"],
                                "running": q["running"], "pending": q["pending"], "maxPending": q["max_pending"] })
                    })
                })
                .collect::<Vec<_>>()),
            "flows" => json!(reply["inProgress"]
                .as_array()
                .into_iter()
                .flatten()
                .chain(reply["recent"].as_array().into_iter().flatten())
                .map(|f| json!({ "chain": f["chain"], "phase": f["phase"], "step": f["current_step"],
                                 "failure": f["failure"], "job": f["job_id"], "ageMs": f["age_ms"] }))
                .collect::<Vec<_>>()),
            "gc" => json!(reply["jobs"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|j| json!({ "name": j["name"], "kind": j["kind"], "attempts": j["attempts"],
                                 "nextRunUnixMs": j["next_run_unix_ms"], "lastError": j["last_error"] }))
                .collect::<Vec<_>>()),
            _ => reply["hosts"].clone(),
        };
        print(options.output, &json!({ "inventories": rows }));
        Ok(())
    });
    match result {
        Ok(()) => 0,
        Err(Failure(message)) => {
            eprintln!("{message}");
            1
        }
    }
}

/// What the shell completes: API names first, then the API's parameters (or, for a query,
/// its options and the fields it can be queried by).
pub fn completions(line: &str) -> (usize, Vec<String>) {
    let start = line.rfind(' ').map_or(0, |at| at + 1);
    let word = &line[start..];
    let mut words = line.split_whitespace();
    let first = words.next().unwrap_or_default();
    if start == 0 {
        let mut names: Vec<String> = catalog::all()
            .map(|a| a.name.to_owned())
            .chain(["help".into(), "exit".into()])
            .filter(|n| n.to_lowercase().starts_with(&word.to_lowercase()))
            .collect();
        names.sort();
        return (0, names);
    }
    let Some(api) = catalog::named(first) else { return (start, Vec::new()) };
    let mut candidates: Vec<String> = match api.query_kind() {
        Some(kind) => {
            let schema = crate::query::schema(kind).expect("declared");
            crate::query::queryable_paths(schema)
                .into_iter()
                .chain(QUERY_OPTIONS.iter().map(|s| (*s).to_owned()))
                .map(|p| format!("{p}="))
                .collect()
        }
        None => api
            .path_params()
            .into_iter()
            .map(str::to_owned)
            .chain(catalog::params(api).into_iter().map(|p| p.name))
            .chain(
                matches!(api.body, Body::Create(_))
                    .then(|| ["systemTags".to_owned(), "userTags".to_owned()])
                    .into_iter()
                    .flatten(),
            )
            .map(|p| format!("{p}="))
            .collect(),
    };
    candidates.retain(|c| c.starts_with(word));
    candidates.sort();
    (start, candidates)
}

struct ShellHelper;

impl rustyline::completion::Completer for ShellHelper {
    type Candidate = String;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _: &rustyline::Context<'_>,
    ) -> rustyline::Result<(usize, Vec<String>)> {
        Ok(completions(&line[..pos]))
    }
}

impl rustyline::hint::Hinter for ShellHelper {
    type Hint = String;
}
impl rustyline::highlight::Highlighter for ShellHelper {}
impl rustyline::validate::Validator for ShellHelper {}
impl rustyline::Helper for ShellHelper {}

/// Splits a shell line into words, keeping quoted text together.
fn words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut quote: Option<char> = None;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => current.push(c),
            (None, '\'' | '"') => quote = Some(c),
            (None, c) if c.is_whitespace() => {
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
            }
            (None, c) => current.push(c),
        }
    }
    if !current.is_empty() {
        words.push(current);
    }
    words
}

/// `strato shell`: commands read interactively, with history (kept in the config
/// directory) and Tab completion.
pub fn shell(args: &[String]) -> i32 {
    let (options, _) = match split_options(args) {
        Ok(split) => split,
        Err(Failure(message)) => {
            eprintln!("{message}");
            return 1;
        }
    };
    let mut editor =
        match rustyline::Editor::<ShellHelper, rustyline::history::DefaultHistory>::new() {
            Ok(editor) => editor,
            Err(error) => {
                eprintln!("cannot start the shell: {error}");
                return 1;
            }
        };
    editor.set_helper(Some(ShellHelper));
    let history = config_dir().join("history");
    let _ = editor.load_history(&history);
    println!(
        "Strato shell on {}: Tab completes API names and parameters; `exit` leaves.",
        server_url(&options)
    );
    loop {
        match editor.readline("strato> ") {
            Ok(line) => {
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                let _ = editor.add_history_entry(line);
                match line {
                    "exit" | "quit" => break,
                    "help" => {
                        let names: Vec<&str> = catalog::all().map(|a| a.name).collect();
                        println!("{}", names.join("\n"));
                        continue;
                    }
                    _ => {}
                }
                let mut args = words(line);
                // Options typed on the line apply to that command.
                let (line_options, rest) = match split_options(&args) {
                    Ok(split) => split,
                    Err(Failure(message)) => {
                        eprintln!("{message}");
                        continue;
                    }
                };
                let merged = Options {
                    server: line_options.server.or_else(|| options.server.clone()),
                    output: if args.iter().any(|a| a == "--output" || a == "-o") {
                        line_options.output
                    } else {
                        options.output
                    },
                    no_wait: line_options.no_wait || options.no_wait,
                };
                args = rest;
                if let Err(Failure(message)) = execute(&merged, &args) {
                    eprintln!("{message}");
                }
            }
            Err(rustyline::error::ReadlineError::Interrupted) => continue,
            Err(_) => break,
        }
    }
    let _ = std::fs::create_dir_all(config_dir());
    let _ = editor.save_history(&history);
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(api: &Api, args: &[&str]) -> Vec<Pair> {
        args.iter().map(|a| parse_pair(api, a).unwrap()).collect()
    }

    #[test]
    fn commands_become_requests_typed_by_the_catalog() {
        let create = catalog::named("CreateVmInstance").unwrap();
        let request = build(
            create,
            &pairs(
                create,
                &["name=vm1", "instanceOfferingUuid=o", "l3NetworkUuids=a,b", "userTags=web"],
            ),
        )
        .unwrap();
        assert_eq!(request.path, "/v1/vm-instances");
        assert_eq!(
            request.body.unwrap(),
            json!({ "params": { "name": "vm1", "instanceOfferingUuid": "o", "l3NetworkUuids": ["a", "b"] },
                    "systemTags": [], "userTags": ["web"] })
        );
        let missing = build(create, &pairs(create, &["name=vm1"])).err().unwrap().0;
        assert!(missing.contains("instanceOfferingUuid"), "{missing}");
        let unknown = build(create, &pairs(create, &["colour=red"])).err().unwrap().0;
        assert!(unknown.contains("colour") && unknown.contains("imageUuid"), "{unknown}");

        let start = catalog::named("StartVmInstance").unwrap();
        let request = build(start, &pairs(start, &["uuid=u1"])).unwrap();
        assert_eq!(
            (request.path.as_str(), request.body.unwrap()),
            ("/v1/vm-instances/u1/actions", json!({ "startVmInstance": {} }))
        );

        let query = catalog::named("QueryVmInstance").unwrap();
        let request = build(
            query,
            &pairs(query, &["state=Running", "cpuNum>2", "fields=uuid,name", "limit=10"]),
        )
        .unwrap();
        assert_eq!(
            request.path,
            "/v1/vm-instances?q=state%3DRunning&q=cpuNum%3E2&fields=uuid%2Cname&limit=10"
        );

        let login = catalog::named("LogInByAccount").unwrap();
        let request = build(login, &pairs(login, &["accountName=admin", "password=p"])).unwrap();
        assert_eq!(
            request.body.unwrap(),
            json!({ "logInByAccount": { "accountName": "admin", "password": "p" } })
        );
    }

    #[test]
    fn the_shell_completes_names_parameters_and_query_fields() {
        assert!(completions("QueryVm").1.contains(&"QueryVmInstance".to_owned()));
        let (at, fields) = completions("QueryVmInstance vmNics.");
        assert_eq!(at, 16);
        assert!(fields.contains(&"vmNics.ip=".to_owned()), "{fields:?}");
        let (_, params) = completions("CreateVmInstance instance");
        assert_eq!(params, ["instanceOfferingUuid="]);
    }

    #[test]
    fn tables_align_inventories() {
        let text = table(
            &json!({ "inventories": [{ "uuid": "u1", "name": "a", "vmNics": [] }, { "uuid": "u22", "name": "bb", "vmNics": [] }], "total": 2 }),
        );
        assert_eq!(text, "name  uuid\na     u1\nbb    u22\ntotal: 2");
    }
}
