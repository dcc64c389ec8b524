//! Clients over TLS over TCP, on the node's QUIC port number: the same
//! requests and answers as on a QUIC stream, one stream per TCP
//! connection. For many small writers this costs both ends less than QUIC
//! (the kernel acknowledges and retransmits; a request is one read, an
//! answer one write), see BENCHMARKS.md. Peer links stay on QUIC.
//!
//! The same certificates, trust and revocation list as the QUIC side: a
//! caller is whoever its certificate says (`transport::Caller`), and a
//! revoked certificate's live connections are closed.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::api::Api;
use super::transport::{until_revoked, Caller, Peers, MAX_HANDSHAKES};
use crate::tls::{chain_identity, chain_serial};
use crate::wire::{read_frame, write_frame, ClientRequest, ClientResponse};

/// Longest a caller may take to connect and complete its TLS handshake,
/// including the wait for one of `MAX_HANDSHAKES` places.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The server TLS configuration in force; replaced when the revocation
/// list changes.
pub type TlsConfig = watch::Receiver<Arc<rustls::ServerConfig>>;

/// Accepts client connections on `listener` until the node stops.
pub async fn accept_loop(listener: TcpListener, tls: TlsConfig, peers: Peers, api: Api) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let (socket, remote) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors, say: the backlog waits.
                warn!("cannot accept a client connection: {error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Requests and answers are small: no waiting to fill a segment.
        let _ = socket.set_nodelay(true);
        let acceptor = TlsAcceptor::from(tls.borrow().clone());
        let handshakes = handshakes.clone();
        let peers = peers.clone();
        let api = api.clone();
        tokio::spawn(async move {
            let handshake = async {
                let _permit = handshakes.acquire_owned().await.ok()?;
                Some(acceptor.accept(socket).await)
            };
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                Ok(Some(Ok(stream))) => stream,
                Ok(Some(Err(error))) => {
                    warn!(%remote, "refused a client connection: {error}");
                    return;
                }
                Ok(None) => return,
                Err(_) => {
                    debug!(%remote, "a client connection did not complete its handshake in {HANDSHAKE_TIMEOUT:?}");
                    return;
                }
            };
            serve(stream, remote, peers, api).await;
        });
    }
}

/// Serves one TLS connection: its requests in order, until the client
/// closes it or its certificate is revoked.
async fn serve(
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    remote: std::net::SocketAddr,
    peers: Peers,
    api: Api,
) {
    let certs = stream.get_ref().1.peer_certificates();
    let identity = match chain_identity(certs) {
        Ok(identity) => identity,
        Err(error) => {
            warn!(%remote, "refused a client connection: {error}");
            return;
        }
    };
    let Some(serial) = chain_serial(certs) else {
        warn!(%remote, "refused a client connection: its certificate has no serial number");
        return;
    };
    let caller = Caller::of(identity, &peers);
    let (recv, send) = tokio::io::split(stream);
    let served = async {
        match caller {
            Caller::Client(name) => {
                let Some(_slot) = api.client_slot() else {
                    busy(send, recv).await;
                    return;
                };
                api.serve_stream(name, send, recv).await
            }
            Caller::Node(name) => api.serve_stream(name, send, recv).await,
        }
    };
    tokio::select! {
        () = served => {}
        () = until_revoked(&serial, peers.revoked.clone()) => {
            warn!(%remote, "closing a client connection: its certificate was revoked");
        }
    }
}

/// Tells a client over `--max-clients` to retry later. Its first request
/// is read before the connection closes, so the answer is not lost to a
/// reset for unread data.
async fn busy<W: super::api::Writer, R: super::api::Reader>(mut send: W, mut recv: R) {
    let answer = ClientResponse::Busy {
        message: "busy: too many client connections, retry later".into(),
    };
    if write_frame(&mut send, &answer).await.is_ok() {
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            read_frame::<_, ClientRequest>(&mut recv),
        )
        .await;
    }
}
