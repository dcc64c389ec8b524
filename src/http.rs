//! The HTTP side of a node: a live dashboard and a JSON API (`--http`).
//! HTTP has no client certificates, so writes are off unless the operator
//! starts the node with `--http-write`; they then go through the cluster
//! client with this node's own certificate and are recorded as sent by
//! `http@node-<id>`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::StreamExt;
use tracing::info;

use crate::client::{render, Client, LogStream};
use crate::events::NodeEvent;
use crate::metrics::Metrics;
use crate::raft::{NodeId, Status};
use crate::server::api::Api;
use crate::server::{NodeError, NodeHandle};
use crate::wire::{ExportedEntry, Start, Until};

/// Most messages one `/messages` page returns.
pub const MAX_PAGE: u64 = 1000;

#[derive(Clone)]
pub struct HttpState {
    pub me: NodeId,
    pub api: Api,
    pub events: broadcast::Sender<NodeEvent>,
    pub metrics: Arc<Metrics>,
    pub write: bool,
    /// Reaches the leader (and every node's status) over QUIC.
    pub cluster: Arc<Client>,
}

/// Binds the HTTP port. A node binds it before it starts, so that a port
/// in use stops it before it takes any part in the cluster.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, NodeError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| NodeError::Bind {
            addr,
            hint: if source.kind() == std::io::ErrorKind::AddrInUse {
                " (another process holds that port: stop it or choose another --http)"
            } else {
                ""
            },
            error: source,
        })
}

/// Serves the dashboard and the JSON API of the running `node` on
/// `listener`, beside it (it stops with the node). Writes, if `write`
/// allows them, and other nodes' status go through a cluster client of
/// the HTTP side's own, with the node's certificate.
pub fn serve(
    listener: tokio::net::TcpListener,
    node: &NodeHandle,
    write: bool,
) -> Result<(), NodeError> {
    let cluster = Client::new(node.members().clone(), node.credentials())
        .map_err(|e| NodeError::Http(e.to_string()))?;
    let state = HttpState {
        me: node.id(),
        api: node.api().clone(),
        events: node.events().clone(),
        metrics: node.metrics().clone(),
        write,
        cluster: Arc::new(cluster),
    };
    if let Ok(http) = listener.local_addr() {
        info!(node = node.id(), %http, write, "dashboard at http://{http}/dashboard");
    }
    node.spawn(async move {
        if let Err(error) = axum::serve(listener, router(state)).await {
            tracing::error!("HTTP server stopped: {error}");
        }
    });
    Ok(())
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/", post(post_query))
        .route("/dashboard", get(dashboard))
        .route("/status", get(status))
        .route("/cluster", get(cluster))
        .route("/leader", get(leader))
        .route("/lamport_time", get(lamport_time))
        .route("/messages", get(messages).post(post_json))
        .route("/events", get(events))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// An error answer: a status code and a reason in JSON.
fn fail(code: StatusCode, reason: impl Into<String>) -> Response {
    (code, Json(json!({ "error": reason.into() }))).into_response()
}

async fn local_status(state: &HttpState) -> Result<Status, Response> {
    state
        .api
        .local_status()
        .await
        .map_err(|e| fail(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))
}

async fn dashboard() -> Html<&'static str> {
    Html(include_str!("dashboard.html"))
}

async fn status(State(state): State<HttpState>) -> Response {
    match local_status(&state).await {
        Ok(status) => {
            let mut value = serde_json::to_value(&status).unwrap_or_default();
            value["http_write"] = json!(state.write);
            // Peers of one cluster share it (see `wire::PeerHello`).
            value["cluster_digest"] = json!(format!("{:016x}", state.api.cluster_digest));
            Json(value).into_response()
        }
        Err(response) => response,
    }
}

