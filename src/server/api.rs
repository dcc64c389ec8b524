//! The client API: requests and their answers, in order, on QUIC streams
//! (a client keeps one open for many requests).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::TrySendError;
use std::sync::Arc;

use bytes::Bytes;
use quinn::Connection;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{oneshot, Semaphore};
use tracing::{debug, warn};

use super::driver::{CommitView, Input};
use crate::raft::{ChangeError, MembershipChange};
use crate::raft::{Index, NodeId, Payload, Proposal, ProposeError, RequestId};
use crate::storage::LogReader;
use crate::wire::{
    read_frame, read_frame_owned, write_frame, write_frame_owned, ClientRequest, ClientResponse,
    ExportedEntry, MembersView, Start, Until, CLOSE_BUSY, MAX_BATCH, PAGE, PAGE_BYTES,
    STREAM_WINDOW, WATCH_HEARTBEAT,
};

/// Default bound on the messages waiting to commit, in bytes: beyond it a
/// node answers "busy, retry" instead of queueing without end. Admission
/// counts at least 1 KiB a message (about what one costs the leader while
/// it waits: its RSS rose ~0.4-0.8 KB per message in flight), so this
/// holds ~130,000 small messages: two pipelined clients' windows
/// (`client::PIPELINE_WINDOW` batches of `client::LINES_PER_BATCH`), the
/// bandwidth-delay product of ~600,000 msg/s over a 0.2 s commit.
pub const DEFAULT_MAX_PENDING_BYTES: usize = 128 << 20;
/// Default bound on open client connections (over TCP, a connection per
/// stream); peers are never refused.
pub const DEFAULT_MAX_CLIENTS: usize = 4096;

#[derive(Clone)]
pub struct Api {
    pub me: NodeId,
    pub inputs: super::driver::Inputs,
    pub log: LogReader,
    pub limits: Arc<Limits>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Told to joining nodes (`MembersView::cluster_digest`).
    pub cluster_digest: u64,
    /// The synced commit and leader, for watchers to wait on.
    pub commits: tokio::sync::watch::Receiver<CommitView>,
}

/// Admission control: what a node accepts before it says "busy".
pub struct Limits {
    /// KiB (rounded up, at least one per message) of messages accepted
    /// and not yet answered.
    pending: Arc<Semaphore>,
    pending_kib: usize,
    clients: AtomicUsize,
    max_clients: usize,
}

impl Limits {
    pub fn new(max_pending_bytes: usize, max_clients: usize) -> Limits {
        let pending_kib = (max_pending_bytes / 1024).max(1024);
        Limits {
            pending: Arc::new(Semaphore::new(pending_kib)),
            pending_kib,
            clients: AtomicUsize::new(0),
            max_clients,
        }
    }
}

/// Holds one client connection's place while it is served.
struct ClientSlot<'a>(&'a Limits);

impl Drop for ClientSlot<'_> {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The half of a client stream the node writes answers to: a QUIC stream,
/// or a TLS-over-TCP connection (`super::tcp`).
pub trait Writer: AsyncWrite + Unpin + Send {}
impl<T: AsyncWrite + Unpin + Send> Writer for T {}
/// The half of a client stream the node reads requests from.
pub trait Reader: AsyncRead + Unpin + Send + 'static {}
impl<T: AsyncRead + Unpin + Send + 'static> Reader for T {}

/// A request's answer, still to come.
type Answer = std::pin::Pin<Box<dyn std::future::Future<Output = ClientResponse> + Send>>;

/// What starting a request on a stream came to (`Api::start`).
enum Started {
    /// Under way, or answered at once: its answer, in turn.
    Answer(Answer),
    /// Refused before it reached the log: answered, and the stream reads
    /// no further (`Api::take_started`).
    Refused(ClientResponse),
    /// A send waiting for room under the bound on what waits to commit.
    Waiting(WaitingSend),
}

/// How long a send alone on its stream waits, in turn with every other
/// send waiting for room, before it is answered "busy". Refused at once,
/// a single write (an HTTP post, `node send "msg"`) found the bound full
/// of pipelined batches that wait for room without limit, and its
/// client's growing pause took it to 1.8-2.3 s while two `node send -`
/// started (scripts/user-fault-trial.py). Short, so that sustained
/// overload is still answered "busy" and shed.
const LONE_SEND_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

