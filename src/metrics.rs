//! What a node counts for `/metrics`. Kept and written out by the official
//! `prometheus-client` crate, in the Prometheus text format (0.0.4), so the
//! exposition rules (types, escaping, histogram buckets) are not ours to get
//! right. Counters and gauges are atomics; a histogram takes a short lock,
//! and each one is observed by a single thread: cheap enough for the hot path.
//!
//! Names are registered without the `cluster_store_` prefix, and counters
//! without `_total`: the encoder adds both, so `commits` is exposed as
//! `cluster_store_commits_total`. Tests and dashboards grep those names.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};

use crate::raft::Status;

/// The `Content-Type` of what [`Metrics::render`] returns.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

const PREFIX: &str = "cluster_store";

/// Upper bounds of the latency buckets, in seconds: from a fast disk's
/// fsync (0.1 ms) to a stalled commit (1 s).
const BOUNDS: [f64; 12] = [
    0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// A gauge of a count that is never negative.
type Count = Gauge<u64, AtomicU64>;

/// The metrics a node's threads update. Each field is a handle sharing its
/// value with the copy in the registry, so updating it needs no lookup.
#[derive(Debug)]
pub struct Metrics {
    pub proposals: Counter,
    pub commits: Counter,
    /// Times this node saw the term change (each is an election somewhere).
    pub elections: Counter,
    /// Seconds to write and sync one batch.
    pub fsync: Histogram,
    /// Writes of lazy appends staged to share a later sync
    /// (`Message::Append::lazy`): this follower was not needed for commit.
    pub lazy_writes: Counter,
    /// Appends to lazy followers that a leader merged into one it held,
    /// or that one it held absorbed (`server::held_appends`): the
    /// messages, packets and follower wake-ups the hold saved.
    pub merged_appends: Counter,
    /// Seconds from proposal to commit on the leader.
    pub commit_latency: Histogram,
    pub quic_bytes_sent: Counter,
    pub quic_bytes_received: Counter,
    /// Sends answered "busy" because too much was waiting to commit.
    pub busy_sends: Counter,
    /// Sends behind others on a pipelined stream that waited for room
    /// (instead of "busy") because too much was waiting to commit.
    pub waited_sends: Counter,
    /// Client connections closed at once because too many were open.
    pub busy_connections: Counter,
    /// Log entries the core holds in memory (the rest are in the store).
    pub entries_in_memory: Count,
    /// Configuration entries this node has applied (committed).
    pub membership_changes_applied: Counter,
    /// Watches this node serves now (`node watch`, exports, `/events`).
    pub watchers: Count,
    registry: Registry,
}

/// Registers `metric` under `name` and hands back the caller's handle.
fn registered<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    // The crate ends every help text with a full stop of its own.
    registry.register(name, help, metric.clone());
    metric
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        let r = &mut registry;
        let counter = Counter::default;
        let latency = || Histogram::new(BOUNDS);
        Metrics {
            proposals: registered(
                r,
                "proposals",
                "Client messages proposed to this node",
                counter(),
            ),
            commits: registered(
                r,
                "commits",
                "Log entries committed and applied on this node",
                counter(),
            ),
            elections: registered(r, "elections", "Term changes seen by this node", counter()),
            lazy_writes: registered(
                r,
                "lazy_writes",
                "Writes of entries the leader did not need at once, staged to share a later sync",
                counter(),
            ),
            merged_appends: registered(
                r,
                "merged_appends",
                "Appends to lazy followers merged into one the leader held (messages saved)",
                counter(),
            ),
            quic_bytes_sent: registered(
                r,
                "quic_bytes_sent",
                "Raft frame bytes sent to peers",
                counter(),
            ),
            quic_bytes_received: registered(
                r,
                "quic_bytes_received",
                "Raft frame bytes received from peers",
                counter(),
            ),
            busy_sends: registered(
                r,
                "busy_sends",
                "Sends refused with \"busy, retry\": too much was waiting to commit",
                counter(),
            ),
            waited_sends: registered(
                r,
                "waited_sends",
                "Pipelined sends that waited for room: too much was waiting to commit",
                counter(),
            ),
            busy_connections: registered(
                r,
                "busy_connections",
                "Client connections refused: too many were open",
                counter(),
            ),
            membership_changes_applied: registered(
                r,
                "membership_changes_applied",
                "Configuration entries this node applied (committed)",
                counter(),
            ),
            entries_in_memory: registered(
                r,
                "log_entries_in_memory",
                "Log entries held in memory; older ones are read from the store when needed",
                Count::default(),
            ),
            watchers: registered(
                r,
                "watchers",
                "Watches of the committed log this node serves now (node watch, exports, /events)",
                Count::default(),
            ),
            fsync: registered(
                r,
                "fsync_seconds",
                "Time to write and sync one batch",
                latency(),
            ),
            commit_latency: registered(
                r,
                "commit_seconds",
                "Time from proposal to commit on the leader",
                latency(),
            ),
            registry,
        }
    }
}