/// Every node's status, as this node can reach it.
async fn cluster(State(state): State<HttpState>) -> Response {
    let mut nodes = Vec::new();
    // The members of the configuration in force, so a node added since
    // this one started is shown (the client's list if that is unknown).
    let local = state.api.local_status().await.ok();
    let mut ids: std::collections::BTreeSet<NodeId> = state.cluster.nodes().into_iter().collect();
    if let Some(status) = &local {
        state.cluster.learn_members(&status.membership.addresses);
        ids = status.membership.members().collect();
        ids.insert(state.me);
    }
    for id in ids {
        let status = if id == state.me {
            state.api.local_status().await.map_err(|e| e.to_string())
        } else {
            match tokio::time::timeout(Duration::from_secs(1), state.cluster.status(id)).await {
                Ok(result) => result.map_err(|e| e.to_string()),
                Err(_) => Err("no answer within 1 s".to_string()),
            }
        };
        nodes.push(match status {
            Ok(status) => serde_json::to_value(&status).unwrap_or_default(),
            Err(error) => json!({ "id": id, "error": error }),
        });
    }
    let membership = local.as_ref().map(|status| {
        json!({
            "voters": status.membership.voters,
            "learners": status.membership.learners,
            "addresses": status.membership.addresses,
            "index": status.membership_index,
            "change_in_progress": status.change_in_progress,
        })
    });
    Json(json!({
        "me": state.me,
        "http_write": state.write,
        "membership": membership,
        "nodes": nodes,
    }))
    .into_response()
}

async fn leader(State(state): State<HttpState>) -> Response {
    match local_status(&state).await {
        Ok(status) => Json(json!({ "leader": status.leader, "term": status.term })).into_response(),
        Err(response) => response,
    }
}

async fn lamport_time(State(state): State<HttpState>) -> Response {
    match local_status(&state).await {
        Ok(status) => Json(json!({ "lamport": status.lamport, "node": state.me })).into_response(),
        Err(response) => response,
    }
}

#[derive(Deserialize)]
struct Page {
    from: Option<String>,
    limit: Option<String>,
    /// The newest `last` messages instead of a page from `from`.
    last: Option<String>,
}

fn number(name: &str, value: &Option<String>) -> Result<Option<u64>, String> {
    match value {
        None => Ok(None),
        Some(text) => text
            .parse()
            .map(Some)
            .map_err(|_| format!("`{name}` must be a whole number, got {text:?}")),
    }
}

