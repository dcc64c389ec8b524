//! Real-process scenarios as scripts: `tests/scripts/cluster/*.txt`, run
//! over `TestCluster` (real `node` processes, QUIC with mutual TLS, on one
//! 127.0.0.x address per script). The format and how to update
//! expectations are in `tests/scripts/runner.rs` and
//! `tests/scripts/README.md`; `raft_scripts.rs` does the same over the
//! sans-IO core.
//!
//! Real processes are not deterministic: which node wins an election, how
//! many terms a split vote costs, when a follower hears of a commit. So
//! every command first waits for the cluster to settle, and the output
//! names what a run does not pin:
//!
//! ```text
//! L2 leader term=t2 last=102@t2 commit=102
//! F1 follower(L2) term=t2 last=102@t2 commit=102
//! L1 down
//! n4 learner(L2) term=t2 last=102@t2 commit=102
//! n? follower(L2) term=t2 last=102@t2 commit=102
//! ```
//!
//! - Nodes by name: `L1` is the first node seen leading, `L2` the next
//!   different one; `F1`, `F2` the followers the script picked with
//!   `follower`; `n4` a node the script named by number (or a learner or a
//!   joined node, which are not interchangeable with the others); `n?` a
//!   node with no name, which the run may have picked at random. Rows come
//!   in that order (`n?` rows by their text). A node with two names shows
//!   both (`F1/L2`).
//! - Terms by alias: `t1` is the first term printed, `t2` the next
//!   different one, and so on; a new term below one already seen prints
//!   as `t3(below t2)`, which no expectation should hold.
//! - `last` is the index@term of the node's last entry, `commit` its
//!   commit index: exact, because the table waits for them.
//!
//! Settled means: one running node leads, every running member answers
//! at its term, names it leader, holds its whole log (same last index and
//! term), has committed all of it and has no catch-up floor left, no
//! configuration change is pending; and two polls 100 ms apart agree.
//! When fewer than a majority of the voters run (every node killed, say),
//! no leader can be waited for: settled then means nobody leads, every
//! running node answers, and terms and logs hold still; such rows say
//! `no-leader` instead of a role. A cluster that does not settle within
//! 30 s prints `not settled` and what it saw, with real ids and terms: the
//! test fails with that diff.
//!
//! Commands (`NODES` is a number `2`, a name `L1`, `leader`, `follower`
//! (a running follower with no name, which becomes `F1`, `F2`, ...),
//! `others` (every node with no name) or `all`, or a comma list of them):
//!
//! - `start 1,2,3 [learners=4]`: a new cluster; waits for a leader.
//! - `send [n=10] [client=alice] [batch=1]`: sends n messages through the
//!   client library (`Client::send`), `batch` per request, and waits for
//!   each acknowledgement; texts `m1`, `m2`, ... continue per client.
//!   Prints where they were acknowledged (`alice m1..m10 acknowledged at
//!   2..11@t1`), then the table.
//! - `kill NODES`: kill -9. `restart NODES`: starts them again on their
//!   data. `pause NODES` / `resume NODES`: SIGSTOP / SIGCONT.
//! - `wipe NODES`: deletes a stopped node's data directory (a lost disk).
//! - `rebuild NODE`: `node rebuild` of a stopped node (the operator
//!   command); prints the term it starts at and its catch-up floor.
//! - `member add ID [learner]`: signs a certificate, asks the leader to
//!   add the node as a learner, starts it with `--join` and, without
//!   `learner`, promotes it once caught up. `member promote ID`.
//! - `export`: the committed log through the client (a linearizable
//!   read): every client's messages as runs (`alice m1..m100 at
//!   2..101@t1`), then whether each acknowledged message is there once at
//!   the index it was acknowledged at, whether stamps increase, and
//!   whether every running node's own replica holds the same log.
//! - `status`: the table. `sleep 1s` (or `500ms`): waits, prints nothing.
//!
//! Every command but `export` and `sleep` ends with the table.

mod nodes;
#[path = "scripts/runner.rs"]
mod runner;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cluster_store::client::Client;
use cluster_store::raft::{ChangeError, MembershipChange, NodeId, Role, Status};
use cluster_store::wire::ExportedEntry;
use nodes::TestCluster;
use runner::{Command, Driver};

type Res<T> = Result<T, String>;

/// How long a command waits for the cluster to settle.
const SETTLE_WITHIN: Duration = Duration::from_secs(30);
/// How long one status request may take.
const ASK_WITHIN: Duration = Duration::from_secs(2);