impl Metrics {
    /// The text for `/metrics`: the live metrics, then gauges read from
    /// `status` just now. Those go in a registry of their own, made per
    /// request, so two scrapes at once never see each other's values and a
    /// follower that left the configuration leaves the lag list.
    pub fn render(&self, status: &Status) -> String {
        let mut now = Registry::with_prefix(PREFIX);
        let r = &mut now;
        let gauge = |value: u64| {
            let gauge = Count::default();
            gauge.set(value);
            gauge
        };
        let members = registered(
            r,
            "members",
            "Members of the configuration in force, by role",
            Family::<[(&str, &str); 1], Count>::default(),
        );
        members
            .get_or_create(&[("role", "voter")])
            .set(status.membership.voters.len() as u64);
        members
            .get_or_create(&[("role", "learner")])
            .set(status.membership.learners.len() as u64);
        registered(r, "term", "Current Raft term", gauge(status.term));
        registered(
            r,
            "commit_index",
            "Highest committed log index",
            gauge(status.commit),
        );
        registered(
            r,
            "lamport",
            "This node's Lamport clock",
            gauge(status.lamport),
        );
        let leads = u64::from(status.leader == Some(status.id));
        registered(r, "is_leader", "1 if this node leads", gauge(leads));
        let lag = registered(
            r,
            "follower_lag",
            "Entries each follower is behind the leader (leader only)",
            Family::<[(&str, String); 1], Count>::default(),
        );
        for peer in &status.peers {
            lag.get_or_create(&[("peer", peer.id.to_string())])
                .set(peer.lag);
        }
        let mut out = String::new();
        prometheus_text::encode(&mut out, &self.registry).expect("writing to a String");
        prometheus_text::encode(&mut out, &now).expect("writing to a String");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::{Membership, PeerStatus, Role};

    /// The exposed names are an interface (tests, dashboards, alerts): this
    /// is the list `/metrics` had before the move to `prometheus-client`.
    #[test]
    fn names_and_types_stay() {
        let metrics = Metrics::default();
        metrics.commits.inc_by(3);
        metrics.commit_latency.observe(0.003);
        let status = Status {
            id: 1,
            role: Role::Leader,
            term: 7,
            leader: Some(1),
            commit: 12,
            applied: 12,
            last_index: 12,
            last_term: 7,
            persisted_index: 12,
            lamport: 40,
            sessions: 0,
            peers: vec![PeerStatus {
                id: 2,
                voter: true,
                match_index: 10,
                lag: 2,
            }],
            catch_up_floor: None,
            membership: Membership {
                voters: [1, 2, 3].into(),
                learners: [4].into(),
                addresses: Default::default(),
            },
            membership_index: 0,
            change_in_progress: false,
            committed_voter: true,
        };
        let text = metrics.render(&status);
        let mut types: Vec<&str> = text
            .lines()
            .filter_map(|line| line.strip_prefix("# TYPE "))
            .collect();
        types.sort();
        assert_eq!(
            types,
            [
                "cluster_store_busy_connections_total counter",
                "cluster_store_busy_sends_total counter",
                "cluster_store_commit_index gauge",
                "cluster_store_commit_seconds histogram",
                "cluster_store_commits_total counter",
                "cluster_store_elections_total counter",
                "cluster_store_follower_lag gauge",
                "cluster_store_fsync_seconds histogram",
                "cluster_store_is_leader gauge",
                "cluster_store_lamport gauge",
                "cluster_store_lazy_writes_total counter",
                "cluster_store_log_entries_in_memory gauge",
                "cluster_store_members gauge",
                "cluster_store_membership_changes_applied_total counter",
                "cluster_store_merged_appends_total counter",
                "cluster_store_proposals_total counter",
                "cluster_store_quic_bytes_received_total counter",
                "cluster_store_quic_bytes_sent_total counter",
                "cluster_store_term gauge",
                "cluster_store_waited_sends_total counter",
                "cluster_store_watchers gauge",
            ]
        );
        for line in [
            "# HELP cluster_store_commits_total Log entries committed and applied on this node.",
            "cluster_store_commits_total 3",
            "cluster_store_members{role=\"voter\"} 3",
            "cluster_store_members{role=\"learner\"} 1",
            "cluster_store_term 7",
            "cluster_store_commit_index 12",
            "cluster_store_lamport 40",
            "cluster_store_is_leader 1",
            "cluster_store_follower_lag{peer=\"2\"} 2",
            "cluster_store_commit_seconds_bucket{le=\"0.002\"} 0",
            "cluster_store_commit_seconds_bucket{le=\"0.005\"} 1",
            "cluster_store_commit_seconds_bucket{le=\"1\"} 1",
            "cluster_store_commit_seconds_bucket{le=\"+Inf\"} 1",
            "cluster_store_commit_seconds_sum 0.003",
            "cluster_store_commit_seconds_count 1",
            "cluster_store_fsync_seconds_count 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing from:\n{text}"
            );
        }
    }
}
