//! The cluster's certificates: a CA made with rcgen signs one certificate
//! per node and per client. Who a peer is comes from its certificate: a
//! subject alternative name URI `cluster-store://node/<id>` or
//! `cluster-store://client/<name>`, never from anything it says.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use time::{Duration, OffsetDateTime};

use crate::raft::NodeId;

const NODE_URI: &str = "cluster-store://node/";
const CLIENT_URI: &str = "cluster-store://client/";

/// Who is at the other end of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    Node(NodeId),
    Client(String),
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::Node(id) => write!(f, "the certificate of node {id}"),
            Identity::Client(name) => write!(f, "the certificate of client {name:?}"),
        }
    }
}

/// Why a certificate, key or revocation list cannot be made, read or
/// used. Each message names the file and, where there is one, the next
/// step; causes are part of the message, never chained as a `source`.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file that cannot be read, written or moved.
    #[error("cannot {action} {path} ({})", os_reason(error))]
    Io {
        /// "read", "write", "create", "rename to", ...
        action: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    /// A credential file that does not exist, and how to make or find it.
    #[error("cannot read {path} ({}); {next}", os_reason(error))]
    Missing {
        path: PathBuf,
        error: std::io::Error,
        next: String,
    },
    #[error("{path} already exists; pass --force to replace the cluster CA (every certificate it signed stops working)")]
    Exists { path: PathBuf },
    #[error("certificate generation failed: {0}")]
    Rcgen(rcgen::Error),
    #[error("{path}: no PEM {what} found")]
    Empty { path: PathBuf, what: &'static str },
    #[error("the peer presented no certificate")]
    NoCertificate,
    #[error("the peer's certificate is not a valid X.509 certificate: {0}")]
    BadCertificate(String),
    #[error("the peer's certificate names no cluster-store node or client")]
    NoIdentity,
    #[error("invalid client name {0:?}: use letters, digits, '-' and '_'")]
    BadName(String),
    #[error("{path}: not a certificate revocation list: {reason}")]
    BadCrl { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    BadCertificateFile { path: PathBuf, reason: String },
    #[error("{path} was not signed by this cluster's CA")]
    ForeignCertificate { path: PathBuf },
    #[error("{path} is missing, but this node has loaded a revocation list before ({seen} records that): starting without one would trust every revoked certificate again. Copy ca.crl back from the CA machine (the --out directory of `node certs revoke`) to {path}. Only if no certificate of this cluster was ever revoked, delete {seen} instead")]
    CrlMissing { path: PathBuf, seen: PathBuf },
    #[error("{path} has disappeared; keeping the revocation list loaded before ({revoked} revoked), since no list would trust every revoked certificate again. Copy ca.crl back from the CA machine (the --out directory of `node certs revoke`); a node restarted without it refuses to start")]
    CrlVanished { path: PathBuf, revoked: usize },
}

/// When a certificate is valid.
#[derive(Clone, Copy, Debug)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From an hour ago (clocks differ a little) until `days` from now.
    pub fn days(days: u32) -> Validity {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(days.into()),
        }
    }
}

/// Certificates last ten years unless told otherwise.
pub const DEFAULT_DAYS: u32 = 3650;

impl From<rcgen::Error> for IdentityError {
    fn from(error: rcgen::Error) -> Self {
        IdentityError::Rcgen(error)
    }
}

impl IdentityError {
    /// A missing file (`Missing` with `next` as the next step), else
    /// `self` unchanged.
    pub fn if_missing(self, next: impl FnOnce(&Path) -> String) -> IdentityError {
        match self {
            IdentityError::Io {
                action: "read",
                path,
                error,
            } if error.kind() == std::io::ErrorKind::NotFound => IdentityError::Missing {
                next: next(&path),
                path,
                error,
            },
            other => other,
        }
    }
}

/// An I/O error in the OS's words, without the "(os error N)" they end
/// with: "No such file or directory".
pub fn os_reason(error: &std::io::Error) -> String {
    let text = error.to_string();
    match error.raw_os_error() {
        Some(code) => text
            .strip_suffix(&format!(" (os error {code})"))
            .unwrap_or(&text)
            .to_string(),
        None => text,
    }
}

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> IdentityError + 'a {
    move |error| IdentityError::Io {
        action,
        path: path.to_path_buf(),
        error,
    }
}

