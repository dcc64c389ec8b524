//! The node's durable state, behind one facade, [`Store`]:
//!
//! - the log, in append-only segment files of checksummed records that are
//!   also its write-ahead log (`segments.rs`, entries packed by
//!   `chunk.rs`): a write batch is its entries and hard state appended as
//!   records, made durable with one `fdatasync`;
//! - staging and group commit (`commit.rs`): one sync for all the writes
//!   staged since the last;
//! - in sled, the identity of the data directory, the configuration the
//!   replica started from, for a replica rebuilt by `node rebuild` its
//!   catch-up floor, and a copy of the hard state (term, vote, commit) as
//!   of the last checkpoint (`meta.rs`), each flushed explicitly;
//! - the witness (`witness.rs`), which exposes a store that silently
//!   rolled back to an earlier state;
//! - the bytes of every record above, laid out in one place (`codec.rs`);
//! - data directories of earlier versions, upgraded on open
//!   (`migration/`);
//! - reading the log from other threads (`reader.rs`);
//! - the unsafe no-sync mode, for the chaos tests' proof only
//!   (`unsynced.rs`).

use std::path::{Path, PathBuf};

use bincode::Options;
use serde::{Deserialize, Serialize};

use crate::raft::{
    Entry, HardState, Index, LogPosition, LogWrite, Membership, NodeId, RebuildPlan,
};

mod chunk;
mod codec;
mod commit;
mod meta;
pub mod migration;
mod reader;
pub mod segments;
mod unsynced;
mod witness;

pub use reader::LogReader;

use commit::{Durability, GroupCommit};
use meta::Meta;
use segments::{LogError, SegmentLog};
use unsynced::Unsynced;
use witness::{Witness, WitnessFile};

/// The configuration a replica starts from before its log says otherwise:
/// `--peers`/`--learner` on a new cluster's first start, or what a joining
/// node learned from the cluster. Stored once, so a later command line
/// cannot silently change who votes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredBootstrap {
    pub membership: Membership,
    /// The log index of that configuration in the cluster (0 for a new
    /// cluster's): older configurations in the log, which a joining node
    /// replays while it catches up, do not replace it for the peer links.
    pub index: Index,
    /// Equal on every node of one cluster: the digest of the member ids
    /// the cluster was first started with (a joining node copies it).
    /// Peers compare it on connect.
    pub cluster_digest: u64,
}

/// What a data directory belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataIdentity {
    pub cluster_id: String,
    pub node_id: NodeId,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// (The cause is in the message, and not chained as a source too, so
    /// it is said once.)
    #[error("cannot open the data directory {dir}: {error}")]
    Open { dir: PathBuf, error: sled::Error },
    #[error("{dir} holds the data of node {found} of cluster {found_cluster}, not of node {expected} of cluster {expected_cluster}; point --data at this node's own directory")]
    Foreign {
        dir: PathBuf,
        found: NodeId,
        found_cluster: String,
        expected: NodeId,
        expected_cluster: String,
    },
    #[error("the store in {dir} is corrupt ({what}). Rebuild this node's replica from its peers with `node rebuild --id <id> --data {dir} --cluster ...`: it keeps the damaged directory aside and the node copies the log from the leader")]
    Corrupt { dir: PathBuf, what: String },
    #[error("{file} is damaged: {what}. Starting from it would forget acknowledged entries or a vote. Rebuild this node's replica from its peers with `node rebuild --id <id> --data {dir} --cluster ...`: it keeps the damaged directory aside and the node copies the log from the leader")]
    Damaged {
        dir: PathBuf,
        file: PathBuf,
        what: String,
    },
    #[error("writing to the store in {dir} failed: {what}")]
    Write { dir: PathBuf, what: String },
}

impl StoreError {
    fn corrupt(dir: &Path, what: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            dir: dir.to_path_buf(),
            what: what.into(),
        }
    }

    fn write(dir: &Path, what: impl ToString) -> StoreError {
        StoreError::Write {
            dir: dir.to_path_buf(),
            what: what.to_string(),
        }
    }

    /// A problem with a file of the log: damage (rebuild the replica), or
    /// an I/O failure (a full disk, say) that is not.
    fn from_log(dir: &Path, error: LogError) -> StoreError {
        if error.damaged {
            StoreError::Damaged {
                dir: dir.to_path_buf(),
                file: error.file,
                what: error.what,
            }
        } else {
            StoreError::write(dir, format!("{}: {}", error.file.display(), error.what))
        }
    }
}

/// Whether sled refused to open a data directory because another process
/// (a running node) holds it.
pub fn is_lock_conflict(error: &sled::Error) -> bool {
    error.to_string().contains("could not acquire lock")
}

/// Why stored bytes do not decode, in the words the store uses when it
/// refuses a damaged file: what is wrong, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

