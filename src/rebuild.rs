//! `node rebuild`: a stopped node's replica made again after its store
//! was lost or found damaged. The damaged directory is kept aside (nothing
//! is deleted); the fresh replica starts at the highest term the other
//! members report, with its vote in that term spent, and with their most
//! up-to-date log as its catch-up floor (`RebuildPlan`), so it can never
//! vote twice in one term nor for a log missing entries it had
//! acknowledged. Started again, the node copies the log from the leader.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::client::{Client, ClientError};
use crate::identity::{self, IdentityError};
use crate::raft::{LogPosition, NodeId, RebuildPlan};
use crate::storage::{is_lock_conflict, Store, StoreError, StoredBootstrap};

/// Why a rebuild stopped (before it moved anything, except for `MoveAside`
/// and the store's own errors after it). Causes are part of each message,
/// never chained as a `source` too.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    /// The cluster's CA (its id names the cluster in the data directory).
    #[error("{0}")]
    Identity(IdentityError),
    #[error("the store in {} opens cleanly: rebuild only a lost or damaged one (--force to rebuild anyway)", data.display())]
    Clean { data: PathBuf },
    #[error("{} is in use: stop node {id} first ({reason})", data.display())]
    InUse {
        data: PathBuf,
        id: NodeId,
        reason: String,
    },
    #[error("{} belongs to another node or cluster; check --id and --data", data.display())]
    Foreign { data: PathBuf },
    /// The client to ask the other members could not be made.
    #[error("{0}")]
    Client(ClientError),
    #[error("node {node} is itself a rebuilt replica still catching up (its log is below {floor}). Rebuild one node at a time: retry once `node status` no longer shows it catching up, or pass --force")]
    CatchingUp { node: NodeId, floor: LogPosition },
    #[error("node {node} did not answer ({reason}). Every other node must answer, so that the rebuilt node starts past any term it may have voted in and never votes for a log missing entries it had acknowledged; retry when they are up, or pass --force")]
    Unanswered { node: NodeId, reason: String },
    #[error("cannot move {} to {} ({})", from.display(), to.display(), identity::os_reason(error))]
    MoveAside {
        from: PathBuf,
        to: PathBuf,
        error: std::io::Error,
    },
    #[error("{0}")]
    Store(StoreError),
}

// By hand rather than `#[from]`, which would chain each as a `source`
// that the message already says.
impl From<IdentityError> for RebuildError {
    fn from(error: IdentityError) -> Self {
        RebuildError::Identity(error)
    }
}

impl From<ClientError> for RebuildError {
    fn from(error: ClientError) -> Self {
        RebuildError::Client(error)
    }
}

impl From<StoreError> for RebuildError {
    fn from(error: StoreError) -> Self {
        RebuildError::Store(error)
    }
}

type Result<T, E = RebuildError> = std::result::Result<T, E>;

/// How long each other member has to tell its status.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// What to rebuild.
#[derive(Clone, Debug)]
pub struct RebuildOptions {
    /// The node whose replica is rebuilt.
    pub id: NodeId,
    /// Its data directory.
    pub data: PathBuf,
    /// The certificate directory holding the cluster's CA.
    pub certs: PathBuf,
    /// Rebuild even if the store opens cleanly or another member does not
    /// answer (the rebuilt node might then vote again in a term it voted
    /// in, or for a log missing entries it had acknowledged).
    pub force: bool,
}

/// What a rebuild reports on its way.
#[derive(Debug)]
pub enum Note {
    /// The old store does not open: as expected of a damaged one.
    Damaged(StoreError),
    /// No member told the cluster's configuration (why): the nodes the
    /// client was given are asked instead.
    AskingGivenNodes(String),
    /// No member told the cluster's configuration (why): the rebuilt node
    /// will take its command line's.
    NoConfiguration(String),
    /// A member did not answer; the rebuild goes on without it (forced).
    Unanswered(NodeId),
    /// The old data directory was moved here.
    MovedAside(PathBuf),
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Note::Damaged(error) => write!(f, "the store is damaged, as expected: {error}"),
            Note::AskingGivenNodes(error) => write!(
                f,
                "warning: no node told the cluster's configuration ({error}); asking the nodes \
                 --cluster names"
            ),
            Note::NoConfiguration(error) => write!(
                f,
                "warning: no node told the cluster's configuration ({error}); the rebuilt node \
                 will take its command line's --peers/--learner (or --join) as its configuration"
            ),
            Note::Unanswered(node) => write!(
                f,
                "warning: node {node} did not answer; continuing (--force). If it alone holds \
                 entries this node had acknowledged, the rebuilt node may vote for a log without them"
            ),
            Note::MovedAside(path) => write!(f, "moved the old store to {}", path.display()),
        }
    }
}

/// A rebuilt replica.
#[derive(Clone, Debug)]
pub struct Rebuilt {
    pub id: NodeId,
    pub data: PathBuf,
    /// The term it starts at and its catch-up floor.
    pub plan: RebuildPlan,
}

