//! Raft scenarios as scripts: `tests/scripts/raft/*.txt`, run over the
//! sans-IO core through the hand-driven cluster of `tests/common` (the one
//! `raft_scenarios.rs` uses). The format and how to update expectations
//! are in `tests/scripts/runner.rs` and `tests/scripts/README.md`.
//!
//! After every command but `trace` and the queries (`status`, `log`,
//! `disk`, `queue`), the output ends with one line per node:
//!
//! ```text
//! n1@2 leader last=5@2 commit=5
//! n2@2 follower(n1) last=5@2 commit=4 persisted=3
//! n3 down: disk term=2 vote=n1 last=4@2 commit=4
//! ```
//!
//! `n1@2` is node 1 at term 2; `last` the index@term of its last entry;
//! `commit` its commit index; `persisted` shows only while it trails
//! `last`. Before the table come the command's events: with `trace on`,
//! each message taken off the network (`n1 -> n2 Append ...`, or `dropped`
//! with why), then the answers clients got (`c7#1 ok 2@1 lamport=2`, or
//! `c7#1 error LeadershipLost`) and reads (`read 5 ok index=3`).
//!
//! Commands (node lists are `1` or `1,2,3`; `n` is a count):
//!
//! - `cluster nodes=N [learners=K] [option=value...]`: a new cluster of
//!   voters 1..=N and learners N+1..=N+K, each node seeded with its id.
//!   Options: `pre-vote`, `check-quorum` (true/false), `election-ticks`,
//!   `heartbeat-ticks`, `max-append` (entries per append), `max-inflight`,
//!   `memory` (entries kept in memory), `max-command-bytes`,
//!   `session-window`, `max-sessions`, `session-idle`,
//!   `priorities=1:1,2:2`, and `sync=manual` (log writes are durable only
//!   after `persist`; by default at once).
//! - `campaign ID`: the node starts an election now (nothing delivered).
//! - `elect ID [quiet]`: make ID leader as `Cluster::elect` does: the
//!   others tick alone until their leases lapse (what they send is lost),
//!   ID campaigns, everything is delivered; up to 3 tries, else an error
//!   line. `quiet` stops delivering once it wins and loses its first
//!   appends (`Cluster::elect_quietly`).
//! - `tick IDS [n] [hold|drop]`: n rounds (default 1) of ticking IDS, each
//!   followed by delivering until the network is quiet; `hold` leaves what
//!   they send queued, `drop` discards it.
//! - `tick-all [n]`: n rounds of ticking every node that is up, delivering
//!   after each.
//! - `propose ID TEXT... [client=C] [seq=S] [lamport=L] [since=I]
//!   [after=A] [deliver]`: client C (default 1) proposes each TEXT at node
//!   ID, with sequence numbers from S (default: the client's next).
//!   `m{1..5}` expands to m1 ... m5. With `after`, the first must follow
//!   the client's message A and each later one the one before it, as a
//!   pipelined stream's sends do (`Proposal::after`). `deliver` delivers
//!   everything after each.
//! - `deliver [from=IDS] [to=IDS] [n=N]`: delivers queued messages (and
//!   what they cause) until the network is quiet; with `from`/`to`, only
//!   messages on those links, the others stay queued; with `n`, at most N.
//! - `drop [from=IDS] [to=IDS]`: discards queued messages.
//! - `queue`: lists queued messages.
//! - `partition IDS | IDS`, `partition IDS`: cuts every link between the
//!   two groups (the second defaults to everyone else), both ways.
//! - `cut A -> B...`, `cut A <-> B...`: cuts links one way, or both.
//! - `heal`: restores every link.
//! - `crash ID`, `restart ID`: a crash loses what the node had not
//!   persisted and the messages on their way to it; a restart reads back
//!   its disk.
//! - `persist [IDS]`: the nodes' pending log writes become durable (with
//!   `sync=manual`), and the acknowledgements that waited for them leave.
//! - `read ID [ctx=K]`: a ReadIndex at node ID (default ctx 1).
//! - `transfer ID TARGET`: the node hands leadership to TARGET.
//! - `rebuild ID [floor=none]`: `node rebuild`: the node loses its disk
//!   and restarts from the plan the others' statuses give, which is
//!   printed; `floor=none` leaves out the catch-up floor.
//! - `trace on|off`: print each message taken off the network.
//! - `status [IDS]`: the table with more per node: vote, applied,
//!   persisted, Lamport clock, sessions, entries in memory, peers' match
//!   indexes, catch-up floor.
//! - `log IDS`, `disk IDS`: the nodes' logs in memory, or on their disks
//!   (nodes with equal logs print together), one entry a line:
//!   `index@term payload lamport=L`; a run of one client's numbered
//!   messages prints as one line: `2..101@1 "m1".."m100" c1#1..100
//!   lamport=2..101`.

