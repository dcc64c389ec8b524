//! rustls and quinn configuration: TLS 1.3 only, ring provider, and every
//! connection authenticated both ways by the cluster CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::RootCertStore;

use crate::identity::{self, IdentityError};
use crate::raft::NodeId;
use crate::wire::{ALPN, PEER_ALPN};

/// Why credentials cannot be loaded or a TLS configuration made. The
/// cause is part of each message (none is chained as a `source`).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("TLS configuration: {0}")]
    Rustls(rustls::Error),
    #[error("certificate verifier: {0}")]
    Verifier(rustls::server::VerifierBuilderError),
    #[error("QUIC crypto configuration: {0}")]
    Quic(String),
}

impl From<rustls::Error> for TlsError {
    fn from(error: rustls::Error) -> Self {
        TlsError::Rustls(error)
    }
}

impl From<rustls::server::VerifierBuilderError> for TlsError {
    fn from(error: rustls::server::VerifierBuilderError) -> Self {
        TlsError::Verifier(error)
    }
}

/// Whose credentials `Credentials::of` loads from a certificate
/// directory: which files, and how to make them when they are missing.
#[derive(Clone, Copy, Debug)]
pub enum Holder<'a> {
    /// Node `id`, of a cluster whose nodes (as far as it knows) are `nodes`.
    Node { id: NodeId, nodes: &'a [NodeId] },
    /// The client certificate `name`, for a cluster of `nodes`.
    Client { name: &'a str, nodes: &'a [NodeId] },
}

impl Holder<'_> {
    /// This holder's certificate and key in `dir`.
    fn paths(&self, dir: &Path) -> (PathBuf, PathBuf) {
        match *self {
            Holder::Node { id, .. } => identity::node_cert_path(dir, id),
            Holder::Client { name, .. } => identity::client_cert_path(dir, name),
        }
    }

    /// The next step when `missing`, one of the files in `dir`, is not there.
    fn next_step(&self, dir: &Path, missing: &Path) -> String {
        let (ca, _) = identity::ca_path(dir);
        let (cert, _) = self.paths(dir);
        let shown = dir.display();
        if missing == ca {
            let nodes = match *self {
                Holder::Node { nodes, .. } | Holder::Client { nodes, .. } => nodes,
            };
            let ids = if nodes.is_empty() {
                "<ids>".to_string()
            } else {
                let ids: Vec<String> = nodes.iter().map(NodeId::to_string).collect();
                ids.join(",")
            };
            return format!(
                "create the cluster's certificates with `node certs init --out {shown} --nodes {ids}` \
                 (see certs/README.md), or point --certs at the directory that holds them"
            );
        }
        if missing != cert {
            let name = cert
                .file_name()
                .map_or_else(String::new, |name| name.to_string_lossy().into_owned());
            return format!(
                "copy it from the machine that made {name}, into {shown} beside it (see certs/README.md)"
            );
        }
        match *self {
            Holder::Node { id, .. } => format!(
                "make it with `node certs add-node {id} --out {shown}` on the machine that holds the \
                 cluster's CA (see certs/README.md), and check that node {id} is in --peers (a new \
                 cluster) or was added with `node member add {id}`"
            ),
            Holder::Client { name, .. } => format!(
                "make it with `node certs add-client {name} --out {shown}` on the machine that holds \
                 the cluster's CA (see certs/README.md), or name another client certificate with --name"
            ),
        }
    }
}

/// The CA, this end's own certificate chain and key, and the CA's list of
/// revoked certificates (`ca.crl` beside the CA, if there is one).
pub struct Credentials {
    pub ca: CertificateDer<'static>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub crls: Vec<CertificateRevocationListDer<'static>>,
    pub crl_path: std::path::PathBuf,
}

impl Clone for Credentials {
    fn clone(&self) -> Self {
        Credentials {
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            crls: self.crls.clone(),
            crl_path: self.crl_path.clone(),
        }
    }
}

