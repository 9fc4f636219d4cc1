//! The client side of the API: the one HTTP client (this module), the CLI ([`cli`]), the
//! main job (`strato up`, [`up`]) and the runtime demonstration ([`demo`]).
//!
//! The client is a minimal HTTP/1.1 client for a Strato API on the local network, without a
//! second HTTP stack in the build; the CLI, `strato up`, the tests and the chaos and load
//! runs all use it. A process logs in once per API ([`log_in`]); every request to that API
//! then carries the session, as a person's shell would after `LogInByAccount`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::types::{Accepted, Inventories, JobReply};

pub mod cli;
pub mod demo;
pub mod up;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The connection failed.
    #[error("cannot reach the API at {addr}")]
    Io {
        /// Where.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The reply was not HTTP or not JSON.
    #[error("the API at {addr} answered something that is not JSON over HTTP: {reply}")]
    Malformed {
        /// Where.
        addr: SocketAddr,
        /// The start of the reply.
        reply: String,
    },
    /// The API answered with an error.
    #[error("{method} {path} failed ({status}): {body}")]
    Api {
        /// The method.
        method: String,
        /// The path.
        path: String,
        /// The status.
        status: u16,
        /// The error body.
        body: Value,
    },
}

/// The session this process holds with each API it logged in to.
static SESSIONS: std::sync::Mutex<Vec<(SocketAddr, String)>> = std::sync::Mutex::new(Vec::new());

/// Logs in to the API at `addr` and keeps the session for every later request to it.
/// Returns the session's UUID.
pub fn log_in(addr: SocketAddr, account: &str, password: &str) -> Result<String, ClientError> {
    let body =
        serde_json::json!({ "logInByAccount": { "accountName": account, "password": password } });
    let (status, reply) = request(addr, "PUT", "/v1/accounts/login", Some(&body))?;
    let session =
        reply["inventory"]["uuid"].as_str().filter(|_| status == 200).ok_or_else(|| {
            ClientError::Api {
                method: "PUT".into(),
                path: "/v1/accounts/login".into(),
                status,
                body: reply.clone(),
            }
        })?;
    let mut sessions = SESSIONS.lock().expect("sessions");
    sessions.retain(|(a, _)| *a != addr);
    sessions.push((addr, session.to_owned()));
    Ok(session.to_owned())
}

fn session_of(addr: SocketAddr) -> Option<String> {
    SESSIONS.lock().expect("sessions").iter().find(|(a, _)| *a == addr).map(|(_, s)| s.clone())
}

/// One request; returns the status and the JSON body.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), ClientError> {
    request_with_headers(addr, method, path, body, &[])
}

/// One request with extra headers (such as `X-Job-UUID`); returns the status and the JSON
/// body. The session this process holds with the API goes along unless `headers` carry an
/// `Authorization`.
pub fn request_with_headers(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
    headers: &[(&str, &str)],
) -> Result<(u16, Value), ClientError> {
    let session = session_of(addr).map(|s| format!("OAuth {s}"));
    let mut all = headers.to_vec();
    if let Some(auth) = &session
        && !headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("authorization"))
    {
        all.push(("Authorization", auth));
    }
    let body = body.map(Value::to_string);
    let reply = send(addr, method, path, body.as_deref(), &all)?;
    match reply.body {
        Value::String(text) if !text.is_empty() => {
            Err(ClientError::Malformed { addr, reply: text.chars().take(200).collect() })
        }
        body => Ok((reply.status, body)),
    }
}

/// An answer as it came: its status, headers (names in lower case) and body (JSON, or the
/// text when it is not JSON).
#[derive(Debug, Clone)]
pub struct Reply {
    /// The status.
    pub status: u16,
    /// The headers, in order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Value,
}

/// One HTTP/1.1 request exactly as given (`body` as raw text, `headers` and nothing more but
/// `Host`, `Content-Type` and `Content-Length`), on a connection of its own.
pub fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> Result<Reply, ClientError> {
    let io = |source| ClientError::Io { addr, source };
    let mut stream = TcpStream::connect(addr).map_err(io)?;
    stream.set_read_timeout(Some(Duration::from_secs(60))).map_err(io)?;
    let body = body.unwrap_or_default();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).map_err(io)?;
    stream.write_all(body.as_bytes()).map_err(io)?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).map_err(io)?;
    let text = String::from_utf8_lossy(&reply);
    let malformed = || ClientError::Malformed { addr, reply: text.chars().take(200).collect() };
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(malformed)?;
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(malformed)?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let body = if body.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_owned()))
    };
    Ok(Reply { status, headers, body })
}

/// The path to `GET` the job at `location` (what a `202` answers), holding the answer until
/// the job ends or `wait` (whole seconds) passes: a waiter wakes when the job ends, where a
/// poller learns it a poll later and costs the node a request per poll.
pub fn job_path(location: &str, wait: Duration) -> String {
    let path = location.find("/v1/").map_or("", |at| &location[at..]);
    format!("{path}?waitSeconds={}", wait.as_secs())
}

/// Sends a mutation, waits for its job, and returns the inventory (or the job's error).
pub fn mutate(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &Value,
) -> Result<Value, ClientError> {
    let (status, reply) = request(addr, method, path, Some(body))?;
    let api_error =
        |status, body| ClientError::Api { method: method.into(), path: path.into(), status, body };
    let accepted: Accepted = match (status, serde_json::from_value(reply.clone())) {
        (202, Ok(accepted)) => accepted,
        _ => return Err(api_error(status, reply)),
    };
    let job = job_path(&accepted.location, Duration::from_secs(30));
    let started = Instant::now();
    loop {
        let (status, done) = request(addr, "GET", &job, None)?;
        match (status, serde_json::from_value::<JobReply>(done.clone())) {
            (200, Ok(JobReply::Done { inventory })) => return Ok(inventory),
            (202, _) if started.elapsed() < Duration::from_secs(600) => {}
            _ => return Err(api_error(status, done)),
        }
    }
}

/// A wire type (`crate::types`) as the body it is sent as.
pub fn body<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// Creates a resource (`POST path` with `{"params": params}`), waits for its job, and returns
/// its inventory (or the job's error).
pub fn create<P: serde::Serialize>(
    addr: SocketAddr,
    path: &str,
    params: P,
) -> Result<Value, ClientError> {
    mutate(addr, "POST", path, &body(&crate::types::Create::new(params)))
}

/// The inventories of `kind` (`/v1/<kind>`).
pub fn list(addr: SocketAddr, kind: &str) -> Result<Vec<Value>, ClientError> {
    let path = format!("/v1/{kind}");
    let (status, reply) = request(addr, "GET", &path, None)?;
    match (status, serde_json::from_value::<Inventories>(reply.clone())) {
        (200, Ok(listed)) => Ok(listed.inventories),
        _ => Err(ClientError::Api { method: "GET".into(), path, status, body: reply }),
    }
}