/// Decodes one stored log entry as the store does; public for the fuzz
/// targets and property tests, which feed it arbitrary bytes.
pub fn decode_entry(bytes: &[u8]) -> Result<Entry, DecodeError> {
    codec::decode_entry(bytes).map_err(DecodeError)
}

/// Decodes the metadata records of a data directory (hard state, and the
/// directory's identity) as the store does; public for the fuzz targets.
pub fn decode_metadata(
    bytes: &[u8],
) -> (
    Result<HardState, DecodeError>,
    Result<DataIdentity, DecodeError>,
) {
    (
        codec::options()
            .deserialize(bytes)
            .map_err(|e| DecodeError(e.to_string())),
        codec::options()
            .deserialize(bytes)
            .map_err(|e| DecodeError(e.to_string())),
    )
}

/// Decodes one stored chunk of log entries (`chunk.rs`) as the store
/// does; public for the fuzz targets and property tests.
pub fn decode_chunk(bytes: &[u8]) -> Result<Vec<Entry>, DecodeError> {
    chunk::split(bytes)
        .map_err(DecodeError)?
        .into_iter()
        .map(decode_entry)
        .collect()
}

/// Decodes a witness file's contents as the store does (term, vote, last
/// index, commit); public for the fuzz targets and property tests.
pub fn decode_witness(bytes: &[u8]) -> Result<[u64; 4], DecodeError> {
    Witness::decode(bytes)
        .map(|w| [w.term, w.vote, w.last_index, w.commit])
        .map_err(DecodeError)
}

pub struct Store {
    disk: Disk,
    /// When staged writes reach the disk: group commit (`commit.rs`), or
    /// in the unsafe no-sync mode, never in time (`unsynced.rs`).
    durability: Box<dyn Durability>,
}

/// The store's files and what it knows of them: everything but its
/// durability, which works on this.
struct Disk {
    dir: PathBuf,
    /// sled: hard state, identity and the like.
    meta: Meta,
    log: SegmentLog,
    /// The hard state as last written to the log (durable at its next
    /// sync; copied to sled at checkpoints).
    hard_state: HardState,
    /// `log.appended()` at the last checkpoint.
    checkpointed: u64,
    /// A data directory of an earlier version, whose new log takes effect
    /// once the store has passed its checks (`finish_recovery`).
    upgrade: Option<migration::Upgrade>,
    /// The witness file and what it says.
    witness: WitnessFile,
    /// The last index in the log as written.
    last_index: Index,
}

/// What a node restarts from: its hard state and how long its log is.
/// The entries themselves are read with [`Store::replay`], one at a time,
/// so a long log is never loaded whole.
pub struct Recovered {
    pub hard_state: HardState,
    pub last_index: Index,
    /// Recorded by `node rebuild`: the node votes only for logs that reach
    /// it until its own does (`Restorer::set_catch_up_floor`).
    pub catch_up_floor: Option<LogPosition>,
}

impl Store {
    /// Opens (or creates) the store of node `node_id` of cluster
    /// `cluster_id`, refusing anybody else's.
    pub fn open(
        dir: &Path,
        cluster_id: &str,
        node_id: NodeId,
    ) -> Result<(Store, Recovered), StoreError> {
        Store::open_with(dir, cluster_id, node_id, Box::new(GroupCommit::default()))
    }

    /// Breaks durability on purpose: writes are acknowledged and written
    /// seconds later, so a crash loses them (`unsynced.rs`). It exists only
    /// so the chaos tests can show that their checker notices acknowledged
    /// messages being lost (`CLUSTER_STORE_UNSAFE_SKIP_SYNC=1`). Never use
    /// it otherwise.
    pub fn open_without_sync_unsafely(
        dir: &Path,
        cluster_id: &str,
        node_id: NodeId,
    ) -> Result<(Store, Recovered), StoreError> {
        Store::open_with(dir, cluster_id, node_id, Box::new(Unsynced::new()))
    }

    /// A test hook: a store that kills its process (SIGKILL) right after
    /// the sync that makes commit index `at` (or later) durable, before
    /// its witness claims it, so tests can restart a node that died in
    /// that window (`CLUSTER_STORE_TEST_CRASH_BEFORE_CLAIMING=<index>`).
    pub fn open_crashing_before_claiming(
        dir: &Path,
        cluster_id: &str,
        node_id: NodeId,
        at: Index,
    ) -> Result<(Store, Recovered), StoreError> {
        let mut durability = GroupCommit::default();
        durability.crash_before_claiming = Some(at);
        Store::open_with(dir, cluster_id, node_id, Box::new(durability))
    }

