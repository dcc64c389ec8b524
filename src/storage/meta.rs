//! What the store keeps in sled: the hard state (term, vote, commit), the
//! data directory's identity, the configuration the replica started from,
//! the catch-up floor of a replica rebuilt by `node rebuild`, and whether
//! the store keeps a witness, and the format of the log's files. Values are
//! bincode (`codec.rs`) under fixed keys of sled's `meta` tree.
//!
//! Inserts are not synced; the store `flush`es sled explicitly whenever
//! what it put must be durable (identity, bootstrap, floor, log format),
//! and at checkpoints, which copy the hard state here from the log (the
//! log's own hard-state records make it durable between them). sled's own
//! flush stops at `sync_file_range`, so `flush` also fsyncs its data file.

use std::fs::File;
use std::path::{Path, PathBuf};

use bincode::Options;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{codec, DataIdentity, StoreError, StoredBootstrap};
use crate::raft::{HardState, LogPosition};

const IDENTITY_KEY: &[u8] = b"identity";
/// Present once the store keeps a witness file: from then on a missing
/// witness is damage, not a store written before witnesses existed.
const WITNESS_KEPT_KEY: &[u8] = b"witness_kept";
const HARD_STATE_KEY: &[u8] = b"hard_state";
/// Written once by `node rebuild` (`RebuildPlan::floor`); absent otherwise.
const CATCH_UP_FLOOR_KEY: &[u8] = b"catch_up_floor";
/// The configuration this replica started from (`StoredBootstrap`);
/// absent in stores written before membership lived in the log.
const BOOTSTRAP_KEY: &[u8] = b"bootstrap";
/// The format of the log's files (`LOG_FORMAT`); absent in data
/// directories of earlier versions.
const LOG_FORMAT_KEY: &[u8] = b"log_format";
/// Page cache for sled; its default of 1 GB is far more than a node needs.
const CACHE_BYTES: u64 = 32 << 20;

pub(super) struct Meta {
    dir: PathBuf,
    /// The database, for the log kept in it by earlier versions
    /// (`migration.rs`).
    pub(super) db: sled::Db,
    tree: sled::Tree,
    /// sled's data file, fsynced at every flush.
    data_file: Option<File>,
}

