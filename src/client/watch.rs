//! Following the committed log: one path for `node watch`, `node export`,
//! backups, the HTTP `/events` feed and the tests.
//!
//! A `LogStream` asks one node for a `Watch` and reads its pages. When the
//! node dies, stops answering, is cut off from its leader or falls behind
//! an export's end, the stream asks another member to continue from the
//! next index it has not returned: committed entries are the same on every
//! replica, so the seam has no gap and no repeat.

use std::collections::VecDeque;
use std::ops::Deref;
use std::time::{Duration, Instant};

use futures_util::stream::{BoxStream, StreamExt};
use tokio::io::AsyncWriteExt;

use super::{link, unexpected, wire, Client, ClientError, Refused};
use crate::raft::{Index, NodeId};
use crate::wire::{
    read_frame, write_frame, ClientRequest, ClientResponse, ExportedEntry, Start, Until,
    WATCH_HEARTBEAT,
};

type Result<T, E = ClientError> = std::result::Result<T, E>;

/// A node silent this long (no page, not even a heartbeat) is given up.
/// Longer than QUIC's idle timeout (3 s), which notices a dead node
/// first; this catches one that is alive but stuck.
const SILENT_FOR: Duration = Duration::from_secs(5);
/// A node that knows no leader, or cannot reach an export's end, this long
/// is left for another member (unless the stream is held to one node).
const STUCK_FOR: Duration = Duration::from_secs(5);
/// Pauses between attempts grow from the first to the last.
const FIRST_PAUSE: Duration = Duration::from_millis(50);
const LAST_PAUSE: Duration = Duration::from_secs(1);

/// Which nodes may serve the stream.
#[derive(Clone, Copy, Debug)]
enum Source {
    /// Any member, starting with the preferred one if given.
    Any(Option<NodeId>),
    /// This node only (a backup of its own replica, or a node's own feed).
    Only(NodeId),
}

/// The node being read and how it has been doing.
struct Reading {
    node: NodeId,
    recv: super::Recv,
    /// Since when the node has said it knows no leader.
    leaderless_since: Option<Instant>,
}

/// The committed log from a starting point, in order, page by page,
/// following new commits (`Until::Follow`) or up to an end.
pub struct LogStream<C: Deref<Target = Client>> {
    client: C,
    /// Where the next page starts; `Start::Index` once a node has said.
    start: Start,
    /// `Until::Index` once a node has said where a read index is.
    until: Until,
    source: Source,
    reading: Option<Reading>,
    done: bool,
    /// How long to keep trying without progress before giving up
    /// (`None`: forever).
    patience: Option<Duration>,
    /// When the stream last moved (or started).
    progress_at: Instant,
    last_error: String,
    attempt: usize,
    pause: Duration,
}

impl<C: Deref<Target = Client>> LogStream<C> {
    pub fn new(client: C, start: Start, until: Until) -> Self {
        LogStream {
            client,
            start,
            until,
            source: Source::Any(None),
            reading: None,
            done: false,
            patience: None,
            progress_at: Instant::now(),
            last_error: String::from("no node answered"),
            attempt: 0,
            pause: FIRST_PAUSE,
        }
    }

    /// Reads from `node` first; others only if it fails.
    pub fn prefer(mut self, node: NodeId) -> Self {
        self.source = Source::Any(Some(node));
        self
    }

    /// Reads from `node` only, retrying it when it fails.
    pub fn only(mut self, node: NodeId) -> Self {
        self.source = Source::Only(node);
        self
    }

    /// Gives up after `patience` without progress (default: never).
    pub fn patience(mut self, patience: Option<Duration>) -> Self {
        self.patience = patience;
        self
    }

    /// The index the next page starts at, once known.
    pub fn next_index(&self) -> Option<Index> {
        match self.start {
            Start::Index(index) => Some(index),
            Start::Last(_) => None,
        }
    }

    /// Where the stream ends, once known (`None` while following).
    pub fn end(&self) -> Option<Index> {
        match self.until {
            Until::Index(index) => Some(index),
            _ => None,
        }
    }