mod common;
#[path = "scripts/runner.rs"]
mod runner;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use cluster_store::raft::{
    AppendResult, Config, Entry, Envelope, Message, NodeId, Payload, Proposal, ProposeResponse,
    RebuildPlan, RequestId, Role,
};
use common::{Cluster, Hop};
use runner::{Command, Driver};

struct RaftDriver {
    cluster: Option<Cluster>,
    /// The next sequence number of each client.
    next_seq: BTreeMap<u64, u64>,
    /// How many responses, reads and traced hops were already printed.
    responses_seen: usize,
    reads_seen: usize,
}

type Res<T> = Result<T, String>;

/// A change to every node's configuration, from a `cluster` option.
type Tweak = Box<dyn Fn(&mut Config)>;

fn node_id(word: &str) -> Res<NodeId> {
    word.trim_start_matches('n')
        .parse()
        .map_err(|_| format!("bad node id {word}"))
}

fn node_list(word: &str) -> Res<Vec<NodeId>> {
    word.split(',').map(node_id).collect()
}

/// `m{1..3}` is m1, m2, m3; anything else is itself.
fn expand(text: &str) -> Res<Vec<String>> {
    let Some((head, rest)) = text.split_once('{') else {
        return Ok(vec![text.to_string()]);
    };
    let Some((range, tail)) = rest.split_once('}') else {
        return Ok(vec![text.to_string()]);
    };
    let Some((from, to)) = range.split_once("..") else {
        return Ok(vec![text.to_string()]);
    };
    let (from, to): (u64, u64) = match (from.parse(), to.parse()) {
        (Ok(f), Ok(t)) => (f, t),
        _ => return Err(format!("bad range in {text}")),
    };
    Ok((from..=to).map(|i| format!("{head}{i}{tail}")).collect())
}

fn position(index: u64, term: Option<u64>) -> String {
    match term {
        Some(term) => format!("{index}@{term}"),
        None => format!("{index}@?"),
    }
}

/// Entries as index@term, runs of one term written first..last@term.
fn entries_brief(entries: &[Entry]) -> String {
    let mut runs: Vec<(u64, u64, u64)> = Vec::new();
    for e in entries {
        match runs.last_mut() {
            Some((_, last, term)) if *term == e.term && *last + 1 == e.index => *last = e.index,
            _ => runs.push((e.index, e.index, e.term)),
        }
    }
    let runs: Vec<String> = runs
        .iter()
        .map(|(first, last, term)| {
            if first == last {
                format!("{first}@{term}")
            } else {
                format!("{first}..{last}@{term}")
            }
        })
        .collect();
    format!("[{}]", runs.join(" "))
}

fn message_line(m: &Envelope) -> String {
    let body = match &m.message {
        Message::PreVote {
            last_index,
            last_term,
        } => format!("PreVote term={} last={last_index}@{last_term}", m.term),
        Message::PreVoteResponse { granted } => format!(
            "PreVoteResponse term={} {}",
            m.term,
            if *granted { "granted" } else { "refused" }
        ),
        Message::Vote {
            last_index,
            last_term,
            transfer,
        } => format!(
            "Vote term={} last={last_index}@{last_term}{}",
            m.term,
            if *transfer { " transfer" } else { "" }
        ),
        Message::VoteResponse { granted, .. } => format!(
            "VoteResponse term={} {}",
            m.term,
            if *granted { "granted" } else { "refused" }
        ),
        Message::Append {
            prev_index,
            prev_term,
            entries,
            commit,
            lazy,
        } => format!(
            "Append term={} prev={prev_index}@{prev_term} {} commit={commit}{}",
            m.term,
            entries_brief(entries),
            if *lazy { " lazy" } else { "" }
        ),
        Message::AppendResponse(AppendResult::Accepted { match_index }) => {
            format!("AppendResponse term={} accept match={match_index}", m.term)
        }
        Message::AppendResponse(AppendResult::Rejected {
            reject_index,
            hint_index,
            hint_term,
            lost,
        }) => format!(
            "AppendResponse term={} reject at={reject_index} hint={}{}",
            m.term,
            match hint_term {
                Some(t) => format!("{hint_index}@{t}"),
                None => format!("{hint_index} (log ends before)"),
            },
            if *lost { " lost" } else { "" }
        ),
        Message::Heartbeat { commit, read_seq } => {
            format!("Heartbeat term={} commit={commit} read={read_seq}", m.term)
        }
        Message::HeartbeatResponse { read_seq } => {
            format!("HeartbeatResponse term={} read={read_seq}", m.term)
        }
        Message::TimeoutNow => format!("TimeoutNow term={}", m.term),
    };
    format!("n{} -> n{} {body}", m.from, m.to)
}