impl Credentials {
    /// The QUIC endpoint's settings: its connection ids and the stateless
    /// reset tokens that go with them come from keys that are the same in
    /// every process of this node (derived from its private key). A
    /// restarted node then recognises packets meant for its previous
    /// process's connections as its own and answers them with a reset its
    /// peers and clients accept, and they reconnect within a round trip of
    /// their next packet (a keep-alive goes every 500 ms) rather than after
    /// the 3 s idle timeout. With quinn's random keys per process such
    /// packets are dropped as foreign and no reset is sent.
    pub fn endpoint_config(&self) -> quinn::EndpointConfig {
        let derive = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, self.key.secret_der());
        let reset = ring::hmac::sign(&derive, b"cluster-store QUIC stateless reset key v1");
        let ids = ring::hmac::sign(&derive, b"cluster-store QUIC connection id key v1");
        let mut id_key = [0u8; 8];
        id_key.copy_from_slice(&ids.as_ref()[..8]);
        let id_key = u64::from_le_bytes(id_key);
        let mut config = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            reset.as_ref(),
        )));
        config.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(id_key))
        });
        config
    }

    /// Loads everything, refusing a certificate of ours that has expired
    /// or is not valid yet: better a clear error now than refused
    /// handshakes later.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let crl_path = identity::crl_path(ca.parent().unwrap_or(Path::new(".")));
        // The CA first: in a directory without it, it is the one to name.
        let ca_cert = identity::load_certs(ca)?.remove(0);
        identity::check_validity(cert)?;
        Ok(Credentials {
            ca: ca_cert,
            chain: identity::load_certs(cert)?,
            key: identity::load_key(key)?,
            crls: identity::load_crls(&crl_path)?,
            crl_path,
        })
    }

    /// `holder`'s credentials from the certificate directory `dir` (as
    /// `load`); a missing file is named with the way to make or find it.
    pub fn of(dir: &Path, holder: Holder<'_>) -> Result<Self, TlsError> {
        let (ca, _) = identity::ca_path(dir);
        let (cert, key) = holder.paths(dir);
        Self::load(&ca, &cert, &key).map_err(|error| match error {
            TlsError::Identity(error) => {
                TlsError::Identity(error.if_missing(|path| holder.next_step(dir, path)))
            }
            other => other,
        })
    }

    /// Re-reads the revocation list; `Ok(true)` if it changed. A list that
    /// disappears is not taken for "nothing is revoked" (that would trust
    /// every revoked certificate again): the previous one stays, and the
    /// error says so.
    pub fn reload_crls(&mut self) -> Result<bool, TlsError> {
        let Some(crls) = identity::read_crls(&self.crl_path)? else {
            if self.crls.is_empty() {
                return Ok(false);
            }
            return Err(IdentityError::CrlVanished {
                path: self.crl_path.clone(),
                revoked: identity::revoked_serials(&self.crls).len(),
            }
            .into());
        };
        if crls == self.crls {
            return Ok(false);
        }
        self.crls = crls;
        Ok(true)
    }

    fn roots(&self) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.clone())?;
        Ok(roots)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Bytes a peer may send on one stream before we grant more.
const STREAM_WINDOW: u32 = 32 << 20;

/// Bytes a client may send before its first acknowledgement (QUIC's
/// default is about 14 KB). Slow start from 14 KB across a 140 ms round
/// trip took ~2.5 s to open the window a pipelined client needs (~30 MB),
/// half of a 5 s burst. A client's path is anyone's: on one that cannot
/// take a 1 MB first flight, the loss shrinks the window as usual.
const CLIENT_INITIAL_WINDOW: u64 = 1 << 20;

/// The same for a node's connections: its peer links, and what it sends
/// back on the connections it accepts. A peer link sits idle but for
/// heartbeats until the first burst, and an idle window never grows, so
/// every fresh link began its first burst in slow start: from 1 MB the
/// window to Sydney (310 ms round trip) passed 32 MB only 2.2 s in, the
/// leader had committed 56,000 entries after a second where it now
/// commits 320,000-415,000, and Sydney ended 1.1 million entries behind
/// (now ~450,000), every one of them then read back from the leader's
/// store. quinn paces what
/// it sends over the measured round trip, so a large first flight leaves
/// at the window's rate, not at once; loss shrinks it as usual. A node
/// answering a client starts with the same window (quinn picks the
/// configuration before it knows which protocol a connection speaks),
/// bounded per stream by `CLIENT_STREAM_WINDOW`.
const NODE_INITIAL_WINDOW: u64 = 16 << 20;