    fn open_with(
        dir: &Path,
        cluster_id: &str,
        node_id: NodeId,
        mut durability: Box<dyn Durability>,
    ) -> Result<(Store, Recovered), StoreError> {
        let durable = durability.durable();
        let mut disk = Disk::open(dir, true, durable)?;
        let expected = DataIdentity {
            cluster_id: cluster_id.to_string(),
            node_id,
        };
        match disk.meta.identity()? {
            Some(found) if found != expected => {
                return Err(StoreError::Foreign {
                    dir: dir.to_path_buf(),
                    found: found.node_id,
                    found_cluster: found.cluster_id,
                    expected: node_id,
                    expected_cluster: cluster_id.to_string(),
                })
            }
            Some(_) => {}
            None => {
                if disk.log.last_index() > 0 {
                    return Err(StoreError::corrupt(
                        dir,
                        "log entries without a recorded identity",
                    ));
                }
                disk.meta.put_identity(&expected)?;
                disk.checkpoint()?;
            }
        }
        let recovered = disk.recover(durable)?;
        durability.recovered(recovered.hard_state.commit);
        Ok((Store { disk, durability }, recovered))
    }

    /// Creates a fresh replica for node `node_id` after its store was lost
    /// or damaged (`node rebuild`). It starts at `plan.term`, the highest
    /// term its peers report, with its vote in that term already spent, so
    /// it cannot vote twice in a term it may have voted in before; the
    /// leader then sends it the whole log. Until its log reaches
    /// `plan.floor`, it refuses to vote for logs below that floor, which
    /// might lack entries it had acknowledged (`RebuildPlan`).
    pub fn create_rebuilt(
        dir: &Path,
        cluster_id: &str,
        node_id: NodeId,
        plan: &RebuildPlan,
    ) -> Result<(), StoreError> {
        Store::create_rebuilt_with(dir, cluster_id, node_id, plan, None)
    }

    /// `create_rebuilt`, recording `bootstrap` (the cluster's configuration,
    /// as a joining node does) when the cluster told it.
    pub fn create_rebuilt_with(
        dir: &Path,
        cluster_id: &str,
        node_id: NodeId,
        plan: &RebuildPlan,
        bootstrap: Option<&StoredBootstrap>,
    ) -> Result<(), StoreError> {
        if dir.join("db").exists() {
            return Err(StoreError::write(
                dir,
                "a store is already there; move it aside first",
            ));
        }
        let (mut store, _) = Store::open(dir, cluster_id, node_id)?;
        if let Some(bootstrap) = bootstrap {
            store.set_bootstrap(bootstrap)?;
        }
        // The floor is made durable first: a rebuild cut short may leave
        // a floor without the term, never the term without its floor.
        if let Some(floor) = plan.floor {
            store.disk.meta.put_catch_up_floor(&floor)?;
            store.disk.checkpoint()?;
        }
        store.write(Some(plan.hard_state(node_id)), None)
    }

    /// Opens a store without checking whose it is (`node export --local`).
    /// It is checked against its witness all the same, so a store that
    /// lost acknowledged writes is refused rather than read as a shorter
    /// history. Even with `create` false it may write: a torn write is cut
    /// off the log, and a data directory of an earlier version is upgraded.
    pub fn open_existing(dir: &Path, create: bool) -> Result<Store, StoreError> {
        let mut disk = Disk::open(dir, create, true)?;
        disk.recover(true)?;
        Ok(Store {
            disk,
            durability: Box::new(GroupCommit::default()),
        })
    }

    pub fn identity(&self) -> Result<Option<DataIdentity>, StoreError> {
        self.disk.meta.identity()
    }

    pub fn hard_state(&self) -> Result<HardState, StoreError> {
        Ok(self.disk.hard_state)
    }

    /// The bootstrap configuration recorded on this replica's first start.
    pub fn bootstrap(&self) -> Result<Option<StoredBootstrap>, StoreError> {
        self.disk.meta.bootstrap()
    }

    /// Records the bootstrap configuration, durably, before the node runs.
    pub fn set_bootstrap(&mut self, bootstrap: &StoredBootstrap) -> Result<(), StoreError> {
        self.disk.meta.put_bootstrap(bootstrap)?;
        self.disk.checkpoint()
    }

    /// The catch-up floor `node rebuild` recorded, if this is a rebuilt
    /// replica. It stays recorded; once the log has reached it, it is
    /// ignored.
    pub fn catch_up_floor(&self) -> Result<Option<LogPosition>, StoreError> {
        self.disk.meta.catch_up_floor()
    }

    /// Hands every log entry to `each`, in order, checking that they are
    /// contiguous from index 1 and decode; the first error stops it.
    pub fn replay(
        &self,
        mut each: impl FnMut(Entry) -> Result<(), String>,
    ) -> Result<Index, StoreError> {
        self.reader()
            .scan(1, Index::MAX, usize::MAX, usize::MAX, &mut each)
    }

    /// Reads the whole store once, as a restart would.
    pub fn verify(&self) -> Result<Index, StoreError> {
        self.replay(|_| Ok(()))
    }