/// A send waiting for room: admitted, in its stream's order, once `room`
/// is granted, or answered with `room`'s error (busy, shutting down).
struct WaitingSend {
    room: Room,
    send: NewSend,
}

/// Room for a send under the bound on what waits to commit, or the answer
/// that refuses it.
type Room = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<tokio::sync::OwnedSemaphorePermit, ClientResponse>>
            + Send,
    >,
>;

/// The answer to a send the node could not take because it is stopping.
fn shutting_down() -> ClientResponse {
    error("node shutting down", true)
}

/// A send request, checked and admitted on its way to the driver.
struct NewSend {
    client_id: u64,
    first_seq: u64,
    lamport: u64,
    since: Index,
    texts: Vec<String>,
    /// The sequence number of the client's message its first must follow
    /// (`ClientRequest::Send::after`).
    after: Option<u64>,
}

impl NewSend {
    /// The sequence number of its last message; `None` for no message,
    /// or if a hostile client's numbers run past the end of their range.
    fn last_seq(&self) -> Option<u64> {
        let count = u64::try_from(self.texts.len()).ok()?;
        self.first_seq.checked_add(count.checked_sub(1)?)
    }
}

/// Turns the driver's verdict on a send into the client's answer.
fn sent(
    me: NodeId,
    outcome: Result<Vec<Result<crate::raft::Committed, ProposeError>>, oneshot::error::RecvError>,
) -> ClientResponse {
    let Ok(results) = outcome else {
        return shutting_down();
    };
    let mut committed = Vec::with_capacity(results.len());
    for result in results {
        match result {
            Ok(c) => committed.push(c),
            Err(ProposeError::NotLeader { leader }) => return ClientResponse::Redirect { leader },
            Err(
                e @ (ProposeError::LeadershipLost
                | ProposeError::TransferInProgress
                | ProposeError::EarlierRefused { .. }),
            ) => {
                return ClientResponse::Error {
                    message: e.to_string(),
                    retry: true,
                    detail: Some(e),
                }
            }
            Err(e) => {
                return ClientResponse::Error {
                    message: e.to_string(),
                    retry: false,
                    detail: Some(e),
                }
            }
        }
    }
    ClientResponse::Sent {
        committed,
        leader: me,
    }
}

/// A client that dropped its stream: a TLS-over-TCP connection closed
/// without TLS's goodbye, or reset (a QUIC stream dropped by its client
/// ends cleanly instead). Not a bad request.
fn went_away(error: &crate::wire::WireError) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    matches!(error, crate::wire::WireError::Io(e)
        if matches!(e.kind(), UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe))
}

fn error(message: impl Into<String>, retry: bool) -> ClientResponse {
    ClientResponse::Error {
        message: message.into(),
        retry,
        detail: None,
    }
}

/// Why this node could not report its own status (it is shutting down,
/// or too busy to take the request).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StatusUnavailable(pub String);

/// How a node certificate outside this node's configuration is named: it
/// may ask for the configuration and status only (`Api::start`).
pub const OUTSIDER: &str = "outsider@node-";

impl Api {
    /// Serves a client's connection, unless too many are open already:
    /// then it is closed at once with `CLOSE_BUSY`, and the client retries.
    pub async fn serve_client(&self, connection: Connection, client: String) {
        let Some(_slot) = self.client_slot() else {
            connection.close(
                CLOSE_BUSY.into(),
                b"busy: too many client connections, retry later",
            );
            return;
        };
        self.serve(connection, client).await;
    }