/// Reads a credential file.
fn read(path: &Path) -> Result<Vec<u8>, IdentityError> {
    fs::read(path).map_err(io_err("read", path))
}

/// The DNS name a node's certificate always carries and that peers check.
pub fn node_server_name(id: NodeId) -> String {
    format!("node-{id}")
}

pub fn node_cert_path(dir: &Path, id: NodeId) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("node-{id}.crt")),
        dir.join(format!("node-{id}.key")),
    )
}

pub fn client_cert_path(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("client-{name}.crt")),
        dir.join(format!("client-{name}.key")),
    )
}

pub fn ca_path(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("ca.crt"), dir.join("ca.key"))
}

/// The revocation list `node certs revoke` writes and nodes load.
pub fn crl_path(dir: &Path) -> PathBuf {
    dir.join("ca.crl")
}

/// Writes a private key readable by its owner only.
fn write_private(path: &Path, contents: &str) -> Result<(), IdentityError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err("write", path))?;
    file.write_all(contents.as_bytes())
        .map_err(io_err("write", path))
}

fn write_public(path: &Path, contents: &str) -> Result<(), IdentityError> {
    fs::write(path, contents).map_err(io_err("write", path))
}

/// Creates the cluster CA in `dir`.
pub fn init_ca(dir: &Path, force: bool) -> Result<(), IdentityError> {
    fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    let (cert_path, key_path) = ca_path(dir);
    if !force && (cert_path.exists() || key_path.exists()) {
        return Err(IdentityError::Exists { path: cert_path });
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "cluster-store CA");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let validity = Validity::days(20 * 365);
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    let cert = params.self_signed(&key)?;
    write_public(&cert_path, &cert.pem())?;
    write_private(&key_path, &key.serialize_pem())
}

struct Issuer {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// The cluster CA in `dir`, to sign with: `ca.crt` and `ca.key`, which
/// only the CA machine holds.
fn load_issuer(dir: &Path) -> Result<Issuer, IdentityError> {
    let (cert_path, key_path) = ca_path(dir);
    let cert_pem = read_text(&cert_path).map_err(|error| {
        error.if_missing(|_| {
            format!(
                "make the cluster's CA first with `node certs init --out {} --nodes <ids>` (see certs/README.md), or give --out the directory that holds ca.crt and ca.key",
                dir.display()
            )
        })
    })?;
    let key_pem = read_text(&key_path).map_err(|error| {
        error.if_missing(|_| {
            "signing needs the cluster CA's key, which stays on the CA machine: run this there, or give --out the directory that holds ca.crt and ca.key (see certs/README.md)".to_string()
        })
    })?;
    let key = KeyPair::from_pem(&key_pem)?;
    // Re-signing the CA's own parameters with its key reproduces an issuer
    // whose name and key match the certificate on disk.
    let cert = CertificateParams::from_ca_cert_pem(&cert_pem)?.self_signed(&key)?;
    Ok(Issuer { cert, key })
}

/// A new cluster's certificates in `dir`: its CA (an existing one is
/// replaced only if `force`), a certificate for each of `nodes` (valid for
/// the extra names `hosts` gives it), and one for each client name, with
/// `client` always first. Returns the client names, in that order.
pub fn init_cluster(
    dir: &Path,
    nodes: &[NodeId],
    hosts: &std::collections::BTreeMap<NodeId, Vec<String>>,
    clients: &[&str],
    force: bool,
    validity: Validity,
) -> Result<Vec<String>, IdentityError> {
    init_ca(dir, force)?;
    for id in nodes {
        issue_node(
            dir,
            *id,
            hosts.get(id).map_or(&[][..], |h| &h[..]),
            validity,
        )?;
    }
    let mut names = vec!["client".to_string()];
    names.extend(
        clients
            .iter()
            .map(|name| name.trim())
            .filter(|name| !name.is_empty() && *name != "client")
            .map(str::to_string),
    );
    for name in &names {
        issue_client(dir, name, validity)?;
    }
    Ok(names)
}

/// The certificate `who` names: a node id, `client:NAME`, or a file's path.
pub fn certificate_named(dir: &Path, who: &str) -> PathBuf {
    if let Some(name) = who.strip_prefix("client:") {
        client_cert_path(dir, name).0
    } else if let Ok(id) = who.parse::<NodeId>() {
        node_cert_path(dir, id).0
    } else {
        PathBuf::from(who)
    }
}

/// Signs a certificate for node `id`, valid for the given extra DNS names
/// and IP addresses, usable both to serve and to dial peers.
pub fn issue_node(
    dir: &Path,
    id: NodeId,
    hosts: &[String],
    validity: Validity,
) -> Result<(), IdentityError> {
    let issuer = load_issuer(dir)?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, node_server_name(id));
    params.distinguished_name = name;
    let mut sans = vec![
        SanType::URI(format!("{NODE_URI}{id}").try_into()?),
        SanType::DnsName(node_server_name(id).try_into()?),
    ];
    for host in hosts {
        match host.parse::<IpAddr>() {
            Ok(ip) => sans.push(SanType::IpAddress(ip)),
            Err(_) => sans.push(SanType::DnsName(host.clone().try_into()?)),
        }
    }
    params.subject_alt_names = sans;
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer.cert, &issuer.key)?;
    let (cert_path, key_path) = node_cert_path(dir, id);
    write_public(&cert_path, &cert.pem())?;
    write_private(&key_path, &key.serialize_pem())
}