    /// A handle that reads the log from other threads.
    pub fn reader(&self) -> LogReader {
        LogReader::new(&self.disk.dir, self.disk.log.reader())
    }

    pub fn entries(&self, from: Index, to: Index, limit: usize) -> Result<Vec<Entry>, StoreError> {
        self.reader().entries(from, to, limit)
    }

    /// Applies one ready's durable changes and syncs them to disk.
    pub fn write(
        &mut self,
        hard_state: Option<HardState>,
        write: Option<&LogWrite>,
    ) -> Result<(), StoreError> {
        self.write_many(&[(hard_state, write)])
    }

    /// Applies several readies' durable changes, in order, and makes them
    /// durable with one sync (together with anything staged before):
    /// group commit across readies.
    pub fn write_many(
        &mut self,
        writes: &[(Option<HardState>, Option<&LogWrite>)],
    ) -> Result<(), StoreError> {
        self.stage(writes)?;
        self.sync_staged().map(|_| ())
    }

    /// Applies writes without syncing them: the next sync covers them. A
    /// crash before it loses them, so only what needs no acknowledgement
    /// may wait here (a new commit index: the leader tells it again).
    pub fn stage(
        &mut self,
        writes: &[(Option<HardState>, Option<&LogWrite>)],
    ) -> Result<(), StoreError> {
        self.durability.stage(&mut self.disk, writes)
    }

    /// Makes everything staged durable with one sync, if anything is
    /// staged; says whether it synced.
    pub fn sync_staged(&mut self) -> Result<bool, StoreError> {
        self.durability.sync_staged(&mut self.disk)
    }

    /// Whether writes are applied but not yet synced.
    pub fn has_staged(&self) -> bool {
        self.durability.has_staged()
    }

    /// The commit index the last sync made durable.
    pub fn synced_commit(&self) -> Index {
        self.durability.synced_commit(&self.disk)
    }
}

impl Disk {
    /// Opens the store's files in `dir` (creating them if `create`),
    /// writing a data directory of an earlier version's log in the current
    /// format. `durable` false only for the unsafe no-sync mode.
    fn open(dir: &Path, create: bool, durable: bool) -> Result<Disk, StoreError> {
        if !create && !dir.join("db").exists() {
            return Err(StoreError::Open {
                dir: dir.to_path_buf(),
                error: sled::Error::Unsupported("no cluster-store data here".into()),
            });
        }
        let meta = Meta::open(dir, durable)?;
        let (log, upgrade) = migration::open_log(dir, &meta)?;
        // The log's hard-state records are newer than sled's copy, unless
        // a checkpoint copied one the log then lost with a torn write.
        let hard_state = latest(meta.hard_state()?, log.hard_state());
        Ok(Disk {
            dir: dir.to_path_buf(),
            meta,
            log,
            hard_state,
            checkpointed: 0,
            upgrade,
            witness: WitnessFile::unopened(dir),
            last_index: 0,
        })
    }

    /// What the store recovered, checked against the witness (`check`
    /// false only for the unsafe no-sync mode, which keeps none); then
    /// `finish_recovery`, and the witness raised to what was recovered.
    fn recover(&mut self, check: bool) -> Result<Recovered, StoreError> {
        self.last_index = self.log.last_index();
        let recovered = Recovered {
            hard_state: self.hard_state,
            last_index: self.last_index,
            catch_up_floor: self.meta.catch_up_floor()?,
        };
        if check {
            self.check_witness(&recovered)?;
        }
        self.finish_recovery()?;
        if check {
            self.claim_recovered(&recovered)?;
        }
        Ok(recovered)
    }

    /// Ends opening once the store has passed its checks: a torn write is
    /// cut off the log, an upgrade takes effect, and sled gets the hard
    /// state. Until then every file stays as it was found, so a store
    /// refused as damaged keeps the evidence (and `node rebuild` sets it
    /// aside whole).
    fn finish_recovery(&mut self) -> Result<(), StoreError> {
        self.log
            .cut_torn_tail()
            .map_err(|e| StoreError::from_log(&self.dir, e))?;
        self.checkpoint()?;
        migration::finish(&self.dir, &self.meta, self.upgrade.take())
    }
}