/// Packets the other end may take before it must acknowledge them.
const ACK_ELICITING_THRESHOLD: u32 = 10;

/// Bytes a node may send a client on one stream before the client reads
/// them: two of the largest watch pages (4 MB). A client that prints an
/// export more slowly than the node reads it from disk holds this much,
/// not 32 MB (`node export` of 2 million messages peaked at 54 MB with
/// the peers' window, the target being 50).
const CLIENT_STREAM_WINDOW: u32 = 8 << 20;

fn client_transport() -> Arc<quinn::TransportConfig> {
    transport_with(CLIENT_STREAM_WINDOW, CLIENT_INITIAL_WINDOW)
}

fn transport() -> Arc<quinn::TransportConfig> {
    transport_with(STREAM_WINDOW, NODE_INITIAL_WINDOW)
}

/// `stream_window`: bytes the other end may send on one stream before we
/// read them; `initial_window`: bytes we send before the first
/// acknowledgement.
fn transport_with(stream_window: u32, initial_window: u64) -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    // A crashed peer is noticed within a few seconds even when nothing is
    // sent; links reconnect as soon as it is back.
    transport.keep_alive_interval(Some(Duration::from_millis(500)));
    if let Ok(timeout) = Duration::from_secs(3).try_into() {
        transport.max_idle_timeout(Some(timeout));
    }
    // quinn's default stream window (1.25 MB) caps one stream at 1.25 MB
    // per round trip: 4 MB/s to a peer 310 ms away, less than a pipelined
    // client writes. The Raft stream then backs up, heartbeats queue behind
    // appends, and followers start elections under steady load. Flow
    // control should never be the limit between nodes; Raft's own window
    // (256 appends or 32 MB in flight, `Config::max_inflight`) is.
    transport.stream_receive_window(stream_window.into());
    transport.send_window(4 * u64::from(STREAM_WINDOW));
    let mut cubic = quinn::congestion::CubicConfig::default();
    cubic.initial_window(initial_window);
    transport.congestion_controller_factory(Arc::new(cubic));
    // Ask the other end to acknowledge every 11th packet rather than
    // every 2nd (within its max_ack_delay, and at once when packets come
    // out of order): pure acknowledgements are packets to send, receive
    // and wake up for, and most of ours ride on answers anyway. A/B on
    // loopback, alternating: 64 clients +2-6% (28,196-29,258 vs
    // 27,516-27,579/s), pipelined +1-3%, on the WAN too; 1 client equal.
    let mut acks = quinn::AckFrequencyConfig::default();
    acks.ack_eliciting_threshold(ACK_ELICITING_THRESHOLD.into());
    transport.ack_frequency_config(Some(acks));
    transport.max_concurrent_bidi_streams(1024u32.into());
    transport.max_concurrent_uni_streams(64u32.into());
    Arc::new(transport)
}

/// Accepts connections only from holders of a certificate signed by the CA.
pub fn server_config(creds: &Credentials) -> Result<quinn::ServerConfig, TlsError> {
    let mut tls = rustls_server(creds)?;
    tls.alpn_protocols = vec![PEER_ALPN.to_vec(), ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport());
    Ok(config)
}

/// The node's TLS-over-TCP listener for clients: the same certificates,
/// trust and revocation list as its QUIC side, the client protocol only.
pub fn tcp_server_config(creds: &Credentials) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut tls = rustls_server(creds)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(tls))
}

/// TLS 1.3 that requires a certificate of the CA from the other end.
fn rustls_server(creds: &Credentials) -> Result<rustls::ServerConfig, TlsError> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(creds.roots()?),
        provider(),
    )
    .with_crls(creds.crls.clone())
    .only_check_end_entity_revocation()
    .allow_unknown_revocation_status()
    .build()?;
    Ok(rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(creds.chain.clone(), creds.key.clone_key())?)
}

