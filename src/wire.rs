//! Everything that crosses the network, and the one place that encodes it:
//! length-prefixed bincode frames with a size limit.

use bincode::Options;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::raft::{
    ChangeError, Committed, Envelope, Index, Membership, MembershipChange, NodeId, ProposeError,
    Status,
};

/// Largest frame accepted from anyone. Appends are sized well below it.
pub const MAX_FRAME: usize = 16 << 20;

/// The largest message a client may send.
pub const MAX_MESSAGE_BYTES: usize = crate::raft::MAX_COMMAND_BYTES;

/// Most bytes of messages one send request carries: a batch of the largest
/// messages still fits a frame with room to spare.
pub const MAX_SEND_BYTES: usize = 4 << 20;

/// Most messages one send request may carry.
pub const MAX_BATCH: usize = 4096;

/// Most requests one client stream may have outstanding: a node reads no
/// further ahead on a stream until it has answered the oldest.
pub const STREAM_WINDOW: usize = 64;

/// Most entries one export or watch page returns.
pub const PAGE: u64 = 10_000;

/// Most bytes of entries (`Entry::size`) one page returns, at least one
/// entry: pages of 10,000 entries over ~1.6 KB each exceeded a frame.
pub const PAGE_BYTES: usize = 4 << 20;

/// The QUIC close code of a client connection refused because the node
/// has too many open: the client retries after a pause.
pub const CLOSE_BUSY: u32 = 5;

/// The QUIC application protocol of clients (and of a node's HTTP side
/// reaching the cluster): requests on bidirectional streams. The version
/// moves with the wire format (bincode, positional): nodes and clients of
/// different versions refuse each other at the handshake instead of
/// misreading frames, so a cluster is upgraded all at once.
pub const ALPN: &[u8] = b"cluster-store/4";

/// The QUIC application protocol of peer links: Raft on unidirectional
/// streams. A connection says what it is for in its handshake, so a node's
/// HTTP side, which dials with the node's own certificate, can never be
/// taken for that node's Raft link.
pub const PEER_ALPN: &[u8] = b"cluster-store-peer/6";

/// The first frame of every stream says what the stream is for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum PeerFrame {
    /// Raft messages from one node to another, in order.
    Raft(Envelope),
    /// The first frame of every peer stream: which cluster the sender
    /// belongs to. Nodes bootstrapped from different member lists could
    /// each elect a leader of their own view, so they refuse each other.
    Hello(PeerHello),
}

/// What a node says about itself when it opens a peer stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerHello {
    pub cluster_id: String,
    /// `server::bootstrap::cluster_digest` of the configuration the
    /// cluster was first started with; a joining node copies it.
    pub cluster_digest: u64,
}

/// A client's request, one per bidirectional stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ClientRequest {
    /// Append messages, in order, with sequence numbers `first_seq..`.
    /// The sender's name comes from its certificate.
    Send {
        client_id: u64,
        first_seq: u64,
        lamport: u64,
        /// A commit index the client learned before its first send: below
        /// every message of its session (see `Proposal::since`).
        since: Index,
        texts: Vec<String>,
        /// The sequence number of one of this client's messages that the
        /// first of these must follow in the log (`Proposal::after`): a
        /// client pipelining sends names the last message of the send
        /// before, still unanswered when it wrote this one. Refused
        /// (retry) while that one is not in the log, so a refused send
        /// cannot be overtaken by the ones written behind it.
        after: Option<u64>,
    },
    /// A linearizable read of the committed log from `from`, at most
    /// `limit` entries; `upto` pins later pages to the first page's read.
    Export {
        from: Index,
        limit: u64,
        upto: Option<Index>,
    },
    /// This node's own replica: what it has committed, no leader involved.
    LocalExport {
        from: Index,
        limit: u64,
    },
    Status,
    /// Change the cluster's configuration (leader only; answered once the
    /// change commits).
    ChangeMembership(MembershipChange),
    /// The configuration as this node sees it (any node answers).
    Members,
    /// Follow the committed log from `start` on this one stream: the node
    /// answers with `Page`s as entries commit (from its own store, never
    /// past its synced commit), an empty one every `WATCH_HEARTBEAT` when
    /// nothing commits, and finishes the stream once `until` is reached.
    /// Any member may serve it, learners included; only `Until::ReadIndex`
    /// needs the leader.
    Watch {
        start: Start,
        until: Until,
    },
}

/// Where a watch starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Start {
    /// At this index (1 for the whole log).
    Index(Index),
    /// So that the last `n` committed messages come first (0: only what
    /// commits from now on).
    Last(u64),
}