/// Committed messages of this node's replica, in log order, a page at a time.
async fn messages(State(state): State<HttpState>, Query(page): Query<Page>) -> Response {
    let parsed = (|| {
        Ok::<_, String>((
            number("from", &page.from)?,
            number("limit", &page.limit)?,
            number("last", &page.last)?,
        ))
    })();
    let (from, limit, last) = match parsed {
        Ok(values) => values,
        Err(reason) => return fail(StatusCode::BAD_REQUEST, reason),
    };
    let limit = limit.or(last).unwrap_or(100);
    if limit == 0 || limit > MAX_PAGE {
        return fail(
            StatusCode::BAD_REQUEST,
            format!("`limit` must be between 1 and {MAX_PAGE}"),
        );
    }
    let status = match local_status(&state).await {
        Ok(status) => status,
        Err(response) => return response,
    };
    let from = match (from, last) {
        (Some(_), Some(_)) => {
            return fail(StatusCode::BAD_REQUEST, "give `from` or `last`, not both")
        }
        (Some(0), None) => return fail(StatusCode::BAD_REQUEST, "`from` starts at 1"),
        (Some(from), None) => from,
        (None, Some(_)) => status.commit.saturating_sub(limit * 2).max(1),
        (None, None) => 1,
    };
    // Scan a bounded window of entries: no-ops take slots too.
    let window = if last.is_some() {
        limit * 2 + 1
    } else {
        limit * 2
    };
    let entries = match state.api.log.entries(from, status.commit, window as usize) {
        Ok(entries) => entries,
        Err(e) => return fail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let next = entries.last().map_or(from, |e| e.index + 1);
    let mut out: Vec<ExportedEntry> = entries
        .into_iter()
        .filter_map(ExportedEntry::from_entry)
        .collect();
    if last.is_some() {
        let skip = out.len().saturating_sub(limit as usize);
        out.drain(..skip);
    } else {
        out.truncate(limit as usize);
    }
    let next = match (last, out.last()) {
        (None, Some(last)) if out.len() as u64 == limit => last.index + 1,
        _ => next,
    };
    let out: Vec<serde_json::Value> = out.iter().map(ExportedEntry::to_json).collect();
    Json(json!({ "messages": out, "next": next, "commit": status.commit })).into_response()
}

#[derive(Deserialize)]
struct MessageQuery {
    message: Option<String>,
}

/// The original design's call: `POST /?message=TEXT`.
async fn post_query(State(state): State<HttpState>, Query(query): Query<MessageQuery>) -> Response {
    match query.message {
        Some(text) => send(&state, text).await,
        None => fail(
            StatusCode::BAD_REQUEST,
            "missing the `message` query parameter",
        ),
    }
}

#[derive(Deserialize)]
struct MessageBody {
    message: Option<String>,
    text: Option<String>,
}

/// `POST /messages` with `{"message": "..."}` (or `"text"`).
async fn post_json(
    State(state): State<HttpState>,
    body: Result<Json<MessageBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    match body {
        Ok(Json(MessageBody {
            message: Some(text),
            ..
        }))
        | Ok(Json(MessageBody {
            text: Some(text), ..
        })) => send(&state, text).await,
        Ok(_) => fail(
            StatusCode::BAD_REQUEST,
            "the JSON body needs a `message` field",
        ),
        Err(rejection) => fail(StatusCode::BAD_REQUEST, rejection.body_text()),
    }
}

async fn send(state: &HttpState, text: String) -> Response {
    if !state.write {
        return fail(
            StatusCode::FORBIDDEN,
            "writes over HTTP are disabled on this node: HTTP has no client certificates; start it with --http-write to allow them",
        );
    }
    if text.is_empty() {
        return fail(StatusCode::BAD_REQUEST, "the message is empty");
    }
    match state.cluster.send(vec![text]).await {
        Ok((leader, committed)) => match committed.first() {
            Some(c) => Json(render::committed_json(c, leader)).into_response(),
            None => fail(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the leader answered without a result",
            ),
        },
        Err(e) => {
            let code = if e.is_too_large() {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            fail(code, e.to_string())
        }
    }
}

/// Where `/events` starts: `?from=INDEX`, or after the `Last-Event-ID` a
/// reconnecting browser sends (a commit event's id is its index).
#[derive(Deserialize)]
struct EventsFrom {
    from: Option<String>,
}

/// Server-sent events: `commit` (from this node's own replica, in order,
/// none dropped), `leader` and `clock`, as they happen.
async fn events(
    State(state): State<HttpState>,
    headers: header::HeaderMap,
    Query(query): Query<EventsFrom>,
) -> Response {
    let resumed = headers
        .get("last-event-id")
        .and_then(|id| id.to_str().ok())
        .and_then(|id| id.trim().parse::<u64>().ok())
        .map(|index| index + 1);
    let start = match number("from", &query.from) {
        Ok(Some(0)) => return fail(StatusCode::BAD_REQUEST, "`from` starts at 1"),
        Ok(from) => from.or(resumed).map_or(Start::Last(0), Start::Index),
        Err(reason) => return fail(StatusCode::BAD_REQUEST, reason),
    };
    let commits = LogStream::new(state.cluster.clone(), start, Until::Follow)
        .only(state.me)
        .into_stream()
        .map(|entry| match entry {
            Ok(entry) => {
                let mut data = entry.to_json();
                data["type"] = json!("commit");
                Ok::<_, Infallible>(
                    Event::default()
                        .event("commit")
                        .id(entry.index.to_string())
                        .data(data.to_string()),
                )
            }
            Err(error) => Ok(Event::default()
                .event("error")
                .data(json!({ "type": "error", "error": error.to_string() }).to_string())),
        });
    let others = BroadcastStream::new(state.events.subscribe()).filter_map(|event| {
        let event = event.ok()?;
        let data = serde_json::to_string(&event).ok()?;
        Some(Ok(Event::default().event(event.name()).data(data)))
    });
    Sse::new(commits.merge(others))
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn metrics(State(state): State<HttpState>) -> Response {
    match local_status(&state).await {
        Ok(status) => (
            [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
            state.metrics.render(&status),
        )
            .into_response(),
        Err(response) => response,
    }
}