impl Meta {
    /// Opens sled in `dir`; `durable` false only for the unsafe no-sync
    /// mode (`unsynced.rs`), which turns off sled's background flush too.
    pub(super) fn open(dir: &Path, durable: bool) -> Result<Meta, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(CACHE_BYTES)
            .flush_every_ms(if durable { Some(500) } else { None })
            .open()
            .map_err(|e| open_error(dir, e))?;
        let tree = db.open_tree("meta").map_err(|e| open_error(dir, e))?;
        let data_file = File::open(dir.join("db")).ok();
        Ok(Meta {
            dir: dir.to_path_buf(),
            db,
            tree,
            data_file,
        })
    }

    /// The record stored under `key`, if any; `what` names it when it
    /// cannot be read.
    fn get<T: DeserializeOwned>(&self, key: &[u8], what: &str) -> Result<Option<T>, StoreError> {
        let Some(bytes) = self
            .tree
            .get(key)
            .map_err(|e| StoreError::corrupt(&self.dir, e.to_string()))?
        else {
            return Ok(None);
        };
        codec::options()
            .deserialize(&bytes)
            .map(Some)
            .map_err(|e| StoreError::corrupt(&self.dir, format!("{what}: {e}")))
    }

    /// Records `value` under `key`, unsynced.
    fn put<T: Serialize>(&self, key: &[u8], value: &T) -> Result<(), StoreError> {
        let bytes = codec::options()
            .serialize(value)
            .map_err(|e| StoreError::write(&self.dir, e))?;
        self.tree
            .insert(key, bytes)
            .map_err(|e| StoreError::write(&self.dir, e))?;
        Ok(())
    }

    pub(super) fn identity(&self) -> Result<Option<DataIdentity>, StoreError> {
        self.get(IDENTITY_KEY, "identity record")
    }

    pub(super) fn put_identity(&self, identity: &DataIdentity) -> Result<(), StoreError> {
        self.put(IDENTITY_KEY, identity)
    }

    /// The hard state; a store that never recorded one is at its start.
    pub(super) fn hard_state(&self) -> Result<HardState, StoreError> {
        Ok(self
            .get(HARD_STATE_KEY, "hard state record")?
            .unwrap_or_default())
    }

    pub(super) fn put_hard_state(&self, hard_state: &HardState) -> Result<(), StoreError> {
        self.put(HARD_STATE_KEY, hard_state)
    }

    pub(super) fn bootstrap(&self) -> Result<Option<StoredBootstrap>, StoreError> {
        self.get(BOOTSTRAP_KEY, "bootstrap configuration record")
    }

    pub(super) fn put_bootstrap(&self, bootstrap: &StoredBootstrap) -> Result<(), StoreError> {
        self.put(BOOTSTRAP_KEY, bootstrap)
    }

    pub(super) fn catch_up_floor(&self) -> Result<Option<LogPosition>, StoreError> {
        self.get(CATCH_UP_FLOOR_KEY, "catch-up floor record")
    }

    pub(super) fn put_catch_up_floor(&self, floor: &LogPosition) -> Result<(), StoreError> {
        self.put(CATCH_UP_FLOOR_KEY, floor)
    }

    /// The format the log's files are in, if recorded (`migration/`).
    pub(super) fn log_format(&self) -> Result<Option<u32>, StoreError> {
        self.get(LOG_FORMAT_KEY, "log format record")
    }

    pub(super) fn put_log_format(&self, format: u32) -> Result<(), StoreError> {
        self.put(LOG_FORMAT_KEY, &format)
    }

    /// Whether the store has recorded keeping a witness file.
    pub(super) fn keeps_witness(&self) -> Result<bool, StoreError> {
        Ok(self
            .tree
            .get(WITNESS_KEPT_KEY)
            .map_err(|e| StoreError::corrupt(&self.dir, e.to_string()))?
            .is_some())
    }

    /// Records, durably, that this store keeps a witness.
    pub(super) fn record_witness_kept(&self) -> Result<(), StoreError> {
        self.tree
            .insert(WITNESS_KEPT_KEY, &[1u8][..])
            .map_err(|e| StoreError::write(&self.dir, e))?;
        self.flush()
    }

    /// Flushes sled and fsyncs its data file.
    pub(super) fn flush(&self) -> Result<(), StoreError> {
        self.db
            .flush()
            .map_err(|e| StoreError::write(&self.dir, e))?;
        if let Some(file) = &self.data_file {
            file.sync_data()
                .map_err(|e| StoreError::write(&self.dir, e))?;
        }
        Ok(())
    }
}

fn open_error(dir: &Path, source: sled::Error) -> StoreError {
    match source {
        sled::Error::Corruption { .. } => StoreError::corrupt(dir, source.to_string()),
        error => StoreError::Open {
            dir: dir.to_path_buf(),
            error,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Meta {
        /// The bytes stored under `key` (the pinned-bytes test).
        pub(in crate::storage) fn raw(&self, key: &str) -> Option<Vec<u8>> {
            let key = match key {
                "identity" => IDENTITY_KEY,
                "hard state" => HARD_STATE_KEY,
                "bootstrap" => BOOTSTRAP_KEY,
                "witness kept" => WITNESS_KEPT_KEY,
                "catch-up floor" => CATCH_UP_FLOOR_KEY,
                "log format" => LOG_FORMAT_KEY,
                other => panic!("no key {other}"),
            };
            self.tree.get(key).unwrap().map(|bytes| bytes.to_vec())
        }

        /// Forgets the log's format, as data directories of earlier
        /// versions never recorded it.
        pub(in crate::storage) fn forget_log_format(&self) {
            self.tree.remove(LOG_FORMAT_KEY).unwrap();
        }

        /// Forgets that the store keeps a witness, as stores written before
        /// they recorded it.
        pub(in crate::storage) fn forget_witness_kept(&self) {
            self.tree.remove(WITNESS_KEPT_KEY).unwrap();
            self.db.flush().unwrap();
        }
    }
}