    /// The node being read now.
    pub fn node(&self) -> Option<NodeId> {
        self.reading.as_ref().map(|r| r.node)
    }

    /// The next committed messages, in log order; `None` once the end is
    /// reached. Never an empty page.
    pub async fn next_page(&mut self) -> Result<Option<Vec<ExportedEntry>>> {
        loop {
            if self.done {
                return Ok(None);
            }
            self.check_patience()?;
            let Some(reading) = self.reading.as_mut() else {
                self.open().await?;
                continue;
            };
            let node = reading.node;
            let frame = tokio::time::timeout(
                SILENT_FOR,
                read_frame::<_, ClientResponse>(&mut reading.recv),
            )
            .await;
            let response = match frame {
                Ok(Ok(Some(response))) => response,
                Ok(Ok(None)) => {
                    self.failed(node, format!("node {node} ended the stream early"));
                    self.wait().await?;
                    continue;
                }
                Ok(Err(error)) => {
                    self.failed(node, wire(node)(error).to_string());
                    self.wait().await?;
                    continue;
                }
                Err(_) => {
                    self.failed(node, format!("node {node} stopped answering"));
                    self.wait().await?;
                    continue;
                }
            };
            match response {
                ClientResponse::Page {
                    entries,
                    next,
                    upto,
                    commit,
                    leader,
                } => {
                    if let Some(entries) = self.take_page(node, entries, next, upto, commit, leader)
                    {
                        return Ok(Some(entries));
                    }
                }
                ClientResponse::Redirect { leader } => {
                    self.client
                        .set_leader(leader.filter(|l| self.client.knows(*l)));
                    self.reading = None;
                    self.last_error = format!("node {node} is not the leader");
                    if leader.is_none() {
                        self.wait().await?;
                    }
                }
                ClientResponse::Busy { message } => {
                    self.reading = None;
                    self.last_error = format!("node {node}: {message}");
                    self.wait().await?;
                }
                ClientResponse::Error {
                    message,
                    retry: true,
                    ..
                } => {
                    self.client.set_leader(None);
                    self.failed(node, format!("node {node}: {message}"));
                    self.wait().await?;
                }
                ClientResponse::Error {
                    message, detail, ..
                } => {
                    return Err(Refused {
                        node,
                        message,
                        detail,
                        first_attempt: true,
                    }
                    .into())
                }
                other => return Err(unexpected(node, "a watch", &other)),
            }
        }
    }

    /// Takes one page in: what it returns is new, in order, and never
    /// repeats what an earlier node returned.
    fn take_page(
        &mut self,
        node: NodeId,
        entries: Vec<ExportedEntry>,
        next: Index,
        upto: Option<Index>,
        commit: Index,
        leader: Option<NodeId>,
    ) -> Option<Vec<ExportedEntry>> {
        let from = self.next_index();
        if from.is_some_and(|from| next < from) {
            self.failed(
                node,
                format!("node {node} answered a page ending before index {next:?}"),
            );
            return None;
        }
        let entries: Vec<ExportedEntry> = entries
            .into_iter()
            .filter(|e| from.is_none_or(|from| e.index >= from) && e.index < next)
            .collect();
        if entries.windows(2).any(|w| w[0].index >= w[1].index) {
            self.failed(node, format!("node {node} answered entries out of order"));
            return None;
        }
        let now = Instant::now();
        // Progress: the stream moved, or (while following, where a quiet
        // log is no fault) a node answers.
        if from != Some(next) || !entries.is_empty() || self.end().is_none() {
            self.progress_at = now;
            self.pause = FIRST_PAUSE;
        }
        self.start = Start::Index(next);
        if let Some(upto) = upto {
            self.until = Until::Index(upto);
        }
        if self.end().is_some_and(|end| next > end) {
            self.done = true;
            self.reading = None;
        } else if let (Source::Any(_), Some(reading)) = (self.source, self.reading.as_mut()) {
            // A node cut off from its leader may have missed commits; one
            // short of an export's end for long may never get there.
            let leaderless = match leader {
                Some(_) => None,
                None => Some(*reading.leaderless_since.get_or_insert(now)),
            };
            reading.leaderless_since = leaderless;
            let behind = self.end().is_some_and(|end| commit < end)
                && now.duration_since(self.progress_at) > STUCK_FOR;
            if leaderless.is_some_and(|since| now.duration_since(since) > STUCK_FOR) || behind {
                tracing::warn!(
                    node,
                    commit,
                    ?leader,
                    "leaving a node that knows no leader or lags: reading from another"
                );
                self.client.forget(node);
                self.reading = None;
            }
        }
        (!entries.is_empty()).then_some(entries)
    }

