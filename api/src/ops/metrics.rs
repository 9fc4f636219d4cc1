//! `/metrics`: the management node in Prometheus' text format.
//!
//! Counters and histograms that events feed (HTTP requests by route, method and status with
//! their latency; jobs by API and result) live for the whole process, since a job ends on
//! its own task far from any handler. Gauges that describe the present (queue depths and
//! live actors by kind, each host link's round-trip time, the GC's backlog) are read when
//! Prometheus scrapes, from the runtime's counters, which cost no message to any actor. The
//! page names kinds, queues, routes and host UUIDs, the cloud's shape, so it is the admin's
//! alone: a scraper sends an admin API key (Prometheus' `authorization` with `type: OAuth`
//! and `credentials: <key uuid>:<secret>`).

use std::sync::{Arc, LazyLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::jobs::JobState;
use crate::mn::Mn;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    api: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    kind: String,
    queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabels {
    host: String,
}

type Latency = Family<RouteLabels, Histogram, fn() -> Histogram>;

fn latency_buckets() -> Histogram {
    // 0.5 ms to about 8 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 15))
}

static REQUESTS: LazyLock<Family<RequestLabels, Counter>> = LazyLock::new(Family::default);
static LATENCY: LazyLock<Latency> =
    LazyLock::new(|| Family::new_with_constructor(latency_buckets as fn() -> Histogram));
/// The middleware that counts and times every routed request by its route template
/// (`/v1/vm-instances/{uuid}`, so UUIDs do not multiply the series).
pub async fn track(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    REQUESTS
        .get_or_create(&RequestLabels { route: route.clone(), method: method.clone(), status })
        .inc();
    LATENCY.get_or_create(&RouteLabels { route, method }).observe(started.elapsed().as_secs_f64());
    response
}

/// `GET /metrics`.
pub async fn scrape(State(mn): State<Arc<Mn>>) -> Response {
    let mut registry = Registry::with_prefix("strato");
    registry.register(
        "http_requests",
        "HTTP requests by route, method and status",
        REQUESTS.clone(),
    );
    registry.register(
        "http_request_duration_seconds",
        "HTTP request latency by route and method",
        LATENCY.clone(),
    );
    let jobs = Family::<JobLabels, Counter>::default();
    for (api, state, count) in mn.jobs.ended() {
        let result = match state {
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Running => "running",
        };
        jobs.get_or_create(&JobLabels { api, result: result.to_owned() }).inc_by(count);
    }
    registry.register("jobs", "API jobs ended, by API and result", jobs);

    let running = Family::<QueueLabels, Gauge>::default();
    let pending = Family::<QueueLabels, Gauge>::default();
    let live = Family::<KindLabels, Gauge>::default();
    for kind in mn.runtime.kinds() {
        live.get_or_create(&KindLabels { kind: kind.kind.to_owned() })
            .set(kind.counters.live as i64);
        for queue in kind.queues {
            let labels = QueueLabels { kind: kind.kind.to_owned(), queue: queue.name.to_owned() };
            running.get_or_create(&labels).set(queue.running as i64);
            pending.get_or_create(&labels).set(queue.pending as i64);
        }
    }
    registry.register("queue_running", "Operations running, by actor kind and queue", running);
    registry.register("queue_pending", "Operations waiting, by actor kind and queue", pending);
    registry.register("actors_live", "Live (activated) actors by kind", live);

    let rtt = Family::<HostLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    for (host, round_trip) in mn.hosts.entity().link_rtts() {
        rtt.get_or_create(&HostLabels { host: host.to_string() }).set(round_trip.as_secs_f64());
    }
    registry.register(
        "agent_link_rtt_seconds",
        "The last heartbeat round-trip time of each connected host's agent link",
        rtt,
    );
    let backlog: Gauge = Gauge::default();
    match mn.runtime.gc().list() {
        Ok(jobs) => {
            backlog.set(jobs.len() as i64);
        }
        Err(error) => tracing::warn!(%error, "metrics: cannot list GC jobs"),
    }
    registry.register("gc_backlog", "GC jobs waiting to succeed", backlog);

    let mut text = String::new();
    if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &registry) {
        tracing::error!(%error, "metrics: encoding failed");
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
        .into_response()
}