/// Dials nodes as a client, presenting our certificate and trusting only
/// the CA.
pub fn client_config(creds: &Credentials) -> Result<quinn::ClientConfig, TlsError> {
    dial_config(creds, ALPN, client_transport())
}

/// Dials a peer for its Raft link (or a knock).
pub fn peer_client_config(creds: &Credentials) -> Result<quinn::ClientConfig, TlsError> {
    dial_config(creds, PEER_ALPN, transport())
}

fn dial_config(
    creds: &Credentials,
    alpn: &[u8],
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ClientConfig, TlsError> {
    let tls = rustls_client(creds, alpn)?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport);
    Ok(config)
}

/// Dials nodes as a client over TLS over TCP (`client::Transport::Tcp`).
pub fn tcp_client_config(creds: &Credentials) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    Ok(Arc::new(rustls_client(creds, ALPN)?))
}

/// TLS 1.3 presenting our certificate and trusting only the CA.
fn rustls_client(creds: &Credentials, alpn: &[u8]) -> Result<rustls::ClientConfig, TlsError> {
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(creds.roots()?),
        provider(),
    )
    .with_crls(creds.crls.clone())
    .only_check_end_entity_revocation()
    .allow_unknown_revocation_status()
    .build()?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(creds.chain.clone(), creds.key.clone_key())?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(tls)
}

/// The verified identity of the other end of a connection.
pub fn peer_identity(connection: &quinn::Connection) -> Result<identity::Identity, IdentityError> {
    let certs = connection
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok());
    chain_identity(certs.as_deref().map(Vec::as_slice))
}