    /// Asks the next node for the watch.
    async fn open(&mut self) -> Result<()> {
        let node = match self.source {
            Source::Only(node) => node,
            Source::Any(Some(node)) if !self.client.is_suspect(node) => node,
            Source::Any(_) => self.client.pick(self.attempt),
        };
        self.attempt += 1;
        let request = ClientRequest::Watch {
            start: self.start,
            until: self.until,
        };
        let opened = async {
            let connection = self.client.connection(node).await?;
            // A watch takes a stream of its own, never an idle one.
            let (mut send, recv) = connection.open().await?;
            write_frame(&mut send, &request).await.map_err(wire(node))?;
            send.shutdown().await.map_err(link(node))?;
            Ok::<_, ClientError>(recv)
        };
        match tokio::time::timeout(SILENT_FOR, opened).await {
            Ok(Ok(recv)) => {
                self.reading = Some(Reading {
                    node,
                    recv,
                    leaderless_since: None,
                });
                Ok(())
            }
            Ok(Err(error)) => {
                self.failed(node, error.to_string());
                self.wait().await
            }
            Err(_) => {
                self.failed(node, format!("node {node} did not answer"));
                self.wait().await
            }
        }
    }

    /// A node failed: read elsewhere next (or retry it, if held to it).
    fn failed(&mut self, node: NodeId, why: String) {
        tracing::debug!(node, "watch: {why}");
        if let Source::Any(_) = self.source {
            self.client.forget(node);
        }
        if self.client.leader() == Some(node) {
            self.client.set_leader(None);
        }
        self.last_error = why;
        self.reading = None;
    }

    /// Fails once `patience` has passed without progress.
    fn check_patience(&self) -> Result<()> {
        match self.patience {
            Some(patience) if self.progress_at.elapsed() > patience => Err(ClientError::Stalled {
                after: patience,
                index: self.next_index(),
                last: self.last_error.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// Pauses before the next attempt, or gives up once out of patience.
    async fn wait(&mut self) -> Result<()> {
        self.check_patience()?;
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(LAST_PAUSE);
        Ok(())
    }

    /// Every page, in order, collected (for small logs and tests).
    pub async fn collect(mut self) -> Result<Vec<ExportedEntry>> {
        let mut all = Vec::new();
        while let Some(page) = self.next_page().await? {
            all.extend(page);
        }
        Ok(all)
    }

    /// The stream one message at a time.
    pub fn into_stream(self) -> BoxStream<'static, Result<ExportedEntry>>
    where
        C: Send + Sync + 'static,
    {
        futures_util::stream::unfold(
            (self, VecDeque::new(), false),
            |(mut stream, mut buffered, failed)| async move {
                if failed {
                    return None;
                }
                loop {
                    if let Some(entry) = buffered.pop_front() {
                        return Some((Ok(entry), (stream, buffered, false)));
                    }
                    match stream.next_page().await {
                        Ok(Some(page)) => buffered.extend(page),
                        Ok(None) => return None,
                        Err(error) => return Some((Err(error), (stream, buffered, true))),
                    }
                }
            },
        )
        .boxed()
    }
}

/// How long a watch waits for its node before `SILENT_FOR` calls it gone:
/// heartbeats come every `WATCH_HEARTBEAT`.
const _: () = assert!(SILENT_FOR.as_millis() >= 2 * WATCH_HEARTBEAT.as_millis());