/// Where a watch ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Until {
    /// Never: it follows the log until the client goes away.
    Follow,
    /// At a linearizable read index the leader takes when the watch
    /// starts: a consistent export (the first page tells the index).
    ReadIndex,
    /// At what the serving node itself has committed when the watch
    /// starts: one replica's view (backups).
    Commit,
    /// At this index (an export resumed elsewhere keeps its end).
    Index(Index),
}

/// How often a watch that has nothing new says it is still there.
pub const WATCH_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ClientResponse {
    Sent {
        committed: Vec<Committed>,
        leader: NodeId,
    },
    Entries {
        entries: Vec<ExportedEntry>,
        /// The last index this export covers.
        upto: Index,
        /// Where the next page starts.
        next: Index,
    },
    Status(Box<Status>),
    /// Not the leader: retry at `leader` if known.
    Redirect {
        leader: Option<NodeId>,
    },
    /// The request failed; `retry` says whether the same request may succeed later.
    Error {
        message: String,
        retry: bool,
        detail: Option<ProposeError>,
    },
    /// Overloaded: retry the same request at the same node after a pause.
    Busy {
        message: String,
    },
    /// The configuration change committed at `index`.
    MembershipChanged {
        index: Index,
        leader: NodeId,
    },
    /// The leader refused the change (nothing was written), or lost its
    /// leadership before it committed (`ChangeError::LeadershipLost`).
    ChangeRefused {
        error: ChangeError,
    },
    Members(Box<MembersView>),
    /// One page of a watch: committed messages in log order (entries
    /// without a message, such as configurations, are skipped but counted
    /// in `next`).
    Page {
        entries: Vec<ExportedEntry>,
        /// Where the next page starts.
        next: Index,
        /// The index the watch ends at, if it ends.
        upto: Option<Index>,
        /// What the serving node has committed (and synced) so far, and the
        /// leader it knows of: a reader can tell a node cut off from the
        /// cluster from a quiet log.
        commit: Index,
        leader: Option<NodeId>,
    },
}

/// One node's view of the configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MembersView {
    /// The node's status: the configuration in force, and on the leader
    /// every member's match index and lag.
    pub status: Status,
    /// The latest configuration this node knows to be committed, and the
    /// index of its entry (a node joining or rebuilt records both).
    pub committed: Membership,
    pub committed_index: Index,
    /// See `PeerHello::cluster_digest`.
    pub cluster_digest: u64,
}

/// A committed message as users see it: in exports and watches, on the
/// wire, in `/messages` and `/events`. Its text and JSON forms are stable
/// (README, "Stable formats").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportedEntry {
    pub index: Index,
    pub term: u64,
    pub lamport: u64,
    pub sender: String,
    pub text: String,
}

impl ExportedEntry {
    /// The message a log entry carries, as users see it; `None` for entries
    /// that carry none (no-ops and configurations).
    pub fn from_entry(entry: crate::raft::Entry) -> Option<ExportedEntry> {
        match entry.payload {
            crate::raft::Payload::Command(command) => Some(ExportedEntry {
                index: entry.index,
                term: entry.term,
                lamport: entry.lamport,
                sender: command.sender.to_string(),
                text: String::from_utf8_lossy(&command.data).into_owned(),
            }),
            crate::raft::Payload::Noop | crate::raft::Payload::Membership(_) => None,
        }
    }

    /// The text form: one line, `index<TAB>lamport<TAB>sender<TAB>text`,
    /// with backslash, tab, newline and carriage return in the text
    /// written `\\`, `\t`, `\n` and `\r`.
    pub fn format_line(&self) -> String {
        let mut text = String::with_capacity(self.text.len());
        for c in self.text.chars() {
            match c {
                '\\' => text.push_str("\\\\"),
                '\t' => text.push_str("\\t"),
                '\n' => text.push_str("\\n"),
                '\r' => text.push_str("\\r"),
                c => text.push(c),
            }
        }
        format!(
            "{}\t{}\t{}\t{}",
            self.index, self.lamport, self.sender, text
        )
    }

    /// The JSON form: an object with `index`, `term`, `lamport`, `sender`
    /// and `text`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "index": self.index,
            "term": self.term,
            "lamport": self.lamport,
            "sender": self.sender,
            "text": self.text,
        })
    }

    /// The JSON form on one line.
    pub fn format_json(&self) -> String {
        self.to_json().to_string()
    }
}