/// The identity in the leaf of a verified certificate chain (a TLS
/// session's `peer_certificates`).
pub fn chain_identity(
    certs: Option<&[CertificateDer<'_>]>,
) -> Result<identity::Identity, IdentityError> {
    let leaf = certs
        .and_then(|certs| certs.first())
        .ok_or(IdentityError::NoCertificate)?;
    identity::identity_of(leaf)
}

/// The serial number of the leaf of a certificate chain.
pub fn chain_serial(certs: Option<&[CertificateDer<'_>]>) -> Option<Vec<u8>> {
    identity::serial_of(certs?.first()?).ok()
}

/// The application protocol the other end chose in the handshake.
pub fn protocol(connection: &quinn::Connection) -> Option<Vec<u8>> {
    connection
        .handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

/// The serial number of the certificate the other end presented.
pub fn peer_serial(connection: &quinn::Connection) -> Option<Vec<u8>> {
    let certs = connection
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())?;
    chain_serial(Some(&certs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_is_named_once_with_the_command_that_makes_it() {
        let dir = std::env::temp_dir().join(format!("cs-tls-missing-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let node = Holder::Node {
            id: 2,
            nodes: &[1, 2, 3],
        };
        let error = Credentials::of(&dir, node)
            .err()
            .expect("loaded from nothing");
        let message = error.to_string();
        assert!(
            message.starts_with(&format!("cannot read {}", dir.join("ca.crt").display()))
                && message.contains(&format!(
                    "`node certs init --out {} --nodes 1,2,3`",
                    dir.display()
                )),
            "{message}"
        );
        // The cause is in the message, so it is not chained again.
        assert!(std::error::Error::source(&error).is_none(), "{message}");
        assert_eq!(
            message.matches("No such file or directory").count(),
            1,
            "{message}"
        );

        identity::init_ca(&dir, false).unwrap();
        let message = Credentials::of(&dir, node)
            .err()
            .expect("no node certificate")
            .to_string();
        assert!(
            message.contains("node-2.crt")
                && message.contains(&format!("`node certs add-node 2 --out {}`", dir.display())),
            "{message}"
        );
        identity::issue_node(&dir, 2, &[], identity::Validity::days(1)).unwrap();
        Credentials::of(&dir, node).expect("loaded");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_revocation_list_that_disappears_is_kept() {
        let dir = std::env::temp_dir().join(format!("cs-tls-crl-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        identity::init_ca(&dir, false).unwrap();
        let days = identity::Validity::days(1);
        identity::issue_node(&dir, 1, &[], days).unwrap();
        identity::issue_client(&dir, "mallory", days).unwrap();
        let (ca, _) = identity::ca_path(&dir);
        let (cert, key) = identity::node_cert_path(&dir, 1);
        // No list yet, and none appearing: nothing changes.
        let mut creds = Credentials::load(&ca, &cert, &key).unwrap();
        assert!(creds.crls.is_empty());
        assert!(!creds.reload_crls().unwrap());
        identity::revoke(&dir, &identity::client_cert_path(&dir, "mallory").0).unwrap();
        assert!(creds.reload_crls().unwrap(), "a new list is loaded");
        let loaded = creds.crls.clone();
        assert_eq!(identity::revoked_serials(&loaded).len(), 1);
        // Deleted: kept, and said so, at every reload.
        let list = std::fs::read(&creds.crl_path).unwrap();
        std::fs::remove_file(&creds.crl_path).unwrap();
        for _ in 0..2 {
            let error = creds
                .reload_crls()
                .expect_err("a deleted list was taken for an empty one")
                .to_string();
            assert!(
                error.contains("ca.crl has disappeared") && error.contains("1 revoked"),
                "{error}"
            );
            assert_eq!(creds.crls, loaded);
        }
        // Back: the same list, nothing to change.
        std::fs::write(&creds.crl_path, list).unwrap();
        assert!(!creds.reload_crls().unwrap());
        assert_eq!(creds.crls, loaded);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A node's connections, peer links and the ones it accepts, begin
    /// with a window a burst across an ocean can use at once (a fresh
    /// link's first burst spent seconds in slow start, BENCHMARKS.md); a
    /// client begins with a small first flight into a path nobody has
    /// measured.
    #[tokio::test]
    async fn node_connections_start_with_a_large_congestion_window_and_clients_with_a_small_one() {
        let dir = std::env::temp_dir().join(format!("cs-tls-window-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        identity::init_ca(&dir, false).unwrap();
        let days = identity::Validity::days(1);
        identity::issue_node(&dir, 1, &[], days).unwrap();
        identity::issue_node(&dir, 2, &[], days).unwrap();
        identity::issue_client(&dir, "alice", days).unwrap();
        let (ca, _) = identity::ca_path(&dir);
        let node = |id| {
            let (cert, key) = identity::node_cert_path(&dir, id);
            Credentials::load(&ca, &cert, &key).unwrap()
        };
        let (cert, key) = identity::client_cert_path(&dir, "alice");
        let alice = Credentials::load(&ca, &cert, &key).unwrap();
        let server = quinn::Endpoint::server(
            server_config(&node(2)).unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let to = server.local_addr().unwrap();
        let dial = |config: quinn::ClientConfig| {
            let server = server.clone();
            async move {
                let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
                endpoint.set_default_client_config(config);
                let dialed = endpoint
                    .connect(to, &identity::node_server_name(2))
                    .unwrap();
                let accepted = async { server.accept().await.unwrap().await.unwrap() };
                let (dialed, accepted) = tokio::join!(dialed, accepted);
                (endpoint, dialed.unwrap(), accepted)
            }
        };
        let window = |connection: &quinn::Connection| connection.congestion_state().window();

        let (_peer_endpoint, peer, node_side) = dial(peer_client_config(&node(1)).unwrap()).await;
        assert!(window(&peer) >= NODE_INITIAL_WINDOW, "{}", window(&peer));
        assert!(
            window(&node_side) >= NODE_INITIAL_WINDOW,
            "{}",
            window(&node_side)
        );

        let (_client_endpoint, client, node_side) = dial(client_config(&alice).unwrap()).await;
        let client_window = window(&client);
        assert!(
            (CLIENT_INITIAL_WINDOW..2 * CLIENT_INITIAL_WINDOW).contains(&client_window),
            "{client_window}"
        );
        assert!(
            window(&node_side) >= NODE_INITIAL_WINDOW,
            "{}",
            window(&node_side)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
