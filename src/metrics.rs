//! Counters and histograms a node keeps for `/metrics`, in the Prometheus
//! text format. Plain atomics: cheap enough for the hot path.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::raft::Status;

/// Upper bounds of the latency buckets, in seconds.
const BOUNDS: [f64; 12] = [
    0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0,
];

#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BOUNDS.len() + 1],
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let bucket = BOUNDS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(BOUNDS.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, bound) in BOUNDS.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.counts[BOUNDS.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(
            out,
            "{name}_sum {sum}\n{name}_count {}",
            self.count.load(Ordering::Relaxed)
        );
    }
}

#[derive(Default)]
pub struct Metrics {
    pub proposals: AtomicU64,
    pub commits: AtomicU64,
    /// Times this node saw the term change (each is an election somewhere).
    pub elections: AtomicU64,
    pub fsync: Histogram,
    pub commit_latency: Histogram,
    pub quic_bytes_sent: AtomicU64,
    pub quic_bytes_received: AtomicU64,
    /// Sends answered "busy" because too much was waiting to commit.
    pub busy_sends: AtomicU64,
    /// Client connections closed at once because too many were open.
    pub busy_connections: AtomicU64,
    /// Log entries the core holds in memory (the rest are in the store).
    pub entries_in_memory: AtomicU64,
    /// Configuration entries this node has applied (committed).
    pub membership_changes_applied: AtomicU64,
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
    );
}

fn gauge(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
    );
}

impl Metrics {
    pub fn render(&self, status: &Status) -> String {
        let mut out = String::new();
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        counter(
            &mut out,
            "cluster_store_proposals_total",
            "Client messages proposed to this node.",
            load(&self.proposals),
        );
        counter(
            &mut out,
            "cluster_store_commits_total",
            "Log entries committed and applied on this node.",
            load(&self.commits),
        );
        counter(
            &mut out,
            "cluster_store_elections_total",
            "Term changes seen by this node.",
            load(&self.elections),
        );
        counter(
            &mut out,
            "cluster_store_quic_bytes_sent_total",
            "Raft frame bytes sent to peers.",
            load(&self.quic_bytes_sent),
        );
        counter(
            &mut out,
            "cluster_store_quic_bytes_received_total",
            "Raft frame bytes received from peers.",
            load(&self.quic_bytes_received),
        );
        counter(
            &mut out,
            "cluster_store_busy_sends_total",
            "Sends refused with \"busy, retry\": too much was waiting to commit.",
            load(&self.busy_sends),
        );
        counter(
            &mut out,
            "cluster_store_busy_connections_total",
            "Client connections refused: too many were open.",
            load(&self.busy_connections),
        );
        counter(
            &mut out,
            "cluster_store_membership_changes_applied_total",
            "Configuration entries this node applied (committed).",
            load(&self.membership_changes_applied),
        );
        let _ = writeln!(
            out,
            "# HELP cluster_store_members Members of the configuration in force, by role.\n# TYPE cluster_store_members gauge\ncluster_store_members{{role=\"voter\"}} {}\ncluster_store_members{{role=\"learner\"}} {}",
            status.membership.voters.len(),
            status.membership.learners.len()
        );
        gauge(
            &mut out,
            "cluster_store_log_entries_in_memory",
            "Log entries held in memory; older ones are read from the store when needed.",
            load(&self.entries_in_memory),
        );
        gauge(
            &mut out,
            "cluster_store_term",
            "Current Raft term.",
            status.term,
        );
        gauge(
            &mut out,
            "cluster_store_commit_index",
            "Highest committed log index.",
            status.commit,
        );
        gauge(
            &mut out,
            "cluster_store_lamport",
            "This node's Lamport clock.",
            status.lamport,
        );
        gauge(
            &mut out,
            "cluster_store_is_leader",
            "1 if this node leads.",
            u64::from(status.leader == Some(status.id)),
        );
        let _ = writeln!(out, "# HELP cluster_store_follower_lag Entries each follower is behind the leader (leader only).\n# TYPE cluster_store_follower_lag gauge");
        for peer in &status.peers {
            let _ = writeln!(
                out,
                "cluster_store_follower_lag{{peer=\"{}\"}} {}",
                peer.id, peer.lag
            );
        }
        self.fsync.render(
            &mut out,
            "cluster_store_fsync_seconds",
            "Time to write and sync one batch.",
        );
        self.commit_latency.render(
            &mut out,
            "cluster_store_commit_seconds",
            "Time from proposal to commit on the leader.",
        );
        out
    }
}
