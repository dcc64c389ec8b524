//! What the client's answers look like to people and scripts: the text and
//! JSON forms of `node send`, `node status`, `node member list` and of a
//! membership change's outcome. The JSON forms are stable (README,
//! "Stable formats"); the HTTP API answers a send with the same object.
//! (A committed message's own forms are `ExportedEntry`'s.)

use std::fmt::Write as _;

use serde_json::{json, Value};

use crate::raft::{Committed, Index, NodeId, Status};
use crate::wire::MembersView;

use super::members::{AlreadyMember, ChangeReport};

/// One node's answer to a status request, or which node did not answer
/// and why.
pub type StatusAnswer = Result<Status, (NodeId, String)>;

/// `node send`'s line for a committed message.
pub fn committed_text(committed: &Committed, leader: NodeId) -> String {
    format!(
        "committed at index {} (term {}, lamport {}) by leader {leader}",
        committed.index, committed.term, committed.lamport
    )
}

/// `node send --json`'s object for a committed message (also the HTTP
/// API's answer to a write).
pub fn committed_json(committed: &Committed, leader: NodeId) -> Value {
    json!({
        "index": committed.index, "term": committed.term, "lamport": committed.lamport,
        "leader": leader,
    })
}

/// The leader of the latest term among the answers.
pub fn leader_of(answers: &[StatusAnswer]) -> Option<NodeId> {
    answers
        .iter()
        .filter_map(|s| s.as_ref().ok())
        .filter(|s| s.leader == Some(s.id))
        .max_by_key(|s| s.term)
        .map(|s| s.id)
}

/// `node status --json`: `{"leader": ..., "nodes": [...]}`, a node that
/// did not answer as `{"id": ..., "error": ...}`.
pub fn status_json(answers: &[StatusAnswer]) -> Value {
    let nodes: Vec<Value> = answers
        .iter()
        .map(|s| match s {
            Ok(status) => serde_json::to_value(status).unwrap_or_default(),
            Err((node, error)) => json!({"id": node, "error": error}),
        })
        .collect();
    json!({"leader": leader_of(answers), "nodes": nodes})
}

/// `node status`: the leader, the configuration as the leader sees it
/// (else the latest any node reports), then a line per node.
pub fn status_text(answers: &[StatusAnswer]) -> String {
    let leader = leader_of(answers);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "leader: {}",
        leader.map_or("none".to_string(), |l| l.to_string())
    );
    if let Some(s) = answers
        .iter()
        .filter_map(|s| s.as_ref().ok())
        .max_by_key(|s| (Some(s.id) == leader, s.membership_index))
    {
        let _ = writeln!(
            out,
            "configuration (index {}, as node {} sees it): {}{}",
            s.membership_index,
            s.id,
            s.membership,
            if s.change_in_progress {
                "; a change is in progress (not committed yet)"
            } else {
                ""
            }
        );
    }
    for answer in answers {
        match answer {
            Ok(s) => {
                let lag: Vec<String> = s
                    .peers
                    .iter()
                    .map(|p| format!("{}:{}", p.id, p.lag))
                    .collect();
                let _ = writeln!(
                    out,
                    "node {}: {:?}, term {}, commit {}, last {}, lamport {}{}{}",
                    s.id,
                    s.role,
                    s.term,
                    s.commit,
                    s.last_index,
                    s.lamport,
                    if lag.is_empty() {
                        String::new()
                    } else {
                        format!(", follower lag {}", lag.join(" "))
                    },
                    s.catch_up_floor.map_or(String::new(), |floor| format!(
                        ", rebuilt replica catching up to {floor}"
                    ))
                );
            }
            Err((node, error)) => {
                let _ = writeln!(out, "{}", unreachable_line(*node, error));
            }
        }
    }
    out
}

/// `node N: unreachable (...)`, naming the node once: the client's errors
/// start with "node N at ADDRESS".
fn unreachable_line(node: NodeId, error: &str) -> String {
    let own = format!("node {node} ");
    let error = error.strip_prefix(&own).unwrap_or(error);
    format!("node {node}: unreachable ({error})")
}

/// One row of `node member list`.
#[derive(Debug, PartialEq, serde::Serialize)]
pub struct MemberRow {
    pub id: NodeId,
    pub address: Option<String>,
    pub role: &'static str,
    /// From the leader's view only.
    pub match_index: Option<Index>,
    pub lag: Option<Index>,
}

/// Every member of the configuration in `view`, with its match index and
/// lag if `view` is the leader's.
pub fn member_rows(view: &MembersView) -> Vec<MemberRow> {
    let status = &view.status;
    let leading = status.leader == Some(status.id);
    status
        .membership
        .members()
        .map(|id| {
            let peer = status.peers.iter().find(|p| p.id == id);
            let (match_index, lag) = match peer {
                Some(peer) => (Some(peer.match_index), Some(peer.lag)),
                None if leading && id == status.id => (Some(status.last_index), Some(0)),
                None => (None, None),
            };
            MemberRow {
                id,
                address: status.membership.addresses.get(&id).cloned(),
                role: if status.membership.is_voter(id) {
                    "voter"
                } else {
                    "learner"
                },
                match_index,
                lag,
            }
        })
        .collect()
}