fn text_of(data: &[u8]) -> String {
    let text = String::from_utf8_lossy(data);
    if text.chars().count() > 40 {
        let head: String = text.chars().take(20).collect();
        format!("{head:?}... ({} bytes)", data.len())
    } else {
        format!("{text:?}")
    }
}

fn payload_word(entry: &Entry) -> String {
    match &entry.payload {
        Payload::Noop => "noop".to_string(),
        Payload::Command(c) => format!("{} c{}#{}", text_of(&c.data), c.client_id, c.seq),
        Payload::Membership(m) => {
            let ids = |s: &std::collections::BTreeSet<NodeId>| {
                s.iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            format!(
                "membership voters={} learners={}",
                ids(&m.voters),
                ids(&m.learners)
            )
        }
    }
}

/// A command's text split as prefix and trailing number ("m12": "m", 12).
fn numbered(entry: &Entry) -> Option<(u64, u64, &str, u64)> {
    let Payload::Command(c) = &entry.payload else {
        return None;
    };
    let text = std::str::from_utf8(&c.data).ok()?;
    let digits = text.len() - text.trim_end_matches(|ch: char| ch.is_ascii_digit()).len();
    if digits == 0 || digits > 9 {
        return None;
    }
    let (prefix, number) = text.split_at(text.len() - digits);
    Some((c.client_id, c.seq, prefix, number.parse().ok()?))
}

/// One line per entry (`index@term payload lamport=L`), except that a run
/// of one client's numbered messages ("m1", "m2", ...) at consecutive
/// indexes, sequence numbers and stamps in one term prints as one line.
fn log_lines(entries: &[Entry]) -> Vec<String> {
    let mut lines = Vec::new();
    let mut i = 0;
    while i < entries.len() {
        let first = &entries[i];
        let mut j = i + 1;
        if let Some((client, seq, prefix, number)) = numbered(first) {
            while let Some(next) = entries.get(j) {
                let k = (j - i) as u64;
                let follows = numbered(next) == Some((client, seq + k, prefix, number + k))
                    && next.term == first.term
                    && next.index == first.index + k
                    && next.lamport == first.lamport + k;
                if !follows {
                    break;
                }
                j += 1;
            }
        }
        if j - i < 3 {
            j = i + 1;
            lines.push(format!(
                "{}@{} {} lamport={}",
                first.index,
                first.term,
                payload_word(first),
                first.lamport
            ));
        } else {
            let last = &entries[j - 1];
            let (client, seq, prefix, number) = numbered(first).expect("a run");
            let (_, last_seq, _, last_number) = numbered(last).expect("a run");
            lines.push(format!(
                "{}..{}@{} \"{prefix}{number}\"..\"{prefix}{last_number}\" c{client}#{seq}..{last_seq} lamport={}..{}",
                first.index, last.index, first.term, first.lamport, last.lamport
            ));
        }
        i = j;
    }
    lines
}

/// Consecutive successes of one client at consecutive indexes, stamps and
/// sequence numbers print as one line.
fn responses_lines(responses: &[ProposeResponse]) -> Vec<String> {
    let mut lines = Vec::new();
    let mut i = 0;
    while i < responses.len() {
        let r = &responses[i];
        match &r.result {
            Err(error) => {
                lines.push(format!("c{}#{} error {error:?}", r.id.client_id, r.id.seq));
                i += 1;
            }
            Ok(first) => {
                let mut j = i + 1;
                while j < responses.len() {
                    let (prev, next) = (&responses[j - 1], &responses[j]);
                    let (Ok(p), Ok(n)) = (&prev.result, &next.result) else {
                        break;
                    };
                    if next.id.client_id != r.id.client_id
                        || next.id.seq != prev.id.seq + 1
                        || n.index != p.index + 1
                        || n.term != p.term
                        || n.lamport != p.lamport + 1
                    {
                        break;
                    }
                    j += 1;
                }
                let last = &responses[j - 1];
                let Ok(l) = &last.result else { unreachable!() };
                if j == i + 1 {
                    lines.push(format!(
                        "c{}#{} ok {}@{} lamport={}",
                        r.id.client_id, r.id.seq, first.index, first.term, first.lamport
                    ));
                } else {
                    lines.push(format!(
                        "c{}#{}..{} ok {}..{}@{} lamport={}..{}",
                        r.id.client_id,
                        r.id.seq,
                        last.id.seq,
                        first.index,
                        l.index,
                        first.term,
                        first.lamport,
                        l.lamport
                    ));
                }
                i = j;
            }
        }
    }
    lines
}

fn role_word(role: Role, leader: Option<NodeId>) -> String {
    let name = match role {
        Role::Leader => return "leader".into(),
        Role::Candidate => return "candidate".into(),
        Role::PreCandidate => return "pre-candidate".into(),
        Role::Follower => "follower",
        Role::Learner => "learner",
    };
    match leader {
        Some(l) => format!("{name}(n{l})"),
        None => name.to_string(),
    }
}

impl RaftDriver {
    fn new() -> Self {
        RaftDriver {
            cluster: None,
            next_seq: BTreeMap::new(),
            responses_seen: 0,
            reads_seen: 0,
        }
    }

    fn c(&mut self) -> Res<&mut Cluster> {
        self.cluster
            .as_mut()
            .ok_or_else(|| "no cluster yet: start with `cluster nodes=N`".to_string())
    }

    fn up(&mut self, id: NodeId) -> Res<()> {
        let c = self.c()?;
        if !c.configs.contains_key(&id) {
            return Err(format!("no node {id}"));
        }
        if !c.nodes.contains_key(&id) {
            return Err(format!("node {id} is down"));
        }
        Ok(())
    }

    fn known(&mut self, ids: &[NodeId]) -> Res<()> {
        let c = self.c()?;
        for id in ids {
            if !c.configs.contains_key(id) {
                return Err(format!("no node {id}"));
            }
        }
        Ok(())
    }

    /// One line per node.
    fn table(&self, out: &mut String) {
        let Some(c) = &self.cluster else { return };
        for id in c.configs.keys() {
            match c.nodes.get(id) {
                Some(node) => {
                    let log = node.log();
                    write!(
                        out,
                        "n{id}@{} {} last={} commit={}",
                        node.term(),
                        role_word(node.role(), node.leader()),
                        position(log.last_index(), log.term(log.last_index())),
                        node.commit_index()
                    )
                    .unwrap();
                    if node.persisted_index() < log.last_index() {
                        write!(out, " persisted={}", node.persisted_index()).unwrap();
                    }
                    out.push('\n');
                }
                None => {
                    let disk = &c.disks[id];
                    let last = disk.log.last().map_or(0, |e| e.index);
                    let term = disk.log.last().map_or(0, |e| e.term);
                    let vote = disk
                        .hard_state
                        .vote
                        .map_or("none".to_string(), |v| format!("n{v}"));
                    writeln!(
                        out,
                        "n{id} down: disk term={} vote={vote} last={last}@{term} commit={}",
                        disk.hard_state.term, disk.hard_state.commit
                    )
                    .unwrap();
                }
            }
        }
    }

    /// What happened since the last command: the network (when traced),
    /// then answers to clients and reads.
    fn events(&mut self, out: &mut String) {
        let Some(c) = &mut self.cluster else { return };
        if let Some(trace) = &mut c.trace {
            for hop in trace.drain(..) {
                match hop {
                    Hop::Delivered(m) => writeln!(out, "{}", message_line(&m)).unwrap(),
                    Hop::Dropped(m, why) => {
                        writeln!(out, "{} (dropped: {why})", message_line(&m)).unwrap()
                    }
                }
            }
        }
        for line in responses_lines(&c.responses[self.responses_seen..]) {
            writeln!(out, "{line}").unwrap();
        }
        self.responses_seen = c.responses.len();
        for read in &c.reads[self.reads_seen..] {
            match &read.result {
                Ok(index) => writeln!(out, "read {} ok index={index}", read.ctx).unwrap(),
                Err(error) => writeln!(out, "read {} error {error:?}", read.ctx).unwrap(),
            }
        }
        self.reads_seen = c.reads.len();
    }

    fn cluster(&mut self, cmd: &mut Command) -> Res<String> {
        let voters: u64 = cmd.parsed("nodes")?.ok_or("missing nodes=N")?;
        let learners: u64 = cmd.parsed("learners")?.unwrap_or(0);
        let mut tweaks: Vec<Tweak> = Vec::new();
        macro_rules! tweak {
            ($key:literal, $ty:ty, |$cfg:ident, $v:ident| $body:expr) => {
                if let Some($v) = cmd.parsed::<$ty>($key)? {
                    tweaks.push(Box::new(move |$cfg: &mut Config| $body));
                }
            };
        }
        tweak!("pre-vote", bool, |cfg, v| cfg.pre_vote = v);
        tweak!("check-quorum", bool, |cfg, v| cfg.check_quorum = v);
        tweak!("election-ticks", u64, |cfg, v| cfg.election_ticks = v);
        tweak!("heartbeat-ticks", u64, |cfg, v| cfg.heartbeat_ticks = v);
        tweak!("max-append", usize, |cfg, v| cfg.max_append_entries = v);
        tweak!("max-inflight", usize, |cfg, v| cfg.max_inflight = v);
        tweak!("memory", usize, |cfg, v| cfg.memory_entries = v);
        tweak!("max-command-bytes", usize, |cfg, v| cfg.max_command_bytes =
            v);
        tweak!("session-window", usize, |cfg, v| cfg.session_window = v);
        tweak!("max-sessions", usize, |cfg, v| cfg.max_sessions = v);
        tweak!("session-idle", u64, |cfg, v| cfg.session_idle_entries = v);
        if let Some(priorities) = cmd.option("priorities") {
            let mut map = BTreeMap::new();
            for pair in priorities.split(',') {
                let (id, p) = pair
                    .split_once(':')
                    .ok_or_else(|| format!("bad priority {pair}: use id:priority"))?;
                let p: u32 = p.parse().map_err(|_| format!("bad priority {pair}"))?;
                map.insert(node_id(id)?, p);
            }
            tweaks.push(Box::new(move |cfg: &mut Config| {
                cfg.priorities = map.clone();
            }));
        }
        let manual_sync = match cmd.option("sync").as_deref() {
            None | Some("auto") => false,
            Some("manual") => true,
            Some(other) => return Err(format!("sync={other}: use auto or manual")),
        };
        cmd.finish()?;
        let voter_ids: Vec<NodeId> = (1..=voters).collect();
        let learner_ids: Vec<NodeId> = (voters + 1..=voters + learners).collect();
        let mut cluster = Cluster::new(&voter_ids, &learner_ids, |cfg| {
            for tweak in &tweaks {
                tweak(cfg);
            }
        });
        cluster.manual_sync = manual_sync;
        self.cluster = Some(cluster);
        self.next_seq.clear();
        self.responses_seen = 0;
        self.reads_seen = 0;
        Ok(String::new())
    }

    fn propose(&mut self, cmd: &mut Command) -> Res<String> {
        let at = node_id(&cmd.required("node")?)?;
        let client: u64 = cmd.parsed("client")?.unwrap_or(1);
        let seq: Option<u64> = cmd.parsed("seq")?;
        let lamport: u64 = cmd.parsed("lamport")?.unwrap_or(0);
        let since: u64 = cmd.parsed("since")?.unwrap_or(0);
        let mut after: Option<RequestId> = cmd.parsed("after")?.map(|seq| RequestId {
            client_id: client,
            seq,
        });
        let deliver = cmd.flag("deliver");
        let mut texts = Vec::new();
        while let Some(word) = cmd.next() {
            texts.extend(expand(&word)?);
        }
        if texts.is_empty() {
            return Err("nothing to propose".into());
        }
        cmd.finish()?;
        self.up(at)?;
        let first = seq.unwrap_or_else(|| self.next_seq.get(&client).copied().unwrap_or(1));
        for (seq, text) in (first..).zip(texts) {
            let next = self.next_seq.entry(client).or_insert(1);
            *next = (*next).max(seq + 1);
            let c = self.c()?;
            let id = RequestId {
                client_id: client,
                seq,
            };
            let follows = after;
            if after.is_some() {
                after = Some(id);
            }
            c.node_mut(at).propose(Proposal {
                id,
                lamport,
                since,
                sender: format!("client-{client}").into(),
                data: Bytes::from(text),
                after: follows,
                ctx: 0,
            });
            c.drain(at);
            if deliver {
                c.deliver_all();
            }
        }
        Ok(String::new())
    }

    /// Delivers queued messages matching the filters until none is left
    /// (or `limit` were delivered).
    fn deliver(&mut self, cmd: &mut Command) -> Res<String> {
        let from = cmd.option("from").map(|w| node_list(&w)).transpose()?;
        let to = cmd.option("to").map(|w| node_list(&w)).transpose()?;
        let limit: Option<usize> = cmd.parsed("n")?;
        cmd.finish()?;
        let c = self.c()?;
        if from.is_none() && to.is_none() && limit.is_none() {
            c.deliver_all();
            return Ok(String::new());
        }
        let matches = |m: &Envelope| {
            from.as_ref().is_none_or(|f| f.contains(&m.from))
                && to.as_ref().is_none_or(|t| t.contains(&m.to))
        };
        c.drain_all();
        let mut delivered = 0;
        while limit.is_none_or(|l| delivered < l) {
            let Some(at) = c.queue.iter().position(matches) else {
                break;
            };
            let message = c.queue.remove(at).expect("found above");
            c.queue.push_front(message);
            c.deliver_one();
            delivered += 1;
            assert!(delivered < 100_000, "the network never went quiet");
        }
        Ok(String::new())
    }

    fn drop(&mut self, cmd: &mut Command) -> Res<String> {
        let from = cmd.option("from").map(|w| node_list(&w)).transpose()?;
        let to = cmd.option("to").map(|w| node_list(&w)).transpose()?;
        cmd.finish()?;
        let c = self.c()?;
        c.drain_all();
        let before = c.queue.len();
        c.queue.retain(|m| {
            !(from.as_ref().is_none_or(|f| f.contains(&m.from))
                && to.as_ref().is_none_or(|t| t.contains(&m.to)))
        });
        let dropped = before - c.queue.len();
        let s = if dropped == 1 { "" } else { "s" };
        Ok(format!("dropped {dropped} queued message{s}\n"))
    }

    fn tick(&mut self, cmd: &mut Command) -> Res<String> {
        let ids = node_list(&cmd.required("nodes")?)?;
        let hold = cmd.flag("hold");
        let drop = cmd.flag("drop");
        let n: u64 = match cmd.next() {
            Some(n) => n.parse().map_err(|_| format!("bad count {n}"))?,
            None => 1,
        };
        cmd.finish()?;
        self.known(&ids)?;
        let c = self.c()?;
        match (hold, drop) {
            (true, true) => return Err("hold or drop, not both".into()),
            (false, true) => c.tick_silently(&ids, n),
            (true, false) => {
                for _ in 0..n {
                    for id in &ids {
                        if let Some(node) = c.nodes.get_mut(id) {
                            node.tick();
                        }
                        c.drain(*id);
                    }
                }
            }
            (false, false) => c.tick(&ids, n),
        }
        Ok(String::new())
    }

    fn partition(&mut self, cmd: &mut Command) -> Res<String> {
        let mut left = Vec::new();
        let mut right = Vec::new();
        let mut seen_bar = false;
        while let Some(word) = cmd.next() {
            if word == "|" {
                seen_bar = true;
            } else if seen_bar {
                right.extend(node_list(&word)?);
            } else {
                left.extend(node_list(&word)?);
            }
        }
        cmd.finish()?;
        self.known(&left)?;
        self.known(&right)?;
        let c = self.c()?;
        if !seen_bar {
            right = c
                .configs
                .keys()
                .copied()
                .filter(|id| !left.contains(id))
                .collect();
        }
        for a in &left {
            for b in &right {
                c.cut.insert((*a, *b));
                c.cut.insert((*b, *a));
            }
        }
        Ok(String::new())
    }

    fn cut(&mut self, cmd: &mut Command) -> Res<String> {
        let from = node_list(&cmd.required("node")?)?;
        let both = match cmd.required("-> or <->")?.as_str() {
            "->" => false,
            "<->" => true,
            other => return Err(format!("expected -> or <->, found {other}")),
        };
        let mut to = Vec::new();
        while let Some(word) = cmd.next() {
            to.extend(node_list(&word)?);
        }
        cmd.finish()?;
        self.known(&from)?;
        self.known(&to)?;
        let c = self.c()?;
        for a in &from {
            for b in &to {
                c.cut.insert((*a, *b));
                if both {
                    c.cut.insert((*b, *a));
                }
            }
        }
        Ok(String::new())
    }

    fn status(&mut self, cmd: &mut Command) -> Res<String> {
        let ids = cmd.next().map(|w| node_list(&w)).transpose()?;
        cmd.finish()?;
        let c = self.c()?;
        let ids = ids.unwrap_or_else(|| c.configs.keys().copied().collect());
        let mut out = String::new();
        for id in ids {
            let Some(node) = c.nodes.get(&id) else {
                writeln!(out, "n{id} down").unwrap();
                continue;
            };
            let s = node.status();
            write!(
                out,
                "n{id}@{} {} last={}@{} commit={} vote={} applied={} persisted={} lamport={} sessions={} in-memory={}",
                s.term,
                role_word(s.role, s.leader),
                s.last_index,
                s.last_term,
                node.commit_index(),
                node.vote().map_or("none".to_string(), |v| format!("n{v}")),
                s.applied,
                s.persisted_index,
                s.lamport,
                s.sessions,
                node.entries_in_memory(),
            )
            .unwrap();
            if !s.peers.is_empty() {
                let peers: Vec<String> = s
                    .peers
                    .iter()
                    .map(|p| format!("n{}:{}", p.id, p.match_index))
                    .collect();
                write!(out, " match={{{}}}", peers.join(" ")).unwrap();
            }
            if let Some(floor) = s.catch_up_floor {
                write!(out, " floor={}@{}", floor.index, floor.term).unwrap();
            }
            out.push('\n');
        }
        Ok(out)
    }

    /// `log IDS` / `disk IDS`: nodes whose logs are equal print together.
    fn log(&mut self, cmd: &mut Command, disk: bool) -> Res<String> {
        let ids = node_list(&cmd.required("node")?)?;
        cmd.finish()?;
        self.known(&ids)?;
        let mut groups: Vec<(Vec<NodeId>, Vec<String>)> = Vec::new();
        for id in ids {
            let c = self.c()?;
            let mut lines = Vec::new();
            if disk {
                lines.extend(log_lines(&c.disks[&id].log));
            } else {
                let Some(node) = c.nodes.get(&id) else {
                    return Err(format!("node {id} is down (its disk: `disk {id}`)"));
                };
                let log = node.log();
                if log.offset() > 0 {
                    lines.push(format!("(1..={} released to the store)", log.offset()));
                }
                lines.extend(log_lines(
                    &log.range(1, log.last_index()).cloned().collect::<Vec<_>>(),
                ));
            }
            if lines.is_empty() {
                lines.push("(empty)".into());
            }
            match groups.iter_mut().find(|(_, l)| *l == lines) {
                Some((ids, _)) => ids.push(id),
                None => groups.push((vec![id], lines)),
            }
        }
        let mut out = String::new();
        for (ids, lines) in groups {
            let names: Vec<String> = ids.iter().map(|i| format!("n{i}")).collect();
            writeln!(
                out,
                "{}{}:",
                if disk { "disk " } else { "" },
                names.join(" ")
            )
            .unwrap();
            for line in lines {
                writeln!(out, "  {line}").unwrap();
            }
        }
        Ok(out)
    }

    fn command(&mut self, cmd: &mut Command) -> Res<(String, bool)> {
        let mut out = String::new();
        let table = match cmd.name.as_str() {
            "cluster" => {
                out = self.cluster(cmd)?;
                true
            }
            "campaign" => {
                let id = node_id(&cmd.required("node")?)?;
                cmd.finish()?;
                self.up(id)?;
                let c = self.c()?;
                c.node_mut(id).campaign();
                c.drain(id);
                true
            }
            "elect" => {
                let id = node_id(&cmd.required("node")?)?;
                let quiet = cmd.flag("quiet");
                cmd.finish()?;
                self.up(id)?;
                let c = self.c()?;
                for _ in 0..3 {
                    c.start_election(id);
                    if quiet {
                        while c.node(id).role() != Role::Leader && c.deliver_one() {}
                    } else {
                        c.deliver_all();
                    }
                    if c.node(id).role() == Role::Leader {
                        break;
                    }
                }
                if c.node(id).role() == Role::Leader {
                    if quiet {
                        c.queue.retain(|m| m.from != id);
                    }
                } else {
                    writeln!(out, "n{id} did not win in 3 elections").unwrap();
                }
                true
            }
            "tick" => {
                out = self.tick(cmd)?;
                true
            }
            "tick-all" => {
                let n: u64 = match cmd.next() {
                    Some(n) => n.parse().map_err(|_| format!("bad count {n}"))?,
                    None => 1,
                };
                cmd.finish()?;
                self.c()?.tick_all(n);
                true
            }
            "propose" => {
                out = self.propose(cmd)?;
                true
            }
            "deliver" => {
                out = self.deliver(cmd)?;
                true
            }
            "drop" => {
                out = self.drop(cmd)?;
                true
            }
            "queue" => {
                cmd.finish()?;
                let c = self.c()?;
                c.drain_all();
                for m in &c.queue {
                    writeln!(out, "{}", message_line(m)).unwrap();
                }
                if out.is_empty() {
                    out.push_str("(empty)\n");
                }
                false
            }
            "partition" => {
                out = self.partition(cmd)?;
                true
            }
            "cut" => {
                out = self.cut(cmd)?;
                true
            }
            "heal" => {
                cmd.finish()?;
                self.c()?.heal();
                true
            }
            "crash" => {
                let id = node_id(&cmd.required("node")?)?;
                cmd.finish()?;
                self.up(id)?;
                self.c()?.crash(id);
                true
            }
            "restart" => {
                let id = node_id(&cmd.required("node")?)?;
                cmd.finish()?;
                self.known(&[id])?;
                let c = self.c()?;
                if c.nodes.contains_key(&id) {
                    return Err(format!("node {id} is up"));
                }
                c.restart(id);
                true
            }
            "persist" => {
                let ids = cmd.next().map(|w| node_list(&w)).transpose()?;
                cmd.finish()?;
                let c = self.c()?;
                let ids = ids.unwrap_or_else(|| c.nodes.keys().copied().collect());
                for id in ids {
                    c.persist(id);
                }
                true
            }
            "read" => {
                let id = node_id(&cmd.required("node")?)?;
                let ctx: u64 = cmd.parsed("ctx")?.unwrap_or(1);
                cmd.finish()?;
                self.up(id)?;
                let c = self.c()?;
                c.node_mut(id).read_index(ctx);
                c.drain(id);
                true
            }
            "transfer" => {
                let id = node_id(&cmd.required("node")?)?;
                let target = node_id(&cmd.required("target")?)?;
                cmd.finish()?;
                self.up(id)?;
                let c = self.c()?;
                match c.node_mut(id).transfer_leadership(target) {
                    Ok(()) => writeln!(out, "n{id} transfers to n{target}").unwrap(),
                    Err(e) => writeln!(out, "n{id} cannot transfer to n{target}: {e:?}").unwrap(),
                }
                c.drain(id);
                true
            }
            "rebuild" => {
                let id = node_id(&cmd.required("node")?)?;
                let keep_floor = match cmd.option("floor").as_deref() {
                    None => true,
                    Some("none") => false,
                    Some(other) => return Err(format!("floor={other}: only floor=none")),
                };
                cmd.finish()?;
                self.up(id)?;
                let c = self.c()?;
                let plan = if keep_floor {
                    c.rebuild(id)
                } else {
                    // As `Cluster::rebuild`, without the floor.
                    c.crash(id);
                    let statuses: Vec<_> = c.nodes.values().map(|n| n.status()).collect();
                    let mut plan = RebuildPlan::from_peers(&statuses);
                    plan.floor = None;
                    c.disks.insert(
                        id,
                        common::Disk {
                            hard_state: plan.hard_state(id),
                            log: Vec::new(),
                            catch_up_floor: None,
                        },
                    );
                    c.restart(id);
                    plan
                };
                let hs = plan.hard_state(id);
                let floor = plan
                    .floor
                    .map_or("none".to_string(), |f| format!("{}@{}", f.index, f.term));
                writeln!(
                    out,
                    "n{id} rebuilt: term={} vote={} commit={} floor={floor}",
                    hs.term,
                    hs.vote.map_or("none".to_string(), |v| format!("n{v}")),
                    hs.commit
                )
                .unwrap();
                true
            }
            "trace" => {
                let on = match cmd.required("on or off")?.as_str() {
                    "on" => true,
                    "off" => false,
                    other => return Err(format!("trace {other}: use on or off")),
                };
                cmd.finish()?;
                let c = self.c()?;
                c.trace = on.then(Vec::new);
                false
            }
            "status" => {
                out = self.status(cmd)?;
                false
            }
            "log" => {
                out = self.log(cmd, false)?;
                false
            }
            "disk" => {
                out = self.log(cmd, true)?;
                false
            }
            other => return Err(format!("unknown command {other}")),
        };
        Ok((out, table))
    }
}

impl Driver for RaftDriver {
    fn run(&mut self, cmd: &mut Command) -> Res<String> {
        let (output, table) = self.command(cmd)?;
        let mut out = String::new();
        self.events(&mut out);
        out.push_str(&output);
        if table {
            self.table(&mut out);
        }
        Ok(out)
    }
}

fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/raft")
}