/// Why a frame could not be written or read. Each says what is wrong with
/// the bytes; the cause is part of the message (none is chained as a
/// `source`, so a chain printer says it once).
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// A frame (announced or encoded) over `MAX_FRAME`.
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME} bytes")]
    TooLarge(usize),
    /// A frame body that is not a message of the expected type.
    #[error("malformed frame: {0}")]
    Malformed(DecodeError),
    /// The stream ended inside a frame's 4-byte length prefix.
    #[error("the stream ended {0} bytes into a frame's 4-byte length")]
    TruncatedLength(usize),
    /// The stream ended inside a frame's body.
    #[error("the stream ended {received} bytes into a frame of {expected} bytes")]
    Truncated { expected: usize, received: usize },
    /// A value that cannot be encoded (not a size problem).
    #[error("cannot encode the message: {0}")]
    Unencodable(String),
    /// Reading or writing the stream failed.
    #[error("stream error: {0}")]
    Io(std::io::Error),
}

impl From<std::io::Error> for WireError {
    fn from(error: std::io::Error) -> Self {
        WireError::Io(error)
    }
}

impl From<DecodeError> for WireError {
    fn from(error: DecodeError) -> Self {
        WireError::Malformed(error)
    }
}

/// What is wrong with a frame body that does not decode.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The body ends before the message does.
    #[error("the body ends before the message does")]
    Truncated,
    /// Bytes left over after a whole message.
    #[error("bytes are left over after the message")]
    TrailingBytes,
    /// An enum tag (a message or field kind) this version does not know:
    /// serde's words, which name the tag and the range known.
    #[error("unknown kind of message or field ({0})")]
    UnknownVariant(String),
    /// An optional field's tag that is neither 0 (none) nor 1 (some).
    #[error("an optional field has tag {0}, not 0 or 1")]
    BadOptionTag(usize),
    /// A boolean byte that is neither 0 nor 1.
    #[error("a boolean field is {0}, not 0 or 1")]
    BadBool(u8),
    #[error("a text field is not valid UTF-8")]
    BadUtf8,
    #[error("a character field is not a valid character")]
    BadChar,
    /// A length inside the body that would exceed the frame limit.
    #[error("a length inside it exceeds the limit of {MAX_FRAME} bytes")]
    LengthOverLimit,
    /// Anything else bincode or serde refused, in their words.
    #[error("{0}")]
    Invalid(String),
}

impl From<bincode::Error> for DecodeError {
    fn from(error: bincode::Error) -> Self {
        match *error {
            bincode::ErrorKind::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                DecodeError::Truncated
            }
            bincode::ErrorKind::InvalidUtf8Encoding(_) => DecodeError::BadUtf8,
            bincode::ErrorKind::InvalidBoolEncoding(byte) => DecodeError::BadBool(byte),
            bincode::ErrorKind::InvalidCharEncoding => DecodeError::BadChar,
            bincode::ErrorKind::InvalidTagEncoding(tag) => DecodeError::BadOptionTag(tag),
            bincode::ErrorKind::SizeLimit => DecodeError::LengthOverLimit,
            // bincode's `reject_trailing_bytes`.
            bincode::ErrorKind::Custom(message) if message.contains("bytes remaining") => {
                DecodeError::TrailingBytes
            }
            // serde's derived enums: "invalid value: integer `9`, expected
            // variant index 0 <= i < 9".
            bincode::ErrorKind::Custom(message) if message.contains("variant index") => {
                DecodeError::UnknownVariant(message)
            }
            other => DecodeError::Invalid(other.to_string()),
        }
    }
}