    /// A client connection's place under `--max-clients`, held while it is
    /// served; `None` (and a warning now and then) when all are taken.
    pub fn client_slot(&self) -> Option<impl Drop + '_> {
        let limits = &self.limits;
        if limits.clients.fetch_add(1, Ordering::SeqCst) >= limits.max_clients {
            limits.clients.fetch_sub(1, Ordering::SeqCst);
            if self.metrics.busy_connections.inc().is_multiple_of(1000) {
                warn!(
                    max = limits.max_clients,
                    "refusing client connections: too many open (--max-clients)"
                );
            }
            return None;
        }
        Some(ClientSlot(limits))
    }

    pub async fn serve(&self, connection: Connection, client: String) {
        debug!(client, remote = %connection.remote_address(), "client connected");
        while let Ok((send, recv)) = connection.accept_bi().await {
            let api = self.clone();
            let client = client.clone();
            tokio::spawn(async move { api.serve_stream(client, send, recv).await });
        }
    }

    /// One stream may carry several requests (`node send -` pipelines its
    /// batches on one). Sends are handed to the Raft driver in the order
    /// they were written, so one client's messages enter the log in its
    /// own order; answers go back in the same order. At most `STREAM_WINDOW`
    /// requests per stream are outstanding before reading pauses.
    pub async fn serve_stream<W: Writer, R: Reader>(
        &self,
        client: String,
        mut send: W,
        mut recv: R,
    ) {
        // A watch takes the whole stream; anything else starts the
        // request/answer pipeline.
        let first = match read_frame::<_, ClientRequest>(&mut recv).await {
            Ok(Some(ClientRequest::Watch { start, until })) if !client.starts_with(OUTSIDER) => {
                self.watch(&client, send, start, until).await;
                return;
            }
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(e) if went_away(&e) => {
                debug!(client, "a stream closed before its first request: {e}");
                return;
            }
            Err(e) => {
                warn!(client, "bad request: {e}");
                let _ = write_frame(&mut send, &error(format!("bad request: {e}"), false)).await;
                let _ = send.shutdown().await;
                return;
            }
        };
        // One task reads the requests and writes the answers in order: a
        // writer task of its own would cost a wake-up per answer. Each
        // read and each write is a future owning its half of the stream,
        // kept across rounds of the loop, so a half-read frame is never
        // dropped, and answers are taken as they come, written or not:
        // an answer waiting for room in the stream neither stops the
        // reading nor holds its send's room in the node (`Limits`). A
        // client that wrote while its answers piled up (as `node send -`
        // did) deadlocked with a node that did both, each end waiting in
        // a write; and one client not reading held the room of every send
        // it had in flight.
        let mut answers = futures_util::stream::FuturesOrdered::new();
        let mut ready: VecDeque<ClientResponse> = VecDeque::new();
        let mut reading = true;
        let mut waiting: Option<WaitingSend> = None;
        let first = self.start(&client, first, false);
        self.take_started(first, &mut answers, &mut reading, &mut waiting);
        let mut next = Box::pin(read_frame_owned::<_, ClientRequest>(recv));
        let mut idle_send = Some(send);
        let mut writing = std::pin::pin!(futures_util::future::Fuse::terminated());
        loop {
            if let Some(send) = idle_send.take() {
                match ready.pop_front() {
                    Some(response) => writing.set(futures_util::FutureExt::fuse(
                        write_frame_owned(send, response),
                    )),
                    None => idle_send = Some(send),
                }
            }
            tokio::select! {
                // Answers first: they free the window for more requests.
                biased;
                (back, written) = &mut writing, if idle_send.is_none() => {
                    let written: Result<(), crate::wire::WireError> = written;
                    if written.is_err() {
                        return;
                    }
                    idle_send = Some(back);
                }
                Some(response) = futures_util::StreamExt::next(&mut answers) => {
                    ready.push_back(response);
                }
                permit = async {
                    match waiting.as_mut() {
                        Some(send) => (&mut send.room).await,
                        None => std::future::pending().await,
                    }
                }, if waiting.is_some() => {
                    if let Some(send) = waiting.take() {
                        let started = match permit {
                            Ok(permit) => self.propose_send(&client, send.send, permit),
                            Err(response) => Started::Refused(response),
                        };
                        self.take_started(started, &mut answers, &mut reading, &mut waiting);
                    }
                }
                (rest, request) = &mut next, if reading && waiting.is_none() && answers.len() + ready.len() < STREAM_WINDOW => {
                    match request {
                        Ok(Some(request)) => {
                            // Behind anything not yet answered to the
                            // client: still pending, or answered and not
                            // yet written.
                            let behind = !answers.is_empty() || !ready.is_empty() || idle_send.is_none();
                            let started = self.start(&client, request, behind);
                            self.take_started(started, &mut answers, &mut reading, &mut waiting);
                            next = Box::pin(read_frame_owned(rest));
                        }
                        Ok(None) => reading = false,
                        Err(e) if went_away(&e) => {
                            debug!(client, "a stream closed between requests: {e}");
                            reading = false;
                        }
                        Err(e) => {
                            warn!(client, "bad request: {e}");
                            let response = error(format!("bad request: {e}"), false);
                            answers.push_back(Box::pin(async move { response }));
                            reading = false;
                        }
                    }
                }
                else => break,
            }
        }
        let Some(mut send) = idle_send else {
            return;
        };
        let _ = send.shutdown().await;
    }

    /// Starts a request: a send is validated and handed to the driver now
    /// (or, `behind` requests still outstanding on its stream, waits its
    /// turn for room); the answer future waits for the outcome.
    fn start(&self, client: &str, request: ClientRequest, behind: bool) -> Started {
        let lookup = matches!(request, ClientRequest::Members | ClientRequest::Status);
        if client.starts_with(OUTSIDER) && !lookup {
            return Started::Refused(error(
                format!(
                    "{} is not a member of this node's configuration: it may ask for the configuration and status only",
                    client.trim_start_matches("outsider@")
                ),
                false,
            ));
        }
        match request {
            ClientRequest::Send {
                client_id,
                first_seq,
                lamport,
                since,
                texts,
                after,
            } => self.start_send(
                client,
                NewSend {
                    client_id,
                    first_seq,
                    lamport,
                    since,
                    texts,
                    after,
                },
                behind,
            ),
            query => {
                let api = self.clone();
                Started::Answer(Box::pin(async move { api.query(query).await }))
            }
        }
    }

    /// Files what `start` came to: an answer in turn; a refusal, after
    /// which the stream reads nothing more (the client's later sends on it
    /// were written behind the refused one, and taking them would put
    /// them in the log before it: `node send -` reordered its lines under
    /// back-pressure that way); or a send waiting for room, which holds up
    /// reading until it is in.
    fn take_started(
        &self,
        started: Started,
        answers: &mut futures_util::stream::FuturesOrdered<Answer>,
        reading: &mut bool,
        waiting: &mut Option<WaitingSend>,
    ) {
        match started {
            Started::Answer(answer) => answers.push_back(answer),
            Started::Refused(response) => {
                answers.push_back(Box::pin(async move { response }));
                *reading = false;
            }
            Started::Waiting(send) => *waiting = Some(send),
        }
    }

    fn submit(&self, input: Input) -> Result<(), ClientResponse> {
        match self.inputs.try_send(input) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(ClientResponse::Busy {
                message: "node busy: its input queue is full; retry".into(),
            }),
            Err(TrySendError::Disconnected(_)) => Err(shutting_down()),
        }
    }

    /// Answers a request that reads rather than writes.
    async fn query(&self, request: ClientRequest) -> ClientResponse {
        match request {
            ClientRequest::Send { .. } => error("a send is not a query", false),
            ClientRequest::Export { from, limit, upto } => {
                let upto = match upto {
                    // A later page, pinned to the first page's read: any
                    // node whose own store holds that much of the committed
                    // log can serve it (committed entries are the same
                    // everywhere), and no other node may.
                    Some(upto) => match self.status().await {
                        Ok(status) if status.commit >= upto => upto,
                        Ok(status) => {
                            return ClientResponse::Error {
                                message: format!(
                                    "node {} knows the log committed up to {} only, short of {upto}; ask another node",
                                    self.me, status.commit
                                ),
                                retry: true,
                                detail: None,
                            }
                        }
                        Err(response) => return response,
                    },
                    None => match self.read_index().await {
                        Ok(index) => index,
                        Err(response) => return response,
                    },
                };
                self.page(from, upto, limit)
            }
            ClientRequest::LocalExport { from, limit } => match self.status().await {
                Ok(status) => self.page(from, status.commit, limit),
                Err(response) => response,
            },
            ClientRequest::Status => match self.status().await {
                Ok(status) => ClientResponse::Status(Box::new(status)),
                Err(response) => response,
            },
            ClientRequest::ChangeMembership(change) => self.change_membership(change).await,
            ClientRequest::Watch { .. } => {
                error("a watch must be the first request on its own stream", false)
            }
            ClientRequest::Members => {
                let (reply, answer) = oneshot::channel();
                if let Err(response) = self.submit(Input::Members(reply)) {
                    return response;
                }
                match answer.await {
                    Ok((status, committed, committed_index)) => {
                        ClientResponse::Members(Box::new(MembersView {
                            status,
                            committed,
                            committed_index,
                            cluster_digest: self.cluster_digest,
                        }))
                    }
                    Err(_) => shutting_down(),
                }
            }
        }
    }

    /// Hands a membership change to the driver and waits until it commits;
    /// a follower redirects to the leader, as for sends.
    async fn change_membership(&self, change: MembershipChange) -> ClientResponse {
        let (reply, answer) = oneshot::channel();
        if let Err(response) = self.submit(Input::ChangeMembership(change, reply)) {
            return response;
        }
        match answer.await {
            Ok(Ok(index)) => ClientResponse::MembershipChanged {
                index,
                leader: self.me,
            },
            Ok(Err(ChangeError::NotLeader { leader })) => ClientResponse::Redirect { leader },
            Ok(Err(error)) => ClientResponse::ChangeRefused { error },
            Err(_) => shutting_down(),
        }
    }

    /// Over the bound on what waits to commit, a send alone on its stream
    /// is answered "busy" (the client retries it); one `behind` others on
    /// a pipelined stream waits for room instead, so the pipeline slows
    /// down rather than falling back to one send at a time across the
    /// ocean (a WAN client with batches of 4,096 went from 268,000 to
    /// 38,000 msg/s that way).
    fn start_send(&self, client: &str, send: NewSend, behind: bool) -> Started {
        let cost = match self.send_cost(&send) {
            Ok(cost) => cost,
            Err(response) => return Started::Refused(response),
        };
        if let Ok(permit) = self.limits.pending.clone().try_acquire_many_owned(cost) {
            return self.propose_send(client, send, permit);
        }
        let room = self.limits.pending.clone().acquire_many_owned(cost);
        let room: Room = if behind {
            // Behind others on its stream: it waits as long as it takes,
            // so the stream's sends enter the log in order.
            self.metrics.waited_sends.inc();
            Box::pin(async move { room.await.map_err(|_| shutting_down()) })
        } else {
            let (limits, metrics) = (self.limits.clone(), self.metrics.clone());
            Box::pin(async move {
                match tokio::time::timeout(LONE_SEND_WAIT, room).await {
                    Ok(Ok(permit)) => Ok(permit),
                    Ok(Err(_)) => Err(shutting_down()),
                    Err(_) => {
                        metrics.busy_sends.inc();
                        Err(ClientResponse::Busy {
                            message: format!(
                                "node busy: {} KiB of messages are waiting to commit (limit {} KiB); retry",
                                limits.pending_kib - limits.pending.available_permits(),
                                limits.pending_kib
                            ),
                        })
                    }
                }
            })
        };
        Started::Waiting(WaitingSend { room, send })
    }

    /// What a send holds of `Limits::pending` while it waits to commit, in
    /// KiB, or why it is refused whatever the load.
    fn send_cost(&self, send: &NewSend) -> Result<u32, ClientResponse> {
        let texts = &send.texts;
        if texts.is_empty() || texts.len() > MAX_BATCH {
            return Err(error(
                format!(
                    "a send carries 1 to {MAX_BATCH} messages, not {}",
                    texts.len()
                ),
                false,
            ));
        }
        if send.last_seq().is_none() {
            return Err(error(
                format!(
                    "sequence numbers from {} for {} messages run past the end of their range",
                    send.first_seq,
                    texts.len()
                ),
                false,
            ));
        }
        if let Some(after) = send.after.filter(|after| *after >= send.first_seq) {
            return Err(error(
                format!(
                    "a send from sequence number {} cannot follow {after}: it must follow an earlier message",
                    send.first_seq
                ),
                false,
            ));
        }
        let cost: usize = texts.iter().map(|t| t.len().div_ceil(1024).max(1)).sum();
        // A send that outweighs the whole bound waits until nothing else
        // is pending and takes all of it. Refused, it failed `node send -`
        // (batches of `client::LINES_PER_BATCH`) against a node with a
        // small `--max-pending-mb`; one send is bounded anyway
        // (`MAX_SEND_BYTES`, `MAX_BATCH`).
        let cost = cost.min(self.limits.pending_kib);
        u32::try_from(cost).map_err(|_| error(format!("a send of {cost} KiB is too large"), false))
    }

    /// Hands an admitted send to the driver; its answer comes when the
    /// driver says how it ended, and its room is given back then. Each
    /// message must follow the one before it (`Proposal::after`), so a
    /// send enters the log as a prefix of itself, never with a hole.
    fn propose_send(
        &self,
        client: &str,
        send: NewSend,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Started {
        let sender: std::sync::Arc<str> = client.into();
        let mut after = send.after.map(|seq| RequestId {
            client_id: send.client_id,
            seq,
        });
        let proposals = send
            .texts
            .into_iter()
            .enumerate()
            .map(|(i, text)| {
                // No overflow: `send_cost` checked the last one.
                let id = RequestId {
                    client_id: send.client_id,
                    seq: send.first_seq + i as u64,
                };
                Proposal {
                    id,
                    lamport: send.lamport,
                    since: send.since,
                    sender: sender.clone(),
                    data: Bytes::from(text),
                    after: after.replace(id),
                    // The driver's to set.
                    ctx: 0,
                }
            })
            .collect();
        let (reply, answer) = oneshot::channel();
        if let Err(response) = self.submit(Input::Propose(proposals, reply)) {
            return Started::Refused(response);
        }
        let me = self.me;
        Started::Answer(Box::pin(async move {
            let outcome = answer.await;
            drop(permit);
            sent(me, outcome)
        }))
    }

    async fn read_index(&self) -> Result<u64, ClientResponse> {
        let (reply, answer) = oneshot::channel();
        self.submit(Input::Read(reply))?;
        match answer.await {
            Ok(Ok(index)) => Ok(index),
            Ok(Err(ProposeError::NotLeader { leader })) => Err(ClientResponse::Redirect { leader }),
            Ok(Err(e)) => Err(error(e.to_string(), true)),
            Err(_) => Err(shutting_down()),
        }
    }

    /// This node's status, for local callers such as the HTTP API.
    pub async fn local_status(&self) -> Result<crate::raft::Status, StatusUnavailable> {
        self.status().await.map_err(|response| {
            StatusUnavailable(match response {
                ClientResponse::Error { message, .. } => message,
                other => format!("{other:?}"),
            })
        })
    }

    async fn status(&self) -> Result<crate::raft::Status, ClientResponse> {
        let (reply, answer) = oneshot::channel();
        self.submit(Input::Status(reply))?;
        answer.await.map_err(|_| shutting_down())
    }

    /// Serves a watch: pages of committed messages read from this node's
    /// store as its synced commit passes them. Writing waits for the
    /// reader (QUIC flow control), so a slow reader holds one page here,
    /// never a queue: whatever it has not read yet stays on disk.
    async fn watch<W: Writer>(&self, client: &str, mut send: W, start: Start, until: Until) {
        self.metrics.watchers.inc();
        let outcome = self.follow(&mut send, start, until).await;
        self.metrics.watchers.dec();
        match outcome {
            Ok(()) => {
                let _ = send.shutdown().await;
            }
            Err(Some(response)) => {
                debug!(client, ?response, "watch ended");
                let _ = write_frame(&mut send, &response).await;
                let _ = send.shutdown().await;
            }
            // The reader went away.
            Err(None) => {}
        }
    }

    /// The body of `watch`: `Err(Some(answer))` ends it with an answer,
    /// `Err(None)` when the stream is gone.
    async fn follow<W: Writer>(
        &self,
        send: &mut W,
        start: Start,
        until: Until,
    ) -> Result<(), Option<ClientResponse>> {
        let mut commits = self.commits.clone();
        let upto = match until {
            Until::Follow => None,
            Until::ReadIndex => Some(self.read_index().await.map_err(Some)?),
            Until::Commit => Some(commits.borrow().commit),
            Until::Index(index) => Some(index),
        };
        let mut next = match start {
            Start::Index(index) => index.max(1),
            Start::Last(n) => self
                .start_of_last(n, commits.borrow().commit)
                .map_err(|e| Some(error(e, false)))?,
        };
        let mut quiet_since = tokio::time::Instant::now();
        loop {
            let view = *commits.borrow_and_update();
            let end = upto.map_or(view.commit, |upto| upto.min(view.commit));
            let finished = upto.is_some_and(|upto| next > upto);
            if next <= end || finished {
                let mut entries = Vec::new();
                if next <= end {
                    let read = self
                        .log
                        .entries_within(next, end, PAGE as usize, PAGE_BYTES)
                        .map_err(|e| Some(error(e.to_string(), true)))?;
                    let Some(last) = read.last() else {
                        return Err(Some(error(
                            format!(
                                "node {} holds no entry at index {next} though it has committed {end}",
                                self.me
                            ),
                            true,
                        )));
                    };
                    next = last.index + 1;
                    entries = read
                        .into_iter()
                        .filter_map(ExportedEntry::from_entry)
                        .collect();
                }
                let page = ClientResponse::Page {
                    entries,
                    next,
                    upto,
                    commit: view.commit,
                    leader: view.leader,
                };
                write_frame(send, &page).await.map_err(|_| None)?;
                if upto.is_some_and(|upto| next > upto) {
                    return Ok(());
                }
                quiet_since = tokio::time::Instant::now();
                continue;
            }
            tokio::select! {
                changed = commits.changed() => {
                    if changed.is_err() {
                        return Err(Some(shutting_down()));
                    }
                }
                () = tokio::time::sleep_until(quiet_since + WATCH_HEARTBEAT) => {
                    let beat = ClientResponse::Page {
                        entries: Vec::new(),
                        next,
                        upto,
                        commit: view.commit,
                        leader: view.leader,
                    };
                    write_frame(send, &beat).await.map_err(|_| None)?;
                    quiet_since = tokio::time::Instant::now();
                }
            }
        }
    }

    /// The index from which the last `n` committed messages (up to
    /// `commit`) follow, scanning back from the end: entries without a
    /// message (no-ops, configurations) do not count.
    fn start_of_last(&self, n: u64, commit: Index) -> Result<Index, String> {
        let mut from = commit + 1;
        let mut found = 0;
        while found < n && from > 1 {
            let lower = from.saturating_sub(n - found).max(1);
            let mut at = lower;
            while at < from {
                let read = self
                    .log
                    .entries_within(at, from - 1, PAGE as usize, PAGE_BYTES)
                    .map_err(|e| e.to_string())?;
                let Some(last) = read.last() else {
                    return Err(format!("node {} holds no entry at index {at}", self.me));
                };
                at = last.index + 1;
                found += read
                    .iter()
                    .filter(|e| matches!(e.payload, Payload::Command(_)))
                    .count() as u64;
            }
            from = lower;
        }
        Ok(from)
    }

    fn page(&self, from: u64, upto: u64, limit: u64) -> ClientResponse {
        let limit = limit.clamp(1, PAGE) as usize;
        match self
            .log
            .entries_within(from.max(1), upto, limit, PAGE_BYTES)
        {
            Ok(entries) => {
                let next = entries.last().map_or(from.max(1), |e| e.index + 1);
                let entries = entries
                    .into_iter()
                    .filter_map(ExportedEntry::from_entry)
                    .collect();
                ClientResponse::Entries {
                    entries,
                    upto,
                    next,
                }
            }
            Err(e) => error(e.to_string(), false),
        }
    }
}
