//! This box's `/metrics` on a loopback address (`metrics_listen`, off by default): the same
//! names as the data center's (`lbs_box_…` with `pair` and `sid`), from the agent's own view,
//! so a local Prometheus agent or node exporter can pass them on even while the data center
//! is out of reach.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use lbs_host::metrics::{Exposition, Process, label};
use lbs_protocol::listen::{Serving, Unproven, serve_until};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::daemon::report::{box_report, report_details};
use crate::daemon::state::{Shared, lock, now_ms};

/// Connections at once (a scraper or two, a person with curl).
const CONNECTIONS: usize = 8;
/// A request's headers must arrive within this, the whole answer within twice it.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `address` (said at start: a port already taken stops the agent with the reason).
pub(crate) async fn bind(address: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot serve /metrics on {address} (metrics_listen)"))
}

/// Serves `GET /metrics` on `listener` until `shutdown`: one request per connection, its
/// headers within 5 s, the connection within 10 s, 8 connections at once.
pub(crate) async fn serve_metrics(
    shared: Arc<Shared>,
    listener: TcpListener,
    shutdown: CancellationToken,
) {
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let shared = shared.clone();
                async move {
                    (
                        StatusCode::OK,
                        [(
                            header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        exposition(&shared, now_ms(), &Process::now()),
                    )
                }
            }),
        )
        .fallback(|| async { (StatusCode::NOT_FOUND, "only /metrics is here\n").into_response() });
    let serving = Serving::new("the metrics endpoint", CONNECTIONS, Duration::from_secs(1))
        .with_unproven(Unproven::new(CONNECTIONS, CONNECTIONS, 2 * HEADER_TIMEOUT));
    serve_until(listener, shutdown, serving, |tcp, source, admission| {
        let app = app.clone();
        async move {
            // Nobody is ever proven here: the admission's deadline bounds the connection.
            let _admission = admission;
            let service = hyper_util::service::TowerToHyperService::new(
                app.into_service::<hyper::body::Incoming>(),
            );
            let served = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(16 * 1024)
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                .await;
            if let Err(err) = served {
                tracing::debug!(%source, "metrics connection: {err}");
            }
        }
    })
    .await;
}

/// The exposition of this box at `now`.
pub(crate) fn exposition(shared: &Shared, now: u64, process: &Process) -> String {
    let (pair, sid) = {
        let info = lock(&shared.info);
        (info.pair.clone(), info.sid.to_string())
    };
    let record = lock(&shared.machine).record.clone();
    let report = box_report(shared, &record);
    let details = report_details(shared, now);
    let labels = format!("pair=\"{}\",sid=\"{}\"", label(&pair), label(&sid));
    let one = |value: f64| [(labels.clone(), value)];
    let mut out = Exposition::new();
    out.family(
        "lbs_box_info",
        "gauge",
        "This box with its role as it holds it and its software (always 1).",
        [(
            format!(
                "{labels},role=\"{}\",software=\"{}\"",
                report.role, report.software
            ),
            1.0,
        )],
    );
    out.family(
        "lbs_pair_generation",
        "gauge",
        "The pair's generation as this box knows it.",
        [(
            format!("pair=\"{}\"", label(&pair)),
            record.generation.0 as f64,
        )],
    );
    out.family(
        "lbs_box_role_since_timestamp_seconds",
        "gauge",
        "When this box's role last changed, seconds since the epoch.",
        one(record.since_unix_ms as f64 / 1000.0),
    );
    let answered = lock(&shared.datacenter).last_answer_ms;
    out.family(
        "lbs_box_datacenter_answer_age_seconds",
        "gauge",
        "Seconds since the data center last answered this box's report (left out before the first answer).",
        answered.map(|at| (labels.clone(), now.saturating_sub(at) as f64 / 1000.0)),
    );
    let set_labels = |name: &str| format!("{labels},set=\"{}\"", label(name));
    out.family(
        "lbs_box_set_lag_seconds",
        "gauge",
        "How long the oldest change of a set not yet copied here has waited (0 in sync; sets whose lag is known).",
        details
            .sets
            .iter()
            .filter_map(|set| Some((set_labels(&set.name), set.lag_ms? as f64 / 1000.0))),
    );
    out.family(
        "lbs_box_set_pending_bytes",
        "gauge",
        "Bytes of a set not copied yet.",
        details
            .sets
            .iter()
            .map(|set| (set_labels(&set.name), set.pending_bytes as f64)),
    );
    out.family(
        "lbs_box_sync_pending_files",
        "gauge",
        "Files not copied yet, all sets.",
        one(report.sync.pending_files as f64),
    );
    out.family(
        "lbs_box_tunnel_up",
        "gauge",
        "Whether a tunnel to a data-center endpoint is healthy (1) or not (0).",
        report.tunnels.iter().map(|t| {
            (
                format!("{labels},tunnel=\"{}\"", label(&t.name)),
                if t.healthy { 1.0 } else { 0.0 },
            )
        }),
    );
    out.family(
        "lbs_box_pbx_healthy",
        "gauge",
        "Whether the PBX health check passed at its last run (1) or not (0), while this box runs the PBX with a check.",
        details
            .pbx
            .iter()
            .map(|pbx| (labels.clone(), if pbx.ok { 1.0 } else { 0.0 })),
    );
    out.process("lbs agent", process);
    out.finish()
}
