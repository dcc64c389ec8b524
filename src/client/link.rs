//! How a client reaches one node: a QUIC connection with a stream per
//! request in flight, or TLS over TCP with a connection per stream (the
//! node listens for both on one port number; `server::tcp`). Requests and
//! answers are the same frames either way.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::identity::{node_server_name, Identity, IdentityError};
use crate::raft::NodeId;
use crate::tls::chain_identity;
use crate::wire::CLOSE_BUSY;

use super::error::{ClientError, DialError};

/// The transport a client speaks to nodes with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Transport {
    /// TLS 1.3 over TCP, a connection per stream: the least CPU per
    /// request for many small writers (BENCHMARKS.md).
    #[default]
    Tcp,
    /// QUIC, as peers speak: one connection per node, a stream per
    /// request in flight, one UDP socket for every node (and, with
    /// `Client::on_endpoint`, for many clients).
    Quic,
}

impl std::str::FromStr for Transport {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "tcp" => Ok(Transport::Tcp),
            "quic" => Ok(Transport::Quic),
            other => Err(format!("unknown transport {other:?}: expected tcp or quic")),
        }
    }
}

/// A verified way to one node: a QUIC connection, or the address and TLS
/// settings to open TCP connections with (each one verified anew).
#[derive(Clone)]
pub(super) enum Link {
    Quic(NodeId, quinn::Connection),
    Tcp(TcpLink),
}

#[derive(Clone)]
pub(super) struct TcpLink {
    node: NodeId,
    address: SocketAddr,
    tls: tokio_rustls::TlsConnector,
    /// Tells streams of this link from those of an earlier one.
    id: usize,
}

/// Numbers TCP links; QUIC links use `Connection::stable_id`, which are
/// addresses, so these count down from the top to stay apart.
static NEXT_TCP_LINK: AtomicUsize = AtomicUsize::new(usize::MAX);

impl Link {
    pub(super) fn id(&self) -> usize {
        match self {
            Link::Quic(_, connection) => connection.stable_id(),
            Link::Tcp(link) => link.id,
        }
    }

    /// False once the link is known to be broken (a TCP link only learns
    /// that from a stream).
    pub(super) fn is_open(&self) -> bool {
        match self {
            Link::Quic(_, connection) => connection.close_reason().is_none(),
            Link::Tcp(_) => true,
        }
    }

    /// Why the node closed this link, if it said it was too busy.
    pub(super) fn busy(&self) -> Option<String> {
        match self {
            Link::Quic(_, connection) => match connection.close_reason() {
                Some(quinn::ConnectionError::ApplicationClosed(close))
                    if close.error_code == CLOSE_BUSY.into() =>
                {
                    Some(String::from_utf8_lossy(&close.reason).into_owned())
                }
                _ => None,
            },
            Link::Tcp(_) => None,
        }
    }

    /// A new stream to the node.
    pub(super) async fn open(&self) -> Result<(Send, Recv), ClientError> {
        match self {
            Link::Quic(node, connection) => {
                let (send, recv) = connection.open_bi().await.map_err(super::link(*node))?;
                Ok((Send::Quic(send), Recv::Quic(recv)))
            }
            Link::Tcp(link) => {
                let stream = link.connect().await?;
                let (recv, send) = tokio::io::split(stream);
                Ok((Send::Tcp(send), Recv::Tcp(recv)))
            }
        }
    }
}

impl TcpLink {
    /// A link to `node` at `address`; `connect` proves who answers.
    pub(super) fn new(
        node: NodeId,
        address: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
    ) -> TcpLink {
        TcpLink {
            node,
            address,
            tls: tls.into(),
            id: NEXT_TCP_LINK.fetch_sub(1, Ordering::Relaxed),
        }
    }

    /// One TCP connection with a completed handshake, from the node its
    /// certificate says it is (the TLS settings check the name, this the
    /// identity in it, as for QUIC).
    pub(super) async fn connect(&self) -> Result<Box<TlsStream<TcpStream>>, ClientError> {
        let (node, address) = (self.node, self.address);
        let connect = |reason: String| DialError::Connect {
            node,
            address,
            reason,
        };
        let socket = TcpStream::connect(address)
            .await
            .map_err(|error| connect(crate::identity::os_reason(&error)))?;
        let _ = socket.set_nodelay(true);
        let name = rustls::pki_types::ServerName::try_from(node_server_name(node))
            .map_err(|error| connect(error.to_string()))?;
        let stream = self
            .tls
            .connect(name, socket)
            .await
            .map_err(|error| connect(error.to_string()))?;
        is_node(
            node,
            address,
            chain_identity(stream.get_ref().1.peer_certificates()),
        )?;
        Ok(Box::new(stream))
    }
}

/// Whether the certificate that answered at `address` is node `node`'s,
/// whichever transport presented it.
pub(super) fn is_node(
    node: NodeId,
    address: SocketAddr,
    identity: Result<Identity, IdentityError>,
) -> Result<(), ClientError> {
    match identity {
        Ok(Identity::Node(id)) if id == node => Ok(()),
        Ok(presented) => Err(DialError::Impostor {
            node,
            address,
            presented,
        }
        .into()),
        Err(error) => Err(DialError::Identity {
            node,
            address,
            error,
        }
        .into()),
    }
}

/// The half of a stream a client writes requests to.
pub enum Send {
    Quic(quinn::SendStream),
    Tcp(WriteHalf<Box<TlsStream<TcpStream>>>),
}

/// The half of a stream a client reads answers from.
pub enum Recv {
    Quic(quinn::RecvStream),
    Tcp(ReadHalf<Box<TlsStream<TcpStream>>>),
}

impl AsyncWrite for Send {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Send::Quic(send) => Pin::new(send).poll_write(cx, buf).map_err(Into::into),
            Send::Tcp(send) => Pin::new(send).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Send::Quic(send) => Pin::new(send).poll_flush(cx),
            Send::Tcp(send) => Pin::new(send).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Send::Quic(send) => Pin::new(send).poll_shutdown(cx),
            Send::Tcp(send) => Pin::new(send).poll_shutdown(cx),
        }
    }
}

impl AsyncRead for Recv {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Recv::Quic(recv) => Pin::new(recv).poll_read(cx, buf),
            Recv::Tcp(recv) => Pin::new(recv).poll_read(cx, buf),
        }
    }
}