/// What one node looks like from outside.
#[derive(Clone, Debug)]
enum Seen {
    Down,
    Paused,
    /// Running, and did not answer (starting, or stuck): why.
    Silent(String),
    Up(Box<Status>),
}

/// What a settled table compares between two polls.
type Fingerprint = Vec<(NodeId, Option<(Role, u64, Option<NodeId>, u64, u64, u64)>)>;

/// Without a quorum, who a node follows and whether it is probing with
/// pre-votes come and go: only its log and term must hold still.
fn fingerprint(seen: &BTreeMap<NodeId, Seen>, quorum: bool) -> Fingerprint {
    seen.iter()
        .map(|(id, s)| {
            let key = match s {
                Seen::Up(st) => Some((
                    match st.role {
                        Role::PreCandidate | Role::Candidate if !quorum => Role::Follower,
                        role => role,
                    },
                    st.term,
                    st.leader.filter(|_| quorum),
                    st.last_index,
                    st.last_term,
                    st.commit,
                )),
                _ => None,
            };
            (*id, key)
        })
        .collect()
}

/// A cluster without a quorum running has settled once nobody leads any
/// more (a leader that lost its quorum steps down) and every running node
/// answers.
fn leaderless(seen: &BTreeMap<NodeId, Seen>) -> Result<Option<NodeId>, String> {
    for (id, s) in seen {
        match s {
            Seen::Silent(why) => return Err(format!("node {id} does not answer: {why}")),
            Seen::Up(st) if st.role == Role::Leader => {
                return Err(format!("node {id} still leads without a quorum"))
            }
            _ => {}
        }
    }
    Ok(None)
}

/// The leader of a settled cluster, or why it is not settled.
fn settled(seen: &BTreeMap<NodeId, Seen>) -> Result<Option<NodeId>, String> {
    let mut leaders = Vec::new();
    for (id, s) in seen {
        match s {
            Seen::Silent(why) => return Err(format!("node {id} does not answer: {why}")),
            Seen::Up(st) if st.role == Role::Leader => leaders.push((*id, st)),
            _ => {}
        }
    }
    let (leader, ls) = match leaders.as_slice() {
        [one] => *one,
        [] => return Err("no leader".into()),
        _ => return Err("more than one node leads".into()),
    };
    if ls.commit != ls.last_index {
        return Err(format!("the leader has not committed its log ({leader})"));
    }
    if ls.change_in_progress {
        return Err("a configuration change is pending".into());
    }
    for (id, s) in seen {
        let Seen::Up(st) = s else { continue };
        if !ls.membership.contains(*id) {
            continue;
        }
        let caught_up = st.term == ls.term
            && st.leader == Some(leader)
            && st.last_index == ls.last_index
            && st.last_term == ls.last_term
            && st.commit == ls.last_index
            && st.catch_up_floor.is_none();
        if !caught_up {
            return Err(format!("node {id} has not caught up"));
        }
    }
    Ok(Some(leader))
}

/// `2m`, `1s`, `500ms`.
fn duration(word: &str) -> Res<Duration> {
    let bad = || format!("bad duration {word}: use 500ms or 2s");
    if let Some(ms) = word.strip_suffix("ms") {
        return ms.parse().map(Duration::from_millis).map_err(|_| bad());
    }
    if let Some(s) = word.strip_suffix('s') {
        return s.parse().map(Duration::from_secs).map_err(|_| bad());
    }
    Err(bad())
}