/// Signs a client certificate: it can call the client API, never act as a node.
pub fn issue_client(dir: &Path, name: &str, validity: Validity) -> Result<(), IdentityError> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(IdentityError::BadName(name.to_string()));
    }
    let issuer = load_issuer(dir)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("client {name}"));
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(format!("{CLIENT_URI}{name}").try_into()?)];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer.cert, &issuer.key)?;
    let (cert_path, key_path) = client_cert_path(dir, name);
    write_public(&cert_path, &cert.pem())?;
    write_private(&key_path, &key.serialize_pem())
}

/// Reads a PEM file as text.
fn read_text(path: &Path) -> Result<String, IdentityError> {
    String::from_utf8(read(path)?).map_err(|_| IdentityError::BadCertificateFile {
        path: path.to_path_buf(),
        reason: "not a PEM file (not text)".into(),
    })
}

/// A PEM file's armour that does not hold what it says.
fn bad_pem(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |error| IdentityError::BadCertificateFile {
        path: path.to_path_buf(),
        reason: format!("not a valid PEM file: {error}"),
    }
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let pem = read(path)?;
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(bad_pem(path))?;
    if certs.is_empty() {
        return Err(IdentityError::Empty {
            path: path.to_path_buf(),
            what: "certificate",
        });
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, IdentityError> {
    let pem = read(path)?;
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(bad_pem(path))?
        .ok_or_else(|| IdentityError::Empty {
            path: path.to_path_buf(),
            what: "private key",
        })
}

/// Reads the identity a (CA-verified) certificate asserts.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<Identity, IdentityError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    let sans = parsed
        .subject_alternative_name()
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?
        .ok_or(IdentityError::NoIdentity)?;
    for name in &sans.value.general_names {
        if let x509_parser::extensions::GeneralName::URI(uri) = name {
            if let Some(id) = uri.strip_prefix(NODE_URI) {
                if let Ok(id) = id.parse() {
                    return Ok(Identity::Node(id));
                }
            }
            if let Some(client) = uri.strip_prefix(CLIENT_URI) {
                return Ok(Identity::Client(client.to_string()));
            }
        }
    }
    Err(IdentityError::NoIdentity)
}

/// The serial number of a certificate, as bytes.
pub fn serial_of(cert: &CertificateDer<'_>) -> Result<Vec<u8>, IdentityError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    Ok(parsed.tbs_certificate.raw_serial().to_vec())
}

/// Why a certificate file cannot be used today, if it cannot.
pub fn check_validity(path: &Path) -> Result<(), IdentityError> {
    let certs = load_certs(path)?;
    let (_, parsed) = x509_parser::parse_x509_certificate(certs[0].as_ref()).map_err(|e| {
        IdentityError::BadCertificateFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    })?;
    let validity = parsed.validity();
    let now = x509_parser::time::ASN1Time::now();
    let reason = if now < validity.not_before {
        format!("not valid before {}", validity.not_before)
    } else if now > validity.not_after {
        format!("expired on {}", validity.not_after)
    } else {
        return Ok(());
    };
    Err(IdentityError::BadCertificateFile {
        path: path.to_path_buf(),
        reason,
    })
}

/// Loads the revocation list at `path`; no file means nothing is revoked
/// (see `read_crls` for where that must not be assumed).
pub fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, IdentityError> {
    read_crls(path).map(Option::unwrap_or_default)
}

/// Reads the revocation list at `path`; `None` if there is no file.
pub fn read_crls(
    path: &Path,
) -> Result<Option<Vec<CertificateRevocationListDer<'static>>>, IdentityError> {
    let pem = match fs::read(path) {
        Ok(pem) => pem,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("read", path)(e)),
    };
    let crls = rustls_pemfile::crls(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IdentityError::BadCrl {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if crls.is_empty() {
        return Err(IdentityError::BadCrl {
            path: path.to_path_buf(),
            reason: "no PEM X509 CRL block".into(),
        });
    }
    for crl in &crls {
        x509_parser::parse_x509_crl(crl.as_ref()).map_err(|e| IdentityError::BadCrl {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    Ok(Some(crls))
}

/// The file in a node's data directory that records that the node has
/// loaded a revocation list.
pub fn crl_seen_path(data: &Path) -> PathBuf {
    data.join("crl-seen")
}

/// Fails closed on a revocation list that disappeared. Once a node has
/// loaded one, its data directory `data` records that, and from then on
/// the node refuses to start without the list at `crl`: starting with none
/// would trust every certificate it revoked again. `loaded`: whether the
/// node has the list now (then this records it).
pub fn guard_crl(data: &Path, crl: &Path, loaded: bool) -> Result<(), IdentityError> {
    let seen = crl_seen_path(data);
    if loaded {
        return record_crl_seen(data);
    }
    if seen.exists() {
        return Err(IdentityError::CrlMissing {
            path: crl.to_path_buf(),
            seen,
        });
    }
    Ok(())
}

/// Records in `data` that this node has loaded a revocation list (synced,
/// with its name in the directory); nothing to do if it already has.
pub fn record_crl_seen(data: &Path) -> Result<(), IdentityError> {
    let seen = crl_seen_path(data);
    if seen.exists() {
        return Ok(());
    }
    fs::create_dir_all(data).map_err(io_err("create", data))?;
    let mut file = fs::File::create(&seen).map_err(io_err("write", &seen))?;
    file.write_all(
        b"This node has loaded the cluster's revocation list (ca.crl) and refuses to start without it.\n",
    )
    .and_then(|_| file.sync_all())
    .map_err(io_err("write", &seen))?;
    fs::File::open(data)
        .and_then(|dir| dir.sync_all())
        .map_err(io_err("sync", data))
}

/// The serial numbers a revocation list names.
pub fn revoked_serials(
    crls: &[CertificateRevocationListDer<'_>],
) -> std::collections::HashSet<Vec<u8>> {
    let mut serials = std::collections::HashSet::new();
    for crl in crls {
        if let Ok((_, parsed)) = x509_parser::parse_x509_crl(crl.as_ref()) {
            for revoked in parsed.iter_revoked_certificates() {
                serials.insert(revoked.raw_serial().to_vec());
            }
        }
    }
    serials
}

/// Adds the certificate at `cert_path` to the cluster's revocation list
/// (`ca.crl` in `dir`), re-signed by the CA. Nodes reload the list within
/// seconds and refuse that certificate from then on. Returns the serial.
pub fn revoke(dir: &Path, cert_path: &Path) -> Result<Vec<u8>, IdentityError> {
    let issuer = load_issuer(dir)?;
    let cert = load_certs(cert_path)?.remove(0);
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| {
        IdentityError::BadCertificateFile {
            path: cert_path.to_path_buf(),
            reason: e.to_string(),
        }
    })?;
    let (ca_path, _) = ca_path(dir);
    let ca = load_certs(&ca_path)?.remove(0);
    let (_, ca_parsed) = x509_parser::parse_x509_certificate(ca.as_ref())
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    if parsed
        .verify_signature(Some(ca_parsed.public_key()))
        .is_err()
    {
        return Err(IdentityError::ForeignCertificate {
            path: cert_path.to_path_buf(),
        });
    }
    let serial = parsed.tbs_certificate.raw_serial().to_vec();
    let path = crl_path(dir);
    let existing = load_crls(&path)?;
    let mut number = 1u64;
    let mut revoked = Vec::new();
    let now = OffsetDateTime::now_utc();
    for crl in &existing {
        let (_, parsed) =
            x509_parser::parse_x509_crl(crl.as_ref()).map_err(|e| IdentityError::BadCrl {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if let Some(n) = parsed.crl_number() {
            number = number.max(n.to_u64_digits().first().copied().unwrap_or(0) + 1);
        }
        for entry in parsed.iter_revoked_certificates() {
            let when = OffsetDateTime::from_unix_timestamp(entry.revocation_date.timestamp())
                .unwrap_or(now);
            revoked.push(rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(entry.raw_serial()),
                revocation_time: when,
                reason_code: None,
                invalidity_date: None,
            });
        }
    }
    if !revoked
        .iter()
        .any(|r| r.serial_number.as_ref() == serial.as_slice())
    {
        revoked.push(rcgen::RevokedCertParams {
            serial_number: rcgen::SerialNumber::from_slice(&serial),
            revocation_time: now,
            reason_code: Some(rcgen::RevocationReason::Unspecified),
            invalidity_date: None,
        });
    }
    let params = rcgen::CertificateRevocationListParams {
        this_update: now - Duration::minutes(5),
        next_update: now + Duration::days(20 * 365),
        crl_number: rcgen::SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs: revoked,
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&issuer.cert, &issuer.key)?;
    // Write then rename, so a node never reads half a list.
    let partial = dir.join("ca.crl.partial");
    write_public(&partial, &crl.pem()?)?;
    fs::rename(&partial, &path).map_err(io_err("replace", &path))?;
    Ok(serial)
}

/// A stable id for the cluster: a digest of its CA certificate. A data
/// directory records it, so a node never joins another cluster's data.
pub fn cluster_id(ca_cert: &CertificateDer<'_>) -> String {
    // FNV-1a over the DER: stable across builds and platforms.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in ca_cert.as_ref() {
        hash ^= *byte as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_carry_their_identity() {
        let dir = std::env::temp_dir().join(format!("cs-identity-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        init_ca(&dir, false).unwrap();
        assert!(matches!(
            init_ca(&dir, false),
            Err(IdentityError::Exists { .. })
        ));
        let days = Validity::days(1);
        issue_node(
            &dir,
            3,
            &["127.0.0.3".into(), "vm3.example.org".into()],
            days,
        )
        .unwrap();
        issue_client(&dir, "alice", days).unwrap();
        let node = load_certs(&node_cert_path(&dir, 3).0).unwrap();
        assert_eq!(identity_of(&node[0]).unwrap(), Identity::Node(3));
        let client = load_certs(&client_cert_path(&dir, "alice").0).unwrap();
        assert_eq!(
            identity_of(&client[0]).unwrap(),
            Identity::Client("alice".into())
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(node_cert_path(&dir, 3).1)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(
            issue_client(&dir, "../evil", days),
            Err(IdentityError::BadName(_))
        ));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_revocation_list_once_loaded_is_required_to_start() {
        let dir = std::env::temp_dir().join(format!("cs-identity-crl-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        init_ca(&dir, false).unwrap();
        issue_client(&dir, "mallory", Validity::days(1)).unwrap();
        let data = dir.join("data");
        let crl = crl_path(&dir);
        // No list, none ever loaded: nothing is revoked.
        assert_eq!(read_crls(&crl).unwrap(), None);
        guard_crl(&data, &crl, false).unwrap();
        assert!(!crl_seen_path(&data).exists());
        revoke(&dir, &client_cert_path(&dir, "mallory").0).unwrap();
        assert_eq!(read_crls(&crl).unwrap().map(|crls| crls.len()), Some(1));
        guard_crl(&data, &crl, true).unwrap();
        assert!(crl_seen_path(&data).exists());
        guard_crl(&data, &crl, true).unwrap();
        // The list deleted: refused, saying what to do.
        fs::remove_file(&crl).unwrap();
        let error = guard_crl(&data, &crl, false).expect_err("started without the list");
        assert!(matches!(error, IdentityError::CrlMissing { .. }));
        let message = error.to_string();
        assert!(
            message.contains("ca.crl is missing") && message.contains("Copy ca.crl back"),
            "{message}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