impl fmt::Display for Rebuilt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let floor = match self.plan.floor {
            Some(floor) => {
                format!("; until its log reaches {floor} it votes only for nodes whose logs do")
            }
            None => String::new(),
        };
        write!(
            f,
            "rebuilt an empty replica for node {} in {} at term {}{floor}; start the node as before and it copies the log from the leader",
            self.id,
            self.data.display(),
            self.plan.term
        )
    }
}

/// Rebuilds node `options.id`'s replica: checks that its store is lost or
/// damaged (unless forced), asks every member of the cluster's
/// configuration for its status through the client `connect` makes
/// (called once the store is checked), moves the old directory aside and
/// creates the rebuilt store. `note` hears what happens on the way.
pub async fn rebuild(
    options: &RebuildOptions,
    connect: impl FnOnce() -> Result<Client, ClientError>,
    mut note: impl FnMut(Note),
) -> Result<Rebuilt> {
    let RebuildOptions {
        id,
        ref data,
        ref certs,
        force,
    } = *options;
    let (ca, _) = identity::ca_path(certs);
    let ca_cert = identity::load_certs(&ca)?.remove(0);
    let cluster_id = identity::cluster_id(&ca_cert);
    if data.join("db").exists() {
        match Store::open(data, &cluster_id, id).and_then(|(store, _)| store.verify()) {
            Ok(_) if !force => return Err(RebuildError::Clean { data: data.clone() }),
            Ok(_) => {}
            Err(StoreError::Open { error, .. }) if is_lock_conflict(&error) => {
                return Err(RebuildError::InUse {
                    data: data.clone(),
                    id,
                    reason: error.to_string(),
                });
            }
            Err(StoreError::Foreign { .. }) if !force => {
                return Err(RebuildError::Foreign { data: data.clone() })
            }
            Err(error) => note(Note::Damaged(error)),
        }
    }
    let client = connect()?;
    // The cluster's configuration first: every member of it must answer,
    // not only the nodes the client was given (members added since would
    // be missed: their terms and logs are what the plan must cover), and
    // the rebuilt replica starts from it, as a joining node does, not from
    // a command line that may predate changes (its peers would refuse a
    // different digest).
    let view = client.members().await.map_err(|error| error.to_string());
    let asked: Vec<NodeId> = match &view {
        Ok(view) => view
            .committed
            .members()
            .chain(view.status.membership.members())
            .filter(|n| *n != id)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
        Err(error) => {
            note(Note::AskingGivenNodes(error.clone()));
            client.nodes().into_iter().filter(|n| *n != id).collect()
        }
    };
    let mut answers = Vec::new();
    for other in asked {
        match tokio::time::timeout(ANSWER_WITHIN, client.status(other)).await {
            Ok(Ok(status)) => {
                if let Some(floor) = status.catch_up_floor.filter(|_| !force) {
                    return Err(RebuildError::CatchingUp { node: other, floor });
                }
                answers.push(status);
            }
            Ok(Err(error)) if !force => {
                return Err(RebuildError::Unanswered {
                    node: other,
                    reason: error.to_string(),
                })
            }
            Err(_) if !force => {
                return Err(RebuildError::Unanswered {
                    node: other,
                    reason: format!("nothing within {} s", ANSWER_WITHIN.as_secs()),
                })
            }
            _ => note(Note::Unanswered(other)),
        }
    }
    // The rebuilt directory still records that this node has loaded a
    // revocation list, so it still refuses to start without one.
    let crl_seen = identity::crl_seen_path(data).exists();
    // The term to start at, and the catch-up floor: see `RebuildPlan`.
    let plan = RebuildPlan::from_peers(&answers);
    let bootstrap = match view {
        Ok(view) => Some(StoredBootstrap {
            index: view.committed_index,
            membership: view.committed,
            cluster_digest: view.cluster_digest,
        }),
        Err(error) => {
            note(Note::NoConfiguration(error));
            None
        }
    };
    if data.exists() {
        note(Note::MovedAside(move_aside(data)?));
    }
    Store::create_rebuilt_with(data, &cluster_id, id, &plan, bootstrap.as_ref())?;
    if crl_seen {
        identity::record_crl_seen(data)?;
    }
    Ok(Rebuilt {
        id,
        data: data.clone(),
        plan,
    })
}

/// Renames `data` to `<data>.damaged-<seconds since 1970>`.
fn move_aside(data: &Path) -> Result<PathBuf> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut aside = data.as_os_str().to_owned();
    aside.push(format!(".damaged-{stamp}"));
    let aside = PathBuf::from(aside);
    std::fs::rename(data, &aside).map_err(|error| RebuildError::MoveAside {
        from: data.to_path_buf(),
        to: aside.clone(),
        error,
    })?;
    Ok(aside)
}