/// Consecutive indexes of one term as runs: `2..101@t1 103@t2`.
fn index_runs(positions: &[(u64, String)]) -> String {
    let mut runs: Vec<(u64, u64, &str)> = Vec::new();
    for (index, term) in positions {
        match runs.last_mut() {
            Some((_, last, t)) if *t == term && *last + 1 == *index => *last = *index,
            _ => runs.push((*index, *index, term)),
        }
    }
    runs.iter()
        .map(|(first, last, term)| {
            if first == last {
                format!("{first}@{term}")
            } else {
                format!("{first}..{last}@{term}")
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `m12` as ("m", 12).
fn numbered(text: &str) -> Option<(&str, u64)> {
    let digits = text.len() - text.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    if digits == 0 || digits > 18 {
        return None;
    }
    let (prefix, number) = text.split_at(text.len() - digits);
    Some((prefix, number.parse().ok()?))
}

struct ClusterDriver {
    script: String,
    octet: u8,
    cluster: Option<TestCluster>,
    /// Asks for statuses, exports and membership changes.
    admin: Option<Client>,
    /// One client (one session) per certificate name that sends.
    senders: BTreeMap<String, Client>,
    /// The next message number of each client.
    next_text: BTreeMap<String, u64>,
    /// (sender, text) -> the index it was acknowledged at.
    acked: BTreeMap<(String, String), u64>,
    /// Each named node's names, in the order given.
    names: BTreeMap<NodeId, Vec<String>>,
    leader_aliases: u32,
    follower_aliases: u32,
    /// Term aliases: `terms[0]` is t1.
    terms: Vec<u64>,
    paused: BTreeSet<NodeId>,
    /// What happened to a stopped node's disk, shown on its row.
    disk: BTreeMap<NodeId, &'static str>,
    /// The last settled table: leader and each running node's role.
    leader: Option<NodeId>,
    roles: BTreeMap<NodeId, Role>,
    /// The voters of the configuration the last leader had.
    voters: BTreeSet<NodeId>,
    /// Last: dropped after the clients.
    runtime: tokio::runtime::Runtime,
}

impl Drop for ClusterDriver {
    fn drop(&mut self) {
        // Clients close their endpoints inside the runtime.
        let _inside = self.runtime.enter();
        self.senders.clear();
        self.admin = None;
    }
}

impl ClusterDriver {
    fn new(script: &str, octet: u8) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        ClusterDriver {
            script: script.to_string(),
            octet,
            cluster: None,
            admin: None,
            senders: BTreeMap::new(),
            next_text: BTreeMap::new(),
            acked: BTreeMap::new(),
            names: BTreeMap::new(),
            leader_aliases: 0,
            follower_aliases: 0,
            terms: Vec::new(),
            paused: BTreeSet::new(),
            disk: BTreeMap::new(),
            leader: None,
            roles: BTreeMap::new(),
            voters: BTreeSet::new(),
            runtime,
        }
    }

    fn c(&self) -> Res<&TestCluster> {
        self.cluster
            .as_ref()
            .ok_or_else(|| "no cluster yet: begin with `start 1,2,3`".to_string())
    }

    fn c_mut(&mut self) -> Res<&mut TestCluster> {
        self.cluster
            .as_mut()
            .ok_or_else(|| "no cluster yet: begin with `start 1,2,3`".to_string())
    }

    /// Every node of the cluster: voters, learners and joined nodes.
    fn all(&self) -> Vec<NodeId> {
        let Some(c) = &self.cluster else {
            return Vec::new();
        };
        let mut all: Vec<NodeId> = c
            .voters
            .iter()
            .chain(&c.learners)
            .chain(&c.joined)
            .copied()
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    fn name(&mut self, id: NodeId, name: String) {
        let names = self.names.entry(id).or_default();
        if !names.contains(&name) {
            names.push(name);
        }
    }

    fn label(&self, id: NodeId) -> String {
        match self.names.get(&id) {
            Some(names) if !names.is_empty() => names.join("/"),
            _ => "n?".into(),
        }
    }

    /// Rows sort by their first name: leaders, followers, numbers, then
    /// nodes with no name.
    fn sort_key(&self, id: NodeId) -> (u8, u64) {
        let Some(first) = self.names.get(&id).and_then(|n| n.first()) else {
            return (3, 0);
        };
        let number = |s: &str| s.parse().unwrap_or(0);
        if let Some(k) = first.strip_prefix('L') {
            (0, number(k))
        } else if let Some(k) = first.strip_prefix('F') {
            (1, number(k))
        } else {
            (2, number(first.trim_start_matches('n')))
        }
    }

    fn term(&mut self, term: u64) -> String {
        if term == 0 {
            return "0".into();
        }
        if let Some(at) = self.terms.iter().position(|t| *t == term) {
            return format!("t{}", at + 1);
        }
        let highest = self
            .terms
            .iter()
            .enumerate()
            .max_by_key(|(_, t)| **t)
            .map(|(at, t)| (at + 1, *t));
        self.terms.push(term);
        let alias = format!("t{}", self.terms.len());
        match highest {
            Some((at, t)) if t > term => format!("{alias}(below t{at})"),
            _ => alias,
        }
    }

    /// The nodes a word names (see the module docs).
    fn targets(&mut self, words: &str) -> Res<Vec<NodeId>> {
        let mut out = Vec::new();
        for word in words.split(',') {
            match word {
                "all" => out.extend(self.all()),
                "others" => {
                    let unnamed: Vec<NodeId> = self
                        .all()
                        .into_iter()
                        .filter(|id| !self.names.contains_key(id))
                        .collect();
                    out.extend(unnamed);
                }
                "leader" => out.push(self.leader.ok_or("no leader in the last table")?),
                "follower" => {
                    let followers: Vec<NodeId> = self
                        .roles
                        .iter()
                        .filter(|(_, r)| **r == Role::Follower)
                        .map(|(id, _)| *id)
                        .collect();
                    let pick = followers
                        .iter()
                        .find(|id| !self.names.contains_key(id))
                        .or(followers.first())
                        .copied()
                        .ok_or("no follower in the last table")?;
                    if !self
                        .names
                        .get(&pick)
                        .is_some_and(|n| n.iter().any(|n| n.starts_with('F')))
                    {
                        self.follower_aliases += 1;
                        let alias = format!("F{}", self.follower_aliases);
                        self.name(pick, alias);
                    }
                    out.push(pick);
                }
                _ => {
                    if let Some((id, _)) = self
                        .names
                        .iter()
                        .find(|(_, names)| names.iter().any(|n| n == word))
                    {
                        out.push(*id);
                        continue;
                    }
                    let id: NodeId = word
                        .trim_start_matches('n')
                        .parse()
                        .map_err(|_| format!("no node is called {word}"))?;
                    if !self.all().contains(&id) {
                        return Err(format!("node {id} is not in the cluster"));
                    }
                    self.name(id, format!("n{id}"));
                    out.push(id);
                }
            }
        }
        out.dedup();
        Ok(out)
    }

    /// Every node's status, asked at once.
    async fn look(
        cluster: &TestCluster,
        admin: &Client,
        paused: &BTreeSet<NodeId>,
        all: &[NodeId],
    ) -> BTreeMap<NodeId, Seen> {
        let asks = all.iter().map(|id| async move {
            let seen = if paused.contains(id) {
                Seen::Paused
            } else if !cluster.is_running(*id) {
                Seen::Down
            } else {
                match tokio::time::timeout(ASK_WITHIN, admin.status(*id)).await {
                    Ok(Ok(status)) => Seen::Up(Box::new(status)),
                    Ok(Err(e)) => Seen::Silent(format!("{e:#}")),
                    Err(_) => Seen::Silent("no answer in time".into()),
                }
            };
            (*id, seen)
        });
        futures_util::future::join_all(asks)
            .await
            .into_iter()
            .collect()
    }

    /// Waits until the cluster settles, names its leader, and prints the
    /// table (or `not settled` and what it saw).
    fn table(&mut self) -> Res<String> {
        let all = self.all();
        let running = self
            .voters
            .iter()
            .filter(|id| self.c().is_ok_and(|c| c.is_running(**id)) && !self.paused.contains(id))
            .count();
        let quorum = running * 2 > self.voters.len();
        let (outcome, seen) = {
            let cluster = self.c()?;
            let admin = self.admin.as_ref().ok_or("no client")?;
            let paused = &self.paused;
            self.runtime.block_on(async {
                let deadline = Instant::now() + SETTLE_WITHIN;
                let mut before: Option<Fingerprint> = None;
                loop {
                    let seen = Self::look(cluster, admin, paused, &all).await;
                    let outcome = if quorum {
                        settled(&seen)
                    } else {
                        leaderless(&seen)
                    };
                    let print = fingerprint(&seen, quorum);
                    if outcome.is_ok() && before.as_ref() == Some(&print) {
                        return (outcome, seen);
                    }
                    if Instant::now() > deadline {
                        return (outcome.and(Err("still changing".into())), seen);
                    }
                    before = outcome.is_ok().then_some(print);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        self.roles = seen
            .iter()
            .filter_map(|(id, s)| match s {
                Seen::Up(st) => Some((*id, st.role)),
                _ => None,
            })
            .collect();
        self.leader = None;
        let leader = match outcome {
            Ok(leader) => leader,
            Err(why) => {
                self.roles.clear();
                let mut out = format!("not settled within {SETTLE_WITHIN:?}: {why}\n");
                for (id, s) in &seen {
                    let line = match s {
                        Seen::Up(st) => format!(
                            "n{id} ({}) {:?} leader={:?} term={} last={}@{} commit={} floor={:?}",
                            self.label(*id),
                            st.role,
                            st.leader,
                            st.term,
                            st.last_index,
                            st.last_term,
                            st.commit,
                            st.catch_up_floor
                        ),
                        other => format!("n{id} ({}) {other:?}", self.label(*id)),
                    };
                    writeln!(out, "{line}").unwrap();
                }
                return Ok(out);
            }
        };
        let (leader_label, membership) = match leader {
            Some(leader) => {
                if !self
                    .names
                    .get(&leader)
                    .is_some_and(|n| n.iter().any(|n| n.starts_with('L')))
                {
                    self.leader_aliases += 1;
                    let alias = format!("L{}", self.leader_aliases);
                    self.name(leader, alias);
                }
                self.leader = Some(leader);
                let Seen::Up(st) = &seen[&leader] else {
                    unreachable!("the leader answered")
                };
                self.voters = st.membership.voters.clone();
                (Some(self.label(leader)), Some(st.membership.clone()))
            }
            None => (None, None),
        };
        let mut rows = Vec::new();
        for (id, s) in &seen {
            let row = match s {
                Seen::Down => match self.disk.get(id) {
                    Some(disk) => format!("down, {disk}"),
                    None => "down".into(),
                },
                Seen::Paused => "paused".into(),
                Seen::Silent(_) => unreachable!("a settled cluster answers"),
                Seen::Up(st) => {
                    let role = match (st.role, &leader_label) {
                        (Role::Leader, _) => "leader".to_string(),
                        (Role::Learner, Some(l)) => format!("learner({l})"),
                        (Role::Learner, None) => "learner(no-leader)".into(),
                        (Role::Follower, Some(l)) => format!("follower({l})"),
                        (Role::Candidate, Some(_)) => "candidate".into(),
                        (Role::PreCandidate, Some(_)) => "pre-candidate".into(),
                        (_, None) => "no-leader".into(),
                    };
                    let mut row = format!(
                        "{role} term={} last={}@{} commit={}",
                        self.term(st.term),
                        st.last_index,
                        self.term(st.last_term),
                        st.commit
                    );
                    if membership.as_ref().is_some_and(|m| !m.contains(*id)) {
                        row.push_str(" not-a-member");
                    }
                    row
                }
            };
            rows.push((self.sort_key(*id), format!("{} {row}", self.label(*id))));
        }
        rows.sort();
        Ok(rows.into_iter().map(|(_, row)| row + "\n").collect())
    }

    fn client_for(&mut self, name: &str) -> Res<()> {
        if !self.senders.contains_key(name) {
            let client = {
                let cluster = self.c()?;
                let _inside = self.runtime.enter();
                cluster.client(name)
            };
            self.senders.insert(name.to_string(), client);
        }
        Ok(())
    }

    /// A new admin client that knows every node (after one joined), and
    /// the senders told of the new addresses.
    fn refresh_clients(&mut self) -> Res<()> {
        let cluster = self.c()?;
        let _inside = self.runtime.enter();
        let admin = cluster.client("client");
        let addresses: BTreeMap<NodeId, String> = self
            .all()
            .into_iter()
            .map(|id| (id, cluster.addr(id).to_string()))
            .collect();
        for client in self.senders.values() {
            client.learn_members(&addresses);
        }
        self.admin = Some(admin);
        Ok(())
    }

    fn start(&mut self, cmd: &mut Command) -> Res<String> {
        if self.cluster.is_some() {
            return Err("the cluster is started already".into());
        }
        let voters = ids(&cmd.required("voters")?)?;
        let learners = match cmd.option("learners") {
            Some(l) => ids(&l)?,
            None => Vec::new(),
        };
        cmd.finish()?;
        let name = format!("script-{}", self.script);
        self.cluster = Some(TestCluster::start(&name, self.octet, &voters, &learners));
        for id in learners {
            self.name(id, format!("n{id}"));
        }
        self.voters = voters.iter().copied().collect();
        self.refresh_clients()?;
        self.table()
    }

    fn send(&mut self, cmd: &mut Command) -> Res<String> {
        let n: u64 = cmd.parsed("n")?.unwrap_or(10);
        let batch: u64 = cmd.parsed("batch")?.unwrap_or(1).max(1);
        let name = cmd.option("client").unwrap_or_else(|| "alice".into());
        cmd.finish()?;
        self.c()?;
        let first = *self.next_text.get(&name).unwrap_or(&1);
        let texts: Vec<String> = (first..first + n).map(|i| format!("m{i}")).collect();
        self.next_text.insert(name.clone(), first + n);
        self.client_for(&name)?;
        let client = &self.senders[&name];
        let (acks, error) = self.runtime.block_on(async {
            let mut acks = Vec::new();
            for chunk in texts.chunks(batch as usize) {
                match client.send(chunk.to_vec()).await {
                    Ok((_, committed)) => {
                        acks.extend(chunk.iter().cloned().zip(committed));
                    }
                    Err(e) => return (acks, Some(format!("{e:#}"))),
                }
            }
            (acks, None)
        });
        let mut out = String::new();
        let positions: Vec<(u64, String)> = acks
            .iter()
            .map(|(_, c)| (c.index, self.term(c.term)))
            .collect();
        for (text, committed) in &acks {
            self.acked
                .insert((name.clone(), text.clone()), committed.index);
        }
        if let (Some((first, _)), Some((last, _))) = (acks.first(), acks.last()) {
            let texts = if first == last {
                first.clone()
            } else {
                format!("{first}..{last}")
            };
            writeln!(
                out,
                "{name} {texts} acknowledged at {}",
                index_runs(&positions)
            )
            .unwrap();
        }
        if let Some(error) = error {
            writeln!(
                out,
                "{name}: send failed after {} acknowledged: {error}",
                acks.len()
            )
            .unwrap();
        }
        out.push_str(&self.table()?);
        Ok(out)
    }

    fn export(&mut self, cmd: &mut Command) -> Res<String> {
        cmd.finish()?;
        let all = self.all();
        let (export, replicas) = {
            let cluster = self.c()?;
            let admin = self.admin.as_ref().ok_or("no client")?;
            self.runtime.block_on(async {
                let export = admin.export().await.map_err(|e| format!("{e:#}"));
                let mut replicas = Vec::new();
                for id in all {
                    if cluster.is_running(id) && !self.paused.contains(&id) {
                        let replica = admin.local_export(id).await.map_err(|e| format!("{e:#}"));
                        replicas.push((id, replica));
                    }
                }
                (export, replicas)
            })
        };
        let export = match export {
            Ok(export) => export,
            Err(e) => return Ok(format!("export failed: {e}\n")),
        };
        let mut out = format!("{} messages\n", export.len());
        out.push_str(&self.export_runs(&export));
        let mut problems = Vec::new();
        for pair in export.windows(2) {
            if pair[0].index >= pair[1].index {
                problems.push(format!("out of log order at {}", pair[1].index));
            }
            if pair[0].lamport >= pair[1].lamport {
                problems.push(format!("stamps do not increase at {}", pair[1].index));
            }
        }
        let mut at: BTreeMap<(&str, &str), Vec<u64>> = BTreeMap::new();
        for e in &export {
            at.entry((&e.sender, &e.text)).or_default().push(e.index);
        }
        for ((sender, text), indexes) in &at {
            if indexes.len() > 1 {
                problems.push(format!("{sender} {text} is there {} times", indexes.len()));
            }
        }
        let mut missing = 0;
        let mut moved = 0;
        for ((sender, text), index) in &self.acked {
            match at.get(&(sender.as_str(), text.as_str())) {
                None => missing += 1,
                Some(indexes) if !indexes.contains(index) => moved += 1,
                Some(_) => {}
            }
        }
        if missing > 0 {
            problems.push(format!("{missing} acknowledged messages are missing"));
        }
        if moved > 0 {
            problems.push(format!("{moved} acknowledged messages moved"));
        }
        if problems.is_empty() {
            writeln!(
                out,
                "all {} acknowledged messages there once, where acknowledged, stamps increasing",
                self.acked.len()
            )
            .unwrap();
        }
        for problem in problems {
            writeln!(out, "PROBLEM: {problem}").unwrap();
        }
        let mut same = 0;
        for (id, replica) in &replicas {
            match replica {
                Ok(r) if *r == export => same += 1,
                Ok(r) => writeln!(
                    out,
                    "{}'s replica differs: {} messages",
                    self.label(*id),
                    r.len()
                )
                .unwrap(),
                Err(e) => writeln!(out, "{}'s replica: {e}", self.label(*id)).unwrap(),
            }
        }
        if same == replicas.len() {
            writeln!(
                out,
                "the same log in the replicas of all {same} running nodes"
            )
            .unwrap();
        }
        Ok(out)
    }

    /// One line per run of a client's numbered messages at consecutive
    /// indexes of one term.
    fn export_runs(&mut self, export: &[ExportedEntry]) -> String {
        let mut out = String::new();
        let mut i = 0;
        while i < export.len() {
            let first = &export[i];
            let mut j = i + 1;
            if let Some((prefix, number)) = numbered(&first.text) {
                while let Some(next) = export.get(j) {
                    let k = (j - i) as u64;
                    if next.sender != first.sender
                        || next.term != first.term
                        || next.index != first.index + k
                        || numbered(&next.text) != Some((prefix, number + k))
                    {
                        break;
                    }
                    j += 1;
                }
            }
            let last = &export[j - 1];
            let term = self.term(first.term);
            if j == i + 1 {
                writeln!(
                    out,
                    "{} {} at {}@{term}",
                    first.sender, first.text, first.index
                )
                .unwrap();
            } else {
                writeln!(
                    out,
                    "{} {}..{} at {}..{}@{term}",
                    first.sender, first.text, last.text, first.index, last.index
                )
                .unwrap();
            }
            i = j;
        }
        out
    }

    fn rebuild(&mut self, cmd: &mut Command) -> Res<String> {
        let word = cmd.required("node")?;
        cmd.finish()?;
        let [id] = self.targets(&word)?[..] else {
            return Err("rebuild one node at a time".into());
        };
        let label = self.label(id);
        let cluster = self.c()?;
        if cluster.is_running(id) {
            return Err(format!("{word} is running: kill it first"));
        }
        let data = cluster.data_dir(id).display().to_string();
        let output = cluster.run_cli(&["rebuild", "--id", &id.to_string(), "--data", &data], None);
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let mut out = String::new();
        if !output.status.success() {
            writeln!(
                out,
                "node rebuild failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )
            .unwrap();
        } else {
            // "... at term 2; until its log reaches index 102 (term 2) ..."
            let after = |key: &str| -> Option<u64> {
                let rest = &stdout[stdout.find(key)? + key.len()..];
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                digits.parse().ok()
            };
            let term = after(" at term ").map(|t| self.term(t));
            let floor = after("reaches index ").zip(after(" (term "));
            let floor = match floor {
                Some((index, term)) => format!("{index}@{}", self.term(term)),
                None => "none".into(),
            };
            writeln!(
                out,
                "node rebuild {label}: term={} floor={floor}",
                term.unwrap_or_else(|| format!("? in {stdout:?}"))
            )
            .unwrap();
            self.disk.insert(id, "rebuilt");
        }
        out.push_str(&self.table()?);
        Ok(out)
    }

    fn member(&mut self, cmd: &mut Command) -> Res<String> {
        let what = cmd.required("add or promote")?;
        let id: NodeId = cmd
            .required("node id")?
            .trim_start_matches('n')
            .parse()
            .map_err(|_| "bad node id".to_string())?;
        let learner = cmd.flag("learner");
        cmd.finish()?;
        let mut out = String::new();
        match what.as_str() {
            "add" => {
                let via: Vec<NodeId> = self
                    .all()
                    .into_iter()
                    .filter(|n| self.c().is_ok_and(|c| c.is_running(*n)))
                    .collect();
                let cluster = self.c()?;
                if self.all().contains(&id) {
                    return Err(format!("node {id} is in the cluster already"));
                }
                cluster.add_node_cert(id);
                let change = MembershipChange::AddLearner {
                    id,
                    address: cluster.addr(id).to_string(),
                };
                let admin = self.admin.as_ref().ok_or("no client")?;
                let report = self.runtime.block_on(admin.change(change));
                match report.map(|r| r.outcome) {
                    Ok(Ok(index)) => {
                        writeln!(out, "added n{id} as a learner at {index}").unwrap();
                    }
                    Ok(Err(e)) => {
                        writeln!(out, "add n{id} refused: {e}").unwrap();
                        out.push_str(&self.table()?);
                        return Ok(out);
                    }
                    Err(e) => return Ok(format!("add n{id} failed: {e:#}\n")),
                }
                self.c_mut()?.launch_joining(id, &via);
                self.name(id, format!("n{id}"));
                self.refresh_clients()?;
                if !learner {
                    out.push_str(&self.promote(id)?);
                }
            }
            "promote" => {
                if learner {
                    return Err("promote takes no `learner`".into());
                }
                out.push_str(&self.promote(id)?);
            }
            other => return Err(format!("member {other}: use add or promote")),
        }
        out.push_str(&self.table()?);
        Ok(out)
    }

    /// Promotes a learner once it has caught up, as `node member add` does.
    fn promote(&mut self, id: NodeId) -> Res<String> {
        let admin = self.admin.as_ref().ok_or("no client")?;
        let outcome = self.runtime.block_on(async {
            let deadline = Instant::now() + SETTLE_WITHIN;
            loop {
                let report = admin.change(MembershipChange::Promote { id }).await?;
                match report.outcome {
                    Err(ChangeError::NotCaughtUp { .. } | ChangeError::NotResponding(_))
                        if Instant::now() < deadline =>
                    {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    outcome => return anyhow::Ok(outcome),
                }
            }
        });
        Ok(match outcome {
            Ok(Ok(index)) => format!("promoted n{id} to voter at {index}\n"),
            Ok(Err(e)) => format!("promote n{id} refused: {e}\n"),
            Err(e) => format!("promote n{id} failed: {e:#}\n"),
        })
    }

    fn nodes_command(&mut self, cmd: &mut Command) -> Res<String> {
        let words = cmd.required("nodes")?;
        cmd.finish()?;
        let targets = self.targets(&words)?;
        for id in targets {
            let joined = self.c()?.joined.contains(&id);
            match cmd.name.as_str() {
                "kill" => self.c_mut()?.kill(id),
                "restart" => {
                    if self.c()?.is_running(id) {
                        return Err(format!("{} is running already", self.label(id)));
                    }
                    self.disk.remove(&id);
                    if joined {
                        let via: Vec<NodeId> =
                            self.all().into_iter().filter(|n| *n != id).collect();
                        self.c_mut()?.launch_joining(id, &via);
                    } else {
                        self.c_mut()?.launch(id);
                    }
                }
                "pause" => {
                    self.c()?.signal(id, "STOP");
                    self.paused.insert(id);
                }
                "resume" => {
                    self.c()?.signal(id, "CONT");
                    self.paused.remove(&id);
                }
                "wipe" => {
                    let cluster = self.c()?;
                    if cluster.is_running(id) {
                        return Err(format!("{} is running: kill it first", self.label(id)));
                    }
                    std::fs::remove_dir_all(cluster.data_dir(id))
                        .map_err(|e| format!("cannot wipe node {id}: {e}"))?;
                    self.disk.insert(id, "disk wiped");
                }
                _ => unreachable!(),
            }
        }
        self.table()
    }
}

/// `1,2,3`.
fn ids(word: &str) -> Res<Vec<NodeId>> {
    word.split(',')
        .map(|w| w.parse().map_err(|_| format!("bad node id {w}")))
        .collect()
}

impl Driver for ClusterDriver {
    fn run(&mut self, cmd: &mut Command) -> Res<String> {
        match cmd.name.as_str() {
            "start" => self.start(cmd),
            "send" => self.send(cmd),
            "kill" | "restart" | "pause" | "resume" | "wipe" => self.nodes_command(cmd),
            "rebuild" => self.rebuild(cmd),
            "member" => self.member(cmd),
            "export" => self.export(cmd),
            "status" => {
                cmd.finish()?;
                self.table()
            }
            "sleep" => {
                let how_long = duration(&cmd.required("duration")?)?;
                cmd.finish()?;
                std::thread::sleep(how_long);
                Ok(String::new())
            }
            other => Err(format!("unknown command {other}")),
        }
    }
}

fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/cluster")
}

/// Real clusters share this machine's cores: one script at a time.
fn run(name: &str, octet: u8) {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let path = scripts_dir().join(format!("{name}.txt"));
    let mut driver = ClusterDriver::new(name, octet);
    runner::run_script(&path, &mut driver);
}

macro_rules! scripts {
    ($($name:ident = $octet:literal),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                run(stringify!($name), $octet);
            }
        )*

        /// Every script in the folder has its test above, and each its
        /// own address.
        #[test]
        fn every_script_is_listed() {
            let listed = [$(stringify!($name)),*];
            let octets = [$($octet),*];
            let distinct: BTreeSet<u8> = octets.iter().copied().collect();
            assert_eq!(distinct.len(), octets.len(), "two scripts share an address");
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
            assert!(missing.is_empty(), "add to scripts! in cluster_scripts.rs: {missing:?}");
        }
    };
}

// Each script's cluster listens on 127.0.0.<octet>: 120-129 are free of
// the other tests' addresses.
scripts! {
    follower_catch_up = 122,
    full_restart = 123,
    leader_failover = 121,
    learners = 124,
    rebuilt_follower = 125,
    stale_leader = 126,
}