/// The later of two hard states of one node: terms only grow, a vote is
/// cast once per term, and the commit index only grows.
fn latest(sled: HardState, log: Option<HardState>) -> HardState {
    let key = |hs: &HardState| (hs.term, hs.vote.is_some(), hs.commit);
    match log {
        Some(log) if key(&log) >= key(&sled) => log,
        _ => sled,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::Payload;

    /// Runs `open` on a store this process has just dropped. sled's
    /// background threads let go of the directory's lock a moment after the
    /// drop, so a lock conflict is waited out (briefly); any other outcome
    /// is returned.
    pub(super) fn released<T, E: std::fmt::Display>(
        open: impl Fn() -> Result<T, E>,
    ) -> Result<T, E> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match open() {
                Err(e)
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                result => return result,
            }
        }
    }

    pub(super) fn open_released(
        dir: &Path,
        cluster_id: &str,
        node_id: NodeId,
    ) -> Result<(Store, Recovered), StoreError> {
        released(|| Store::open(dir, cluster_id, node_id))
    }

    pub(super) fn reopen(dir: &Path) -> (Store, Recovered) {
        open_released(dir, "c1", 1).unwrap()
    }

    pub(super) fn entry(index: Index, term: u64) -> Entry {
        Entry {
            index,
            term,
            lamport: index,
            payload: Payload::Noop,
        }
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The bytes of every file and record the store writes, for a fixed
    /// history: a change of format shows here first. (The log's sequence
    /// numbers start at random, so they and the checksums that cover them
    /// are zeroed after the segment has been checked to decode.)
    #[test]
    fn the_bytes_it_writes_are_pinned() {
        let dir = std::env::temp_dir().join(format!("cs-store-pinned-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (mut store, _) = Store::open(&dir, "c1", 1).unwrap();
        let bootstrap = StoredBootstrap {
            membership: crate::raft::Membership {
                voters: [1, 2].into(),
                learners: [3].into(),
                addresses: (1..=3).map(|id| (id, format!("h{id}:7000"))).collect(),
            },
            index: 5,
            cluster_digest: 99,
        };
        store.set_bootstrap(&bootstrap).unwrap();
        let command = Entry {
            index: 2,
            term: 2,
            lamport: 9,
            payload: Payload::Command(crate::raft::Command {
                client_id: 7,
                seq: 1,
                sender: "alice".into(),
                data: "hi".into(),
            }),
        };
        let hs = HardState {
            term: 2,
            vote: Some(1),
            commit: 1,
        };
        store
            .write(
                Some(hs),
                Some(&LogWrite {
                    from: 1,
                    entries: vec![entry(1, 1), command],
                }),
            )
            .unwrap();
        store
            .write(
                None,
                Some(&LogWrite {
                    from: 2,
                    entries: vec![],
                }),
            )
            .unwrap();
        let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
        // The segment's records, with their sequence numbers and the
        // checksums that cover them zeroed once they have been read back.
        let mut segment = segments::written(&dir.join("log/00000000.wal"));
        assert_eq!(
            segments::decode_segment(&segment).unwrap(),
            vec![(1, 2), (2, 0)]
        );
        let mut at = 0;
        while at < segment.len() {
            let len = u32::from_le_bytes(segment[at + 8..at + 12].try_into().unwrap()) as usize;
            segment[at + 4..at + 8].fill(0);
            segment[at + 12..at + 20].fill(0);
            at += codec::SEQUENCED_HEADER + len;
        }
        store.disk.checkpoint().unwrap();
        let meta = |key: &str| hex(&store.disk.meta.raw(key).unwrap());
        let pinned = [
            ("witness", hex(&read(witness::WITNESS_FILE))),
            ("segment", hex(&segment)),
            ("identity", meta("identity")),
            ("hard state", meta("hard state")),
            ("bootstrap", meta("bootstrap")),
            ("witness kept", meta("witness kept")),
            ("log format", meta("log format")),
            (
                "catch-up floor",
                hex(&codec::options()
                    .serialize(&LogPosition { term: 6, index: 42 })
                    .unwrap()),
            ),
        ];
        let expected = [
            ("witness", "43535732a680561d2000000000000000000000000200000000000000010000000000000001000000000000000100000000000000"),
            ("segment", "43534c3200000000740000000000000000000000010100000000000000020000001c000000010000000000000001000000000000000100000000000000000000004300000002000000000000000200000000000000090000000000000001000000070000000000000001000000000000000500000000000000616c6963650200000000000000686943534c32000000001900000000000000000000000302000000000000000100000000000000010000000000000043534c3200000000090000000000000000000000020200000000000000"),
            ("identity", "020000000000000063310100000000000000"),
            ("hard state", "02000000000000000101000000000000000100000000000000"),
            ("bootstrap", "0200000000000000010000000000000002000000000000000100000000000000030000000000000003000000000000000100000000000000070000000000000068313a373030300200000000000000070000000000000068323a373030300300000000000000070000000000000068333a3730303005000000000000006300000000000000"),
            ("witness kept", "01"),
            ("log format", "02000000"),
            ("catch-up floor", "06000000000000002a00000000000000"),
        ];
        assert_eq!(pinned.len(), expected.len());
        for ((what, bytes), (name, expected)) in pinned.iter().zip(expected) {
            assert_eq!((*what, bytes.as_str()), (name, expected));
        }
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_staged_commit_counts_only_once_synced() {
        let dir = std::env::temp_dir().join(format!("cs-store-stage-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (mut store, _) = Store::open(&dir, "c1", 1).unwrap();
        let append = LogWrite {
            from: 1,
            entries: vec![entry(1, 1), entry(2, 1)],
        };
        store.write(None, Some(&append)).unwrap();
        let commit = HardState {
            term: 1,
            vote: Some(1),
            commit: 2,
        };
        store.stage(&[(Some(commit), None)]).unwrap();
        assert!(store.has_staged());
        assert_eq!(store.synced_commit(), 0, "staged, not yet synced");
        assert!(store.sync_staged().unwrap());
        assert_eq!(store.synced_commit(), 2);
        assert!(!store.sync_staged().unwrap(), "nothing left to sync");
        drop(store);
        let (_, recovered) = reopen(&dir);
        assert_eq!(recovered.hard_state.commit, 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A process killed while a new commit index lingered unsynced (or
    /// between the log's sync and the witness's write) leaves the log
    /// ahead of the witness. Reopened, the store must report as synced the
    /// commit it recovered, or a restarted node on an idle cluster reports
    /// an old commit forever (found by the bench smoke's catch-up phase).
    #[test]
    fn a_restart_reports_the_commit_it_recovered_as_synced() {
        let dir = std::env::temp_dir().join(format!("cs-store-recovered-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (mut store, _) = Store::open(&dir, "c1", 1).unwrap();
        let hs = |commit| HardState {
            term: 1,
            vote: Some(1),
            commit,
        };
        let append = LogWrite {
            from: 1,
            entries: (1..=5).map(|i| entry(i, 1)).collect(),
        };
        store.write(Some(hs(1)), Some(&append)).unwrap();
        assert_eq!(store.synced_commit(), 1);
        // The commit moves, staged; the process dies before the sync.
        store.stage(&[(Some(hs(5)), None)]).unwrap();
        drop(store);
        let (store, recovered) = reopen(&dir);
        assert_eq!(recovered.hard_state.commit, 5, "the page cache kept it");
        assert_eq!(store.synced_commit(), 5, "synced on open, and claimed");
        drop(store);
        // Claimed durably: the witness now holds the store to it.
        let (store, recovered) = reopen(&dir);
        assert_eq!((recovered.hard_state.commit, store.synced_commit()), (5, 5));
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_log_keeps_the_hard_state_between_checkpoints() {
        let dir = std::env::temp_dir().join(format!("cs-store-hard-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let hs = HardState {
            term: 2,
            vote: Some(1),
            commit: 1500,
        };
        {
            let (mut store, _) = Store::open(&dir, "c1", 1).unwrap();
            // Many small writes, then a new leader's truncation and rewrite.
            for index in 1..=2000 {
                store
                    .write(
                        None,
                        Some(&LogWrite {
                            from: index,
                            entries: vec![entry(index, 1)],
                        }),
                    )
                    .unwrap();
            }
            store
                .write(
                    Some(hs),
                    Some(&LogWrite {
                        from: 1801,
                        entries: vec![entry(1801, 2), entry(1802, 2)],
                    }),
                )
                .unwrap();
            assert_eq!(
                store.disk.meta.hard_state().unwrap(),
                HardState::default(),
                "sled has no copy until a checkpoint"
            );
        }
        let (store, recovered) = reopen(&dir);
        assert_eq!(recovered.last_index, 1802);
        assert_eq!(recovered.hard_state, hs);
        let entries = store.entries(1, 1802, usize::MAX).unwrap();
        assert_eq!(entries.len(), 1802);
        assert_eq!(entries[1799], entry(1800, 1));
        assert_eq!(entries[1801], entry(1802, 2));
        assert_eq!(store.disk.meta.hard_state().unwrap(), hs, "copied on open");
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn reads_and_truncates_inside_chunks() {
        let dir = std::env::temp_dir().join(format!("cs-store-chunks-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (mut store, _) = Store::open(&dir, "c1", 1).unwrap();
        let write = |from: Index, to: Index, term: u64| LogWrite {
            from,
            entries: (from..=to).map(|i| entry(i, term)).collect(),
        };
        // Chunks 1..=10, 11..=20, 21..=30; then a new leader replaces 15 on.
        for (from, to) in [(1, 10), (11, 20), (21, 30)] {
            store.write(None, Some(&write(from, to, 1))).unwrap();
        }
        store.write(None, Some(&write(15, 16, 2))).unwrap();
        let ids = |store: &Store, from: Index, to: Index, limit: usize| -> Vec<(Index, u64)> {
            store
                .entries(from, to, limit)
                .unwrap()
                .iter()
                .map(|e| (e.index, e.term))
                .collect()
        };
        assert_eq!(
            ids(&store, 9, 12, 100),
            vec![(9, 1), (10, 1), (11, 1), (12, 1)]
        );
        assert_eq!(ids(&store, 13, 100, 3), vec![(13, 1), (14, 1), (15, 2)]);
        assert_eq!(ids(&store, 16, 100, 100), vec![(16, 2)]);
        assert_eq!(ids(&store, 17, 100, 100), vec![]);
        assert_eq!(ids(&store, 0, 2, 100), vec![(1, 1), (2, 1)]);
        // A truncation with nothing new cuts a chunk in the middle.
        store
            .write(
                None,
                Some(&LogWrite {
                    from: 5,
                    entries: vec![],
                }),
            )
            .unwrap();
        assert_eq!(ids(&store, 1, 100, 100).len(), 4);
        store.write(None, Some(&write(5, 6, 3))).unwrap();
        drop(store);
        let (store, recovered) = reopen(&dir);
        assert_eq!(recovered.last_index, 6);
        assert_eq!(store.verify().unwrap(), 6);
        assert_eq!(store.entries(6, 6, 1).unwrap(), vec![entry(6, 3)]);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Four writes, one record each in the log's only segment; returns
    /// the segment's path and bytes.
    fn four_logged_writes(dir: &Path) -> (PathBuf, Vec<u8>) {
        let _ = std::fs::remove_dir_all(dir);
        let (mut store, _) = Store::open(dir, "c1", 1).unwrap();
        for index in 1..=4 {
            store
                .write(
                    None,
                    Some(&LogWrite {
                        from: index,
                        entries: vec![entry(index, 1)],
                    }),
                )
                .unwrap();
        }
        drop(store);
        let segment = segments::segment_path(&dir.join(segments::LOG_DIR), 0);
        // Its records alone, as a segment written before the log was
        // allocated ahead, or trimmed when full, holds them.
        let bytes = segments::written(&segment);
        std::fs::write(&segment, &bytes).unwrap();
        (segment, bytes)
    }

    /// Where the segment's second record starts: a record is a 20-byte
    /// header (magic, checksum, payload length at bytes 8..12, sequence
    /// number) and its payload.
    fn second_record(segment: &[u8]) -> usize {
        20 + u32::from_le_bytes(segment[8..12].try_into().unwrap()) as usize
    }

    #[test]
    fn a_segment_with_a_damaged_length_is_refused_by_name_and_left_as_found() {
        let dir = std::env::temp_dir().join(format!("cs-store-length-{}", std::process::id()));
        let (segment, intact) = four_logged_writes(&dir);
        let second = second_record(&intact);
        assert!(second < intact.len());
        let mut damaged = intact.clone();
        damaged[second + 8..second + 12].copy_from_slice(&u32::MAX.to_le_bytes());
        std::fs::write(&segment, &damaged).unwrap();
        let error = match open_released(&dir, "c1", 1) {
            Ok(_) => panic!("a damaged length was read as a torn tail"),
            Err(error) => error,
        };
        let StoreError::Damaged { file, .. } = &error else {
            panic!("unexpected error: {error}")
        };
        assert_eq!(file, &segment);
        let message = error.to_string();
        assert!(
            message.contains(&format!("offset {second}")) && message.contains("node rebuild"),
            "{message}"
        );
        assert_eq!(
            std::fs::read(&segment).unwrap(),
            damaged,
            "the refused segment was changed"
        );
        // Mended, the store opens with every write.
        std::fs::write(&segment, &intact).unwrap();
        let (store, recovered) = reopen(&dir);
        assert_eq!(recovered.last_index, 4);
        assert_eq!(store.verify().unwrap(), 4);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_torn_write_is_cut_unless_it_had_been_synced() {
        let dir = std::env::temp_dir().join(format!("cs-store-cut-{}", std::process::id()));
        let (segment, intact) = four_logged_writes(&dir);
        // The last record reads as torn, but the witness saw it synced.
        let cut = &intact[..intact.len() - 10];
        std::fs::write(&segment, cut).unwrap();
        let error = match open_released(&dir, "c1", 1) {
            Ok(_) => panic!("a synced write was dropped as a torn tail"),
            Err(error) => error,
        };
        let StoreError::Damaged { file, what, .. } = &error else {
            panic!("unexpected error: {error}")
        };
        assert_eq!(file, &segment);
        assert!(what.contains("torn"), "{what}");
        assert_eq!(
            std::fs::read(&segment).unwrap(),
            cut,
            "the segment was cut before the witness was checked"
        );
        // Read without an identity check (`node export --local`): refused
        // too, not read as a shorter history.
        assert!(matches!(
            released(|| Store::open_existing(&dir, false)),
            Err(StoreError::Damaged { .. })
        ));
        assert_eq!(std::fs::read(&segment).unwrap(), cut);
        // A write torn before it was synced (the witness never saw it) is
        // cut off, and the log goes on from the last intact record.
        std::fs::write(&segment, &intact).unwrap();
        let (mut store, _) = reopen(&dir);
        store
            .write(
                None,
                Some(&LogWrite {
                    from: 5,
                    entries: vec![entry(5, 1)],
                }),
            )
            .unwrap();
        drop(store);
        let whole = segments::written(&segment);
        let torn = &whole[..whole.len() - 10];
        std::fs::write(&segment, torn).unwrap();
        let witness = dir.join(witness::WITNESS_FILE);
        let mut claims = Witness::decode(&std::fs::read(&witness).unwrap()).unwrap();
        claims.last_index = 4;
        std::fs::write(&witness, claims.encode()).unwrap();
        let (mut store, recovered) = reopen(&dir);
        assert_eq!(recovered.last_index, 4);
        assert_eq!(
            std::fs::read(&segment).unwrap(),
            intact,
            "the torn write was cut"
        );
        store
            .write(
                None,
                Some(&LogWrite {
                    from: 5,
                    entries: vec![entry(5, 2)],
                }),
            )
            .unwrap();
        drop(store);
        let (store, recovered) = reopen(&dir);
        assert_eq!(recovered.last_index, 5);
        assert_eq!(store.entries(5, 5, 1).unwrap(), vec![entry(5, 2)]);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_bootstrap_configuration_is_kept_across_restarts() {
        let dir = std::env::temp_dir().join(format!("cs-store-bootstrap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let bootstrap = StoredBootstrap {
            membership: crate::raft::Membership {
                voters: [1, 2, 3].into(),
                learners: [4].into(),
                addresses: (1..=4).map(|id| (id, format!("h{id}:7000"))).collect(),
            },
            index: 57,
            cluster_digest: 99,
        };
        {
            let (mut store, _) = open_released(&dir, "c1", 1).unwrap();
            assert_eq!(store.bootstrap().unwrap(), None, "a new store has none");
            store.set_bootstrap(&bootstrap).unwrap();
        }
        let (store, _) = open_released(&dir, "c1", 1).unwrap();
        assert_eq!(store.bootstrap().unwrap(), Some(bootstrap));
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_rebuilt_store_starts_from_its_plan_and_keeps_its_floor() {
        let dir = std::env::temp_dir().join(format!("cs-store-rebuilt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let plan = RebuildPlan {
            term: 7,
            floor: Some(LogPosition { term: 6, index: 42 }),
        };
        Store::create_rebuilt(&dir, "c1", 1, &plan).unwrap();
        let (store, recovered) = open_released(&dir, "c1", 1).unwrap();
        assert_eq!(
            recovered.hard_state,
            HardState {
                term: 7,
                vote: Some(1),
                commit: 0
            }
        );
        assert_eq!(recovered.last_index, 0);
        assert_eq!(recovered.catch_up_floor, plan.floor);
        assert!(
            matches!(
                Store::create_rebuilt(&dir, "c1", 1, &plan),
                Err(StoreError::Write { .. })
            ),
            "a store is already there"
        );
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);

        // A store that was never rebuilt has no floor.
        let fresh = dir.with_extension("fresh");
        let _ = std::fs::remove_dir_all(&fresh);
        let (store, recovered) = Store::open(&fresh, "c1", 1).unwrap();
        assert_eq!(recovered.catch_up_floor, None);
        drop(store);
        let _ = std::fs::remove_dir_all(&fresh);
    }

    #[test]
    fn survives_reopen_and_refuses_foreign_data() {
        let dir = std::env::temp_dir().join(format!("cs-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let (mut store, recovered) = Store::open(&dir, "c1", 1).unwrap();
            assert_eq!(recovered.last_index, 0);
            let hs = HardState {
                term: 2,
                vote: Some(1),
                commit: 1,
            };
            let write = LogWrite {
                from: 1,
                entries: vec![entry(1, 1), entry(2, 1), entry(3, 2)],
            };
            store.write(Some(hs), Some(&write)).unwrap();
            let replace = LogWrite {
                from: 2,
                entries: vec![entry(2, 2)],
            };
            store.write(None, Some(&replace)).unwrap();
        }
        let (store, recovered) = reopen(&dir);
        assert_eq!(recovered.hard_state.term, 2);
        assert_eq!(recovered.last_index, 2);
        let mut entries = Vec::new();
        store
            .replay(|e| {
                entries.push(e);
                Ok(())
            })
            .unwrap();
        assert_eq!(entries, vec![entry(1, 1), entry(2, 2)]);
        drop(store);
        assert!(matches!(
            open_released(&dir, "c1", 2),
            Err(StoreError::Foreign { .. })
        ));
        assert!(matches!(
            open_released(&dir, "c2", 1),
            Err(StoreError::Foreign { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