/// `node member list --json`.
pub fn members_json(view: &MembersView) -> Value {
    let status = &view.status;
    json!({
        "leader": status.leader,
        "answered_by": status.id,
        "configuration_index": status.membership_index,
        "change_in_progress": status.change_in_progress,
        "digest": format!("{:016x}", status.membership.digest()),
        "cluster_digest": format!("{:016x}", view.cluster_digest),
        "members": member_rows(view),
    })
}

/// `node member list`: a heading, then a table of the members.
pub fn members_text(view: &MembersView) -> String {
    let status = &view.status;
    let leading = status.leader == Some(status.id);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "configuration index {}{}, leader {}{}",
        status.membership_index,
        if status.change_in_progress {
            " (change in progress: not committed yet)"
        } else {
            ""
        },
        status.leader.map_or("none".to_string(), |l| l.to_string()),
        if leading {
            String::new()
        } else {
            format!(
                " (as node {} sees it; the leader did not answer, so no lag)",
                status.id
            )
        }
    );
    let _ = writeln!(
        out,
        "{:>4}  {:<24} {:<8} {:>10} {:>8}",
        "id", "address", "role", "match", "lag"
    );
    for row in member_rows(view) {
        let number = |n: Option<Index>| n.map_or("-".to_string(), |n| n.to_string());
        let _ = writeln!(
            out,
            "{:>4}  {:<24} {:<8} {:>10} {:>8}",
            row.id,
            row.address.as_deref().unwrap_or("-"),
            row.role,
            number(row.match_index),
            number(row.lag)
        );
    }
    out
}

/// A membership change's outcome for `--json`: what committed, or the
/// refusal with its reason in words and as data.
pub fn change_json(report: &ChangeReport) -> Value {
    let ChangeReport {
        change,
        leader,
        outcome,
    } = report;
    match outcome {
        Ok(index) => json!({
            "committed": true, "change": change.to_string(), "index": index, "leader": leader,
        }),
        Err(error) => json!({
            "committed": false, "change": change.to_string(), "error": error.to_string(),
            "refusal": serde_json::to_value(error).unwrap_or_default(), "leader": leader,
        }),
    }
}

/// A committed membership change in words (a refusal is an error:
/// `ChangeReport::into_result`).
pub fn change_text(report: &ChangeReport) -> Option<String> {
    let index = report.outcome.as_ref().ok()?;
    Some(format!(
        "committed: {} (configuration index {index}, leader {})",
        report.change, report.leader
    ))
}

/// A node that was a member already, for `--json` (see `Added::Already`).
pub fn already_json(already: &AlreadyMember) -> Value {
    json!({
        "committed": true, "change": already.change.to_string(), "already": already.role,
        "index": already.index, "leader": already.leader,
    })
}

/// A node that was a member already, in words.
pub fn already_text(id: NodeId, role: &str, address: &str) -> String {
    format!("node {id} is already a {role} at {address}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_node_is_named_once() {
        let answers: Vec<StatusAnswer> = vec![Err((
            3,
            "node 3 at 127.0.0.1:7103: Connection refused".to_string(),
        ))];
        assert!(
            status_text(&answers)
                .contains("node 3: unreachable (at 127.0.0.1:7103: Connection refused)\n"),
            "{}",
            status_text(&answers)
        );
        // An error that does not start with the node keeps all it says.
        assert_eq!(
            unreachable_line(3, "timed out after 2s"),
            "node 3: unreachable (timed out after 2s)"
        );
        // Node 3 is not node 33.
        assert_eq!(
            unreachable_line(3, "node 33 at a:1: refused"),
            "node 3: unreachable (node 33 at a:1: refused)"
        );
    }

    #[test]
    fn the_member_list_takes_match_and_lag_from_the_leader() {
        use crate::raft::{Config, HardState, Membership, PeerStatus, RaftNode};
        let membership = Membership {
            voters: [1, 2].into(),
            learners: [3].into(),
            addresses: (1..=3).map(|id| (id, format!("h{id}:7000"))).collect(),
        };
        let mut config = Config::new(1, [1, 2]);
        config.learners = [3].into();
        let node = RaftNode::new(config, HardState::default(), Vec::new()).unwrap();
        let mut status = node.status();
        status.membership = membership.clone();
        status.last_index = 50;
        status.leader = Some(1);
        status.peers = vec![PeerStatus {
            id: 3,
            voter: false,
            match_index: 20,
            lag: 30,
        }];
        let view = MembersView {
            status,
            committed: membership,
            committed_index: 0,
            cluster_digest: 0,
        };
        let rows = member_rows(&view);
        assert_eq!(
            rows,
            vec![
                MemberRow {
                    id: 1,
                    address: Some("h1:7000".into()),
                    role: "voter",
                    match_index: Some(50),
                    lag: Some(0),
                },
                MemberRow {
                    id: 2,
                    address: Some("h2:7000".into()),
                    role: "voter",
                    match_index: None,
                    lag: None,
                },
                MemberRow {
                    id: 3,
                    address: Some("h3:7000".into()),
                    role: "learner",
                    match_index: Some(20),
                    lag: Some(30),
                },
            ]
        );
        let text = members_text(&view);
        assert_eq!(
            text.lines().nth(2),
            Some("   1  h1:7000                  voter            50        0")
        );
        assert_eq!(members_json(&view)["members"][2]["lag"], 30);
    }
}
