//! The node's durable state in sled: the log (index to entry), the hard
//! state (term, vote, commit) and the identity of the data directory.
//!
//! sled's own flush stops at `sync_file_range` on Linux, which does not
//! reach the disk cache or file metadata, so every write batch ends with an
//! fsync of sled's data file. One batch, one sync: that is group commit.

use std::fs::File;
use std::path::{Path, PathBuf};

use bincode::Options;
use serde::{Deserialize, Serialize};

use crate::raft::{Entry, HardState, Index, LogWrite, NodeId};

const IDENTITY_KEY: &[u8] = b"identity";
const HARD_STATE_KEY: &[u8] = b"hard_state";
/// Page cache for sled; its default of 1 GB is far more than a node needs.
const CACHE_BYTES: u64 = 64 << 20;

/// What a data directory belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataIdentity {
    pub cluster_id: String,
    pub node_id: NodeId,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the data directory {dir}: {source}")]
    Open { dir: PathBuf, source: sled::Error },
    #[error("{dir} holds the data of node {found} of cluster {found_cluster}, not of node {expected} of cluster {expected_cluster}; point --data at this node's own directory")]
    Foreign {
        dir: PathBuf,
        found: NodeId,
        found_cluster: String,
        expected: NodeId,
        expected_cluster: String,
    },
    #[error("the store in {dir} is corrupt ({what}). To rebuild this node's replica from its peers, stop it, move {dir} aside, and start it again with the same --id: it will copy the log from the leader")]
    Corrupt { dir: PathBuf, what: String },
    #[error("writing to the store in {dir} failed: {what}")]
    Write { dir: PathBuf, what: String },
}

fn codec() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .reject_trailing_bytes()
        .with_limit(64 << 20)
}

pub struct Store {
    dir: PathBuf,
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    /// sled's data file, fsynced after every flush.
    data_file: Option<File>,
    /// See `open_without_sync_unsafely`.
    skip_sync: bool,
    /// Unsafe mode only: acknowledged writes not yet applied, and when
    /// they were last applied.
    deferred: Vec<(Option<HardState>, Option<LogWrite>)>,
    last_applied: std::time::Instant,
}

/// What a node restarts from.
pub struct Recovered {
    pub hard_state: HardState,
    pub entries: Vec<Entry>,
}

impl Store {
    /// Opens (or creates) the store of node `node_id` of cluster
    /// `cluster_id`, refusing anybody else's.
    pub fn open(
        dir: &Path,
        cluster_id: &str,
        node_id: NodeId,
    ) -> Result<(Store, Recovered), StoreError> {
        Store::open_with(dir, cluster_id, node_id, true)
    }

    /// Breaks durability on purpose: writes are acknowledged and never
    /// flushed, so a crash loses them. It exists only so the chaos tests can
    /// show that their checker notices acknowledged messages being lost
    /// (`CLUSTER_STORE_UNSAFE_SKIP_SYNC=1`). Never use it otherwise.
    pub fn open_without_sync_unsafely(
        dir: &Path,
        cluster_id: &str,
        node_id: NodeId,
    ) -> Result<(Store, Recovered), StoreError> {
        Store::open_with(dir, cluster_id, node_id, false)
    }

    fn open_with(
        dir: &Path,
        cluster_id: &str,
        node_id: NodeId,
        durable: bool,
    ) -> Result<(Store, Recovered), StoreError> {
        let mut store = Store::open_dir(dir, true, durable)?;
        store.skip_sync = !durable;
        let expected = DataIdentity {
            cluster_id: cluster_id.to_string(),
            node_id,
        };
        match store.identity()? {
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
                if !store.log.is_empty() {
                    return Err(store.corrupt("log entries without a recorded identity"));
                }
                let bytes = codec()
                    .serialize(&expected)
                    .map_err(|e| store.write_error(e))?;
                store
                    .meta
                    .insert(IDENTITY_KEY, bytes)
                    .map_err(|e| store.write_error(e))?;
                store.sync()?;
            }
        }
        let recovered = Recovered {
            hard_state: store.hard_state()?,
            entries: store.entries(1, Index::MAX, usize::MAX)?,
        };
        Ok((store, recovered))
    }

    /// Opens a store for reading or writing without checking whose it is
    /// (`node export --local`). `create` is false for read-only use.
    pub fn open_existing(dir: &Path, create: bool) -> Result<Store, StoreError> {
        Store::open_dir(dir, create, true)
    }

    fn open_dir(dir: &Path, create: bool, durable: bool) -> Result<Store, StoreError> {
        if !create && !dir.join("db").exists() {
            return Err(StoreError::Open {
                dir: dir.to_path_buf(),
                source: sled::Error::Unsupported("no cluster-store data here".into()),
            });
        }
        let open_error = |source: sled::Error| match source {
            sled::Error::Corruption { .. } => StoreError::Corrupt {
                dir: dir.to_path_buf(),
                what: source.to_string(),
            },
            source => StoreError::Open {
                dir: dir.to_path_buf(),
                source,
            },
        };
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(CACHE_BYTES)
            .flush_every_ms(if durable { Some(500) } else { None })
            .open()
            .map_err(open_error)?;
        let log = db.open_tree("log").map_err(open_error)?;
        let meta = db.open_tree("meta").map_err(open_error)?;
        let data_file = File::open(dir.join("db")).ok();
        Ok(Store {
            dir: dir.to_path_buf(),
            db,
            log,
            meta,
            data_file,
            skip_sync: false,
            deferred: Vec::new(),
            last_applied: std::time::Instant::now(),
        })
    }

    fn corrupt(&self, what: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            dir: self.dir.clone(),
            what: what.into(),
        }
    }

    fn write_error(&self, what: impl ToString) -> StoreError {
        StoreError::Write {
            dir: self.dir.clone(),
            what: what.to_string(),
        }
    }

    pub fn identity(&self) -> Result<Option<DataIdentity>, StoreError> {
        let Some(bytes) = self
            .meta
            .get(IDENTITY_KEY)
            .map_err(|e| self.corrupt(e.to_string()))?
        else {
            return Ok(None);
        };
        codec()
            .deserialize(&bytes)
            .map(Some)
            .map_err(|e| self.corrupt(format!("identity record: {e}")))
    }

    pub fn hard_state(&self) -> Result<HardState, StoreError> {
        match self
            .meta
            .get(HARD_STATE_KEY)
            .map_err(|e| self.corrupt(e.to_string()))?
        {
            Some(bytes) => codec()
                .deserialize(&bytes)
                .map_err(|e| self.corrupt(format!("hard state record: {e}"))),
            None => Ok(HardState::default()),
        }
    }

    /// A handle that reads the log from other threads.
    pub fn reader(&self) -> LogReader {
        LogReader {
            dir: self.dir.clone(),
            log: self.log.clone(),
        }
    }

    pub fn entries(&self, from: Index, to: Index, limit: usize) -> Result<Vec<Entry>, StoreError> {
        self.reader().entries(from, to, limit)
    }
}