fn options() -> impl Options {
    bincode::DefaultOptions::new()
        .with_limit(MAX_FRAME as u64)
        .with_fixint_encoding()
        .reject_trailing_bytes()
}

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, WireError> {
    let body = match options().serialize(value) {
        Ok(body) => body,
        // Over the limit: say by how much, so a caller can tell a request
        // no node would take from one that failed on the way.
        Err(error) if matches!(*error, bincode::ErrorKind::SizeLimit) => {
            let size = bincode::DefaultOptions::new()
                .with_fixint_encoding()
                .serialized_size(value)
                .map_or(usize::MAX, |size| {
                    usize::try_from(size).unwrap_or(usize::MAX)
                });
            return Err(WireError::TooLarge(size));
        }
        Err(error) => return Err(WireError::Unencodable(error.to_string())),
    };
    if body.len() > MAX_FRAME {
        return Err(WireError::TooLarge(body.len()));
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, WireError> {
    options()
        .deserialize(body)
        .map_err(|error| WireError::Malformed(error.into()))
}

pub async fn write_frame<W: AsyncWriteExt + Unpin, T: Serialize>(
    writer: &mut W,
    value: &T,
) -> Result<(), WireError> {
    let frame = encode(value)?;
    writer.write_all(&frame).await?;
    // TLS over TCP holds a record until flushed; a QUIC stream sends anyway.
    writer.flush().await?;
    Ok(())
}

/// `write_frame` on a writer it owns, handing it back: a future that can
/// be kept across a `select!` loop, so a side that must go on reading
/// while a large frame waits for room is never stuck in the write (both
/// ends of a TCP stream writing, neither reading, is a deadlock).
pub async fn write_frame_owned<W: AsyncWriteExt + Unpin, T: Serialize>(
    mut writer: W,
    value: T,
) -> (W, Result<(), WireError>) {
    let written = write_frame(&mut writer, &value).await;
    (writer, written)
}

/// `read_frame` on a reader it owns, handing it back (see
/// `write_frame_owned`): dropping a read part-way would lose the frame.
pub async fn read_frame_owned<R: AsyncReadExt + Unpin, T: DeserializeOwned>(
    mut reader: R,
) -> (R, Result<Option<T>, WireError>) {
    let read = read_frame(&mut reader).await;
    (reader, read)
}

/// Reads one frame; `Ok(None)` at a clean end of stream.
pub async fn read_frame<R: AsyncReadExt + Unpin, T: DeserializeOwned>(
    reader: &mut R,
) -> Result<Option<T>, WireError> {
    Ok(read_frame_sized(reader).await?.map(|(value, _)| value))
}

/// Reads one frame and says how many bytes it took.
pub async fn read_frame_sized<R: AsyncReadExt + Unpin, T: DeserializeOwned>(
    reader: &mut R,
) -> Result<Option<(T, usize)>, WireError> {
    // A clean end comes between frames; one inside the length is a cut.
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < len.len() {
        match reader.read(&mut len[got..]).await? {
            0 if got == 0 => return Ok(None),
            0 => return Err(WireError::TruncatedLength(got)),
            n => got += n,
        }
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len));
    }
    // Grow the buffer as bytes arrive rather than trusting the prefix:
    // a stream that announces 16 MiB and sends nothing costs nothing. It
    // doubles, but never past the announced length, so the frame's
    // entries (which keep the buffer, `zero_copy`) hold no slack.
    let mut body = Vec::with_capacity(len.min(64 << 10));
    while body.len() < len {
        if body.len() == body.capacity() {
            body.reserve_exact(body.len().min(len - body.len()));
        }
        let want = (len - body.len()) as u64;
        if (&mut *reader).take(want).read_buf(&mut body).await? == 0 {
            return Err(WireError::Truncated {
                expected: len,
                received: body.len(),
            });
        }
    }
    // Messages in the frame stay in its buffer (`zero_copy`).
    let body = bytes::Bytes::from(body);
    crate::zero_copy::sharing(&body, || decode(&body)).map(|value| Some((value, 4 + len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_has_a_stable_text_line_and_json_object() {
        let message = ExportedEntry {
            index: 7,
            term: 2,
            lamport: 12,
            sender: "alice".into(),
            text: "a\tb\\c\nd\re".into(),
        };
        assert_eq!(message.format_line(), "7\t12\talice\ta\\tb\\\\c\\nd\\re");
        assert_eq!(
            message.format_json(),
            r#"{"index":7,"lamport":12,"sender":"alice","term":2,"text":"a\tb\\c\nd\re"}"#
        );
    }

    #[tokio::test]
    async fn frames_round_trip_and_garbage_is_refused() {
        let request = ClientRequest::Send {
            client_id: 1,
            first_seq: 2,
            lamport: 3,
            since: 4,
            texts: vec!["hi".into()],
            after: Some(1),
        };
        let frame = encode(&request).unwrap();
        let mut reader = &frame[..];
        let back: Option<ClientRequest> = read_frame(&mut reader).await.unwrap();
        assert_eq!(back, Some(request));

        let mut garbage: &[u8] = &[0, 0, 0, 3, 0xff, 0xff, 0xff];
        assert!(matches!(
            read_frame::<_, ClientRequest>(&mut garbage).await,
            Err(WireError::Malformed(_))
        ));
        let change = ClientRequest::ChangeMembership(MembershipChange::AddLearner {
            id: 4,
            address: "h4:7000".into(),
        });
        assert_eq!(
            decode::<ClientRequest>(&encode(&change).unwrap()[4..]).unwrap(),
            change
        );
        let refused = ClientResponse::ChangeRefused {
            error: ChangeError::NotCaughtUp {
                id: 4,
                match_index: 1,
                last_index: 5000,
            },
        };
        assert_eq!(
            decode::<ClientResponse>(&encode(&refused).unwrap()[4..]).unwrap(),
            refused
        );
        let hello = PeerFrame::Hello(PeerHello {
            cluster_id: "c".into(),
            cluster_digest: 42,
        });
        assert_eq!(
            decode::<PeerFrame>(&encode(&hello).unwrap()[4..]).unwrap(),
            hello
        );

        let mut huge: &[u8] = &[0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            read_frame::<_, ClientRequest>(&mut huge).await,
            Err(WireError::TooLarge(_))
        ));
    }

    #[tokio::test]
    async fn a_large_frame_arriving_in_small_pieces_reads_whole_and_no_further() {
        use crate::raft::{Command, Entry, Message, Payload};
        // ~600 KB of entries, through a pipe that carries 1 KiB at a time:
        // the buffer grows across many reads and past its first 64 KiB.
        let entries: Vec<Entry> = (1..=300)
            .map(|index| Entry {
                index,
                term: 2,
                lamport: index,
                payload: Payload::Command(Command {
                    client_id: 9,
                    seq: index,
                    sender: if index % 2 == 0 { "even" } else { "odd" }.into(),
                    data: vec![index as u8; 2000].into(),
                }),
            })
            .collect();
        let frame = PeerFrame::Raft(Envelope {
            from: 1,
            to: 2,
            term: 2,
            lamport: 300,
            message: Message::Append {
                prev_index: 0,
                prev_term: 0,
                entries,
                commit: 0,
                lazy: false,
            },
        });
        // A second frame follows at once: the first read must stop at its
        // own frame's end, never taking the next one's bytes.
        let next = PeerFrame::Hello(PeerHello {
            cluster_id: "c".into(),
            cluster_digest: 7,
        });
        let (mut writer, mut reader) = tokio::io::duplex(1024);
        let sent = (frame.clone(), next.clone());
        let writing = tokio::spawn(async move {
            write_frame(&mut writer, &sent.0).await?;
            write_frame(&mut writer, &sent.1).await
        });
        let (read, size) = read_frame_sized::<_, PeerFrame>(&mut reader)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(read, frame);
        assert_eq!(size, encode(&frame).unwrap().len());
        let after = read_frame::<_, PeerFrame>(&mut reader).await.unwrap();
        assert_eq!(after, Some(next));
        writing.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_bad_frame_is_named_for_what_is_wrong() {
        let status = encode(&ClientRequest::Status).unwrap();
        let body = &status[4..];

        // Cut inside the length, inside the body, and inside the message.
        let mut cut: &[u8] = &status[..2];
        let error = read_frame::<_, ClientRequest>(&mut cut).await.unwrap_err();
        assert!(matches!(error, WireError::TruncatedLength(2)), "{error}");
        let mut cut: &[u8] = &[0, 0, 0, 9, 1, 2];
        let error = read_frame::<_, ClientRequest>(&mut cut).await.unwrap_err();
        assert!(
            matches!(
                error,
                WireError::Truncated {
                    expected: 9,
                    received: 2
                }
            ),
            "{error}"
        );
        assert_eq!(
            error.to_string(),
            "the stream ended 2 bytes into a frame of 9 bytes"
        );
        let error = decode::<ClientRequest>(&body[..body.len() - 1]).unwrap_err();
        assert!(
            matches!(error, WireError::Malformed(DecodeError::Truncated)),
            "{error}"
        );

        // Bytes after the message, and a kind of request no version has.
        let mut longer = body.to_vec();
        longer.push(0);
        let error = decode::<ClientRequest>(&longer).unwrap_err();
        assert!(
            matches!(error, WireError::Malformed(DecodeError::TrailingBytes)),
            "{error}"
        );
        let error = decode::<ClientRequest>(&[200, 0, 0, 0]).unwrap_err();
        assert!(
            matches!(error, WireError::Malformed(DecodeError::UnknownVariant(_))),
            "{error}"
        );
        assert!(error.to_string().contains("200"), "{error}");

        // A request over the frame limit is refused as too large before it
        // is sent (the client gives it up at once instead of retrying).
        let huge = ClientRequest::Send {
            client_id: 1,
            first_seq: 1,
            lamport: 0,
            since: 0,
            texts: vec!["x".repeat(MAX_FRAME)],
            after: None,
        };
        match encode(&huge) {
            Err(WireError::TooLarge(size)) => assert!(size > MAX_FRAME, "{size}"),
            other => panic!("expected too large, got {other:?}"),
        }
    }
}