fn run(name: &str) {
    let path = scripts_dir().join(format!("{name}.txt"));
    runner::run_script(&path, &mut RaftDriver::new());
}

macro_rules! scripts {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                run(stringify!($name));
            }
        )*

        /// Every script in the folder has its test above.
        #[test]
        fn every_script_is_listed() {
            let listed = [$(stringify!($name)),*];
            let mut missing = Vec::new();
            for entry in std::fs::read_dir(scripts_dir()).expect("the scripts folder") {
                let path = entry.expect("a folder entry").path();
                if path.extension().is_some_and(|e| e == "txt") {
                    let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
                    if !listed.contains(&stem.as_str()) {
                        missing.push(stem);
                    }
                }
            }
            assert!(missing.is_empty(), "add to scripts! in raft_scripts.rs: {missing:?}");
        }
    };
}

scripts! {
    check_quorum,
    deferred_pre_vote,
    divergent_tail,
    election,
    figure_8,
    held_proposals,
    lagging_follower,
    lamport,
    late_votes,
    lazy_followers,
    ordered_proposals,
    learners,
    pre_vote,
    priorities,
    read_index,
    rebuilt_follower,
    rebuilt_learner,
    rebuilt_voter_floor,
    refused_proposals,
    released_entries,
    replication,
    retries,
    rival_pre_candidates,
    sessions,
    shorter_log,
    single_node,
    slow_round_trip,
    split_vote,
    stale_leader,
    stale_vote_answers,
    successor_first,
    transfer,
    vote_persistence,
    vote_with_pre_vote,
}