/// Reads committed entries while the driver keeps writing.
#[derive(Clone)]
pub struct LogReader {
    dir: PathBuf,
    log: sled::Tree,
}

impl LogReader {
    fn corrupt(&self, what: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            dir: self.dir.clone(),
            what: what.into(),
        }
    }

    /// Entries `from..=to`, at most `limit`, checked to be contiguous.
    pub fn entries(&self, from: Index, to: Index, limit: usize) -> Result<Vec<Entry>, StoreError> {
        let mut entries = Vec::new();
        if from > to {
            return Ok(entries);
        }
        let first = from.max(1);
        for (expected, item) in (first..).zip(
            self.log
                .range(first.to_be_bytes()..=to.to_be_bytes())
                .take(limit),
        ) {
            let (key, value) = item.map_err(|e| self.corrupt(e.to_string()))?;
            let key: [u8; 8] = key
                .as_ref()
                .try_into()
                .map_err(|_| self.corrupt(format!("log key of {} bytes", key.len())))?;
            let index = Index::from_be_bytes(key);
            let entry: Entry = codec()
                .deserialize(&value)
                .map_err(|e| self.corrupt(format!("log entry {index}: {e}")))?;
            if index != expected || entry.index != index {
                return Err(self.corrupt(format!("log entry {expected} missing (found {index})")));
            }
            entries.push(entry);
        }
        Ok(entries)
    }
}

impl Store {
    /// Applies one ready's durable changes and syncs them to disk.
    pub fn write(
        &mut self,
        hard_state: Option<HardState>,
        write: Option<&LogWrite>,
    ) -> Result<(), StoreError> {
        if hard_state.is_none() && write.is_none() {
            return Ok(());
        }
        if self.skip_sync {
            // Acknowledge now, write seconds later: a crash in between loses
            // acknowledged entries. Only for proving the checkers work.
            self.deferred.push((hard_state, write.cloned()));
            if self.last_applied.elapsed() < std::time::Duration::from_secs(3) {
                return Ok(());
            }
            self.last_applied = std::time::Instant::now();
            for (hard_state, write) in std::mem::take(&mut self.deferred) {
                self.apply(hard_state, write.as_ref())?;
            }
            return self.sync();
        }
        self.apply(hard_state, write)?;
        self.sync()
    }

    fn apply(
        &mut self,
        hard_state: Option<HardState>,
        write: Option<&LogWrite>,
    ) -> Result<(), StoreError> {
        if let Some(write) = write {
            let mut batch = sled::Batch::default();
            for item in self.log.range(write.from.to_be_bytes()..) {
                let (key, _) = item.map_err(|e| self.write_error(e))?;
                batch.remove(key);
            }
            for entry in &write.entries {
                let bytes = codec().serialize(entry).map_err(|e| self.write_error(e))?;
                batch.insert(&entry.index.to_be_bytes(), bytes);
            }
            self.log
                .apply_batch(batch)
                .map_err(|e| self.write_error(e))?;
        }
        if let Some(hard_state) = hard_state {
            let bytes = codec()
                .serialize(&hard_state)
                .map_err(|e| self.write_error(e))?;
            self.meta
                .insert(HARD_STATE_KEY, bytes)
                .map_err(|e| self.write_error(e))?;
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(|e| self.write_error(e))?;
        if let Some(file) = &self.data_file {
            file.sync_data().map_err(|e| self.write_error(e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::Payload;

    fn entry(index: Index, term: u64) -> Entry {
        Entry {
            index,
            term,
            lamport: index,
            payload: Payload::Noop,
        }
    }

    #[test]
    fn survives_reopen_and_refuses_foreign_data() {
        let dir = std::env::temp_dir().join(format!("cs-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let (mut store, recovered) = Store::open(&dir, "c1", 1).unwrap();
            assert!(recovered.entries.is_empty());
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
        let (_, recovered) = Store::open(&dir, "c1", 1).unwrap();
        assert_eq!(recovered.hard_state.term, 2);
        assert_eq!(recovered.entries, vec![entry(1, 1), entry(2, 2)]);
        assert!(matches!(
            Store::open(&dir, "c1", 2),
            Err(StoreError::Foreign { .. })
        ));
        assert!(matches!(
            Store::open(&dir, "c2", 1),
            Err(StoreError::Foreign { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
