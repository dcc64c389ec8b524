//! The witness: a small file beside sled that records, after every sync,
//! how far the store had got (term, vote, last index, commit).
//!
//! sled takes a truncated or damaged data file for a torn write and
//! silently recovers to an earlier point, which for a Raft node means
//! forgetting entries it acknowledged or a vote it cast. A store that
//! opens behind its witness is reported as damaged, naming the file,
//! instead of serving a shorter history. sled records that the store keeps
//! a witness (`meta.rs`), so a witness deleted or emptied is damage too,
//! not a store written before witnesses existed.
//!
//! The witness is checked on open (`check_witness`, below), lowered
//! (synced) before a truncation and raised after each sync (`commit.rs`).
//! A store opened in the unsafe no-sync mode keeps none.
//!
//! The file is one record (`codec.rs`'s sequenced frame, sequence number
//! 0): `[magic "CSW2"][crc32][payload length 32][0][term][vote or 0][last
//! index][commit]`, numbers as u64 LE. Witnesses written up to e7fdae5 are
//! a sealed record, `[magic "CSW1"][the same four numbers][crc32]`, and are
//! still read; the next write replaces one.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::codec::{self, Reader, SealError};
use super::{segments, Disk, Recovered, StoreError};
use crate::raft::{HardState, Index};

pub(super) const WITNESS_FILE: &str = "witness";
const WITNESS_MAGIC: &[u8; 4] = b"CSW2";
/// The sealed record of witnesses written up to e7fdae5.
const OLD_WITNESS_MAGIC: &[u8; 4] = b"CSW1";
/// Term, vote, last index and commit: four u64s.
const WITNESS_FIELDS: usize = 32;

/// How far the store had got at its last sync.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Witness {
    pub(super) term: u64,
    /// 0 for no vote (node ids start at 1).
    pub(super) vote: u64,
    pub(super) last_index: Index,
    pub(super) commit: Index,
}

impl Witness {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut fields = Vec::with_capacity(WITNESS_FIELDS);
        for value in [self.term, self.vote, self.last_index, self.commit] {
            codec::put_u64(&mut fields, value);
        }
        let mut bytes = Vec::with_capacity(codec::SEQUENCED_HEADER + WITNESS_FIELDS);
        codec::put_sequenced(&mut bytes, WITNESS_MAGIC, 0, &fields);
        bytes
    }

    pub(super) fn decode(bytes: &[u8]) -> Result<Witness, String> {
        let not_one = || format!("{} bytes, not a cluster-store witness", bytes.len());
        let mut fields = if bytes.starts_with(OLD_WITNESS_MAGIC) {
            codec::unseal(bytes, OLD_WITNESS_MAGIC, WITNESS_FIELDS).map_err(
                |error| match error {
                    SealError::Shape => not_one(),
                    SealError::Checksum => "checksum mismatch".to_string(),
                },
            )?
        } else {
            let frame = codec::sequenced_at(bytes, WITNESS_MAGIC, WITNESS_FIELDS..=WITNESS_FIELDS)
                .and_then(Result::ok)
                .filter(|frame| frame.len() == bytes.len() && frame.seq == 0)
                .ok_or_else(not_one)?;
            if !frame.intact() {
                return Err("checksum mismatch".to_string());
            }
            Reader::new(frame.payload)
        };
        Ok(Witness {
            term: fields.u64()?,
            vote: fields.u64()?,
            last_index: fields.u64()?,
            commit: fields.u64()?,
        })
    }

    /// What a store that recovered `hard_state` and a log up to
    /// `last_index` lost of what this witness says was synced, if anything.
    pub(super) fn lost(&self, hard_state: &HardState, last_index: Index) -> Option<String> {
        if hard_state.term < self.term {
            Some(format!(
                "it holds term {} but term {} was synced",
                hard_state.term, self.term
            ))
        } else if hard_state.term == self.term
            && self.vote != 0
            && hard_state.vote != Some(self.vote)
        {
            Some(format!(
                "it lost the vote for node {} in term {}",
                self.vote, self.term
            ))
        } else if last_index < self.last_index {
            Some(format!(
                "it holds log entries up to index {} but entries up to {} were synced",
                last_index, self.last_index
            ))
        } else if hard_state.commit < self.commit {
            Some(format!(
                "it records commit index {} but {} was synced",
                hard_state.commit, self.commit
            ))
        } else {
            None
        }
    }
}

/// The witness file and what it says. Until it is opened (`read`,
/// `create`), writing it does nothing: a store opened without its checks
/// keeps no witness.
pub(super) struct WitnessFile {
    path: PathBuf,
    file: Option<File>,
    /// What the file says, or is about to.
    pub(super) claims: Witness,
}

impl WitnessFile {
    pub(super) fn unopened(dir: &Path) -> WitnessFile {
        WitnessFile {
            path: dir.join(WITNESS_FILE),
            file: None,
            claims: Witness::default(),
        }
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the file and reads it: `None` if there is none. The
    /// claims stay as they are until `adopt`.
    pub(super) fn read(&mut self) -> Result<Option<Vec<u8>>, String> {
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
        {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", self.path.display())),
        };
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut &file, &mut bytes)
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        self.file = Some(file);
        Ok(Some(bytes))
    }

    /// Takes `claims`, read from the file, as what it says.
    pub(super) fn adopt(&mut self, claims: Witness) {
        self.claims = claims;
    }

    /// Creates the witness of a store that has none yet (new, or written
    /// before witnesses existed), claiming nothing until the next sync.
    /// Its contents and its name in the directory are synced, so the store
    /// can record keeping it once this returns.
    pub(super) fn create(&mut self, dir: &Path) -> Result<(), String> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&self.path)
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        self.file = Some(file);
        self.claims = Witness::default();
        self.write(true)?;
        File::open(dir)
            .and_then(|dir| dir.sync_all())
            .map_err(|e| format!("{}: {e}", dir.display()))
    }

    /// Records the claims; `sync` when they must survive a power loss
    /// before anything else happens (votes, terms, truncations).
    pub(super) fn write(&self, sync: bool) -> Result<(), String> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let bytes = self.claims.encode();
        file.write_all_at(&bytes, 0)
            .and_then(|_| if sync { file.sync_data() } else { Ok(()) })
            .map_err(|e| format!("{}: {e}", self.path.display()))
    }
}

impl Disk {
    /// On open: compares what sled and the segments recovered with what
    /// the witness says was synced, and refuses a store that lost any of
    /// it, naming the file most likely at fault.
    pub(super) fn check_witness(&mut self, recovered: &Recovered) -> Result<(), StoreError> {
        let kept = self.meta.keeps_witness()?;
        let bytes = match self
            .witness
            .read()
            .map_err(|e| StoreError::write(&self.dir, e))?
        {
            Some(bytes) => bytes,
            None if kept => {
                return Err(self.witness_damaged(
                    "it is missing, yet this store has kept one: without it nothing shows \
                     whether the store lost acknowledged entries or a vote",
                ))
            }
            // A new store, or one written before witnesses existed.
            None => return self.create_witness(),
        };
        if bytes.is_empty() {
            if kept {
                return Err(self.witness_damaged("it is empty, yet this store has kept one"));
            }
            // Created, never written, by a version that created it empty.
            return self.create_witness();
        }
        let witness = Witness::decode(&bytes).map_err(|what| self.witness_damaged(what))?;
        if let Some(what) = witness.lost(&recovered.hard_state, self.last_index) {
            // A log cut short lost its last writes; otherwise the log lives
            // in the segments, everything else in sled.
            let (file, what) = if let Some(torn) = self.log.torn_tail() {
                (
                    torn.file.clone(),
                    format!("{what}, and the log ends in a torn record"),
                )
            } else if self.last_index < witness.last_index {
                (self.dir.join(segments::LOG_DIR), what)
            } else {
                (self.dir.join("db"), what)
            };
            return Err(StoreError::Damaged {
                dir: self.dir.clone(),
                file,
                what: format!(
                    "the store recovered an earlier state than this node had synced: {what}"
                ),
            });
        }
        self.witness.adopt(witness);
        if !kept {
            // A witness written before stores recorded keeping one.
            self.meta.record_witness_kept()?;
        }
        Ok(())
    }

    /// After the checks: makes what was recovered durable and has the
    /// witness claim it. A process killed between a sync of the log and
    /// the witness's write, or while a new commit index lingered unsynced,
    /// leaves the log ahead of the witness (the page cache kept the
    /// writes). Left so, the node would report the witness's older commit
    /// as synced until some later write moved it: on an idle cluster,
    /// never, though its log and the leader agree.
    pub(super) fn claim_recovered(&mut self, recovered: &Recovered) -> Result<(), StoreError> {
        let hs = &recovered.hard_state;
        let recovered_claims = Witness {
            term: hs.term,
            vote: hs.vote.unwrap_or(0),
            commit: hs.commit,
            last_index: recovered.last_index,
        };
        if self.witness.claims == recovered_claims {
            return Ok(());
        }
        self.log
            .sync_written()
            .map_err(|e| StoreError::from_log(&self.dir, e))?;
        self.witness.claims = recovered_claims;
        self.write_witness(true)
    }

    fn witness_damaged(&self, what: impl Into<String>) -> StoreError {
        StoreError::Damaged {
            dir: self.dir.clone(),
            file: self.witness.path().to_path_buf(),
            what: what.into(),
        }
    }

    /// Creates the witness of a store that has none yet, then records
    /// keeping it: a crash can never lose a witness the store says it keeps.
    fn create_witness(&mut self) -> Result<(), StoreError> {
        self.witness
            .create(&self.dir)
            .map_err(|e| StoreError::write(&self.dir, e))?;
        self.meta.record_witness_kept()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::LogWrite;
    use crate::storage::tests::{entry, open_released, reopen};
    use crate::storage::Store;

    #[test]
    fn a_missing_or_empty_witness_is_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("cs-store-witness-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let (mut store, _) = Store::open(&dir, "c1", 1).unwrap();
            let hs = HardState {
                term: 1,
                vote: Some(1),
                commit: 0,
            };
            let write = LogWrite {
                from: 1,
                entries: vec![entry(1, 1)],
            };
            store.write(Some(hs), Some(&write)).unwrap();
        }
        let witness = dir.join(WITNESS_FILE);
        let saved = std::fs::read(&witness).unwrap();
        std::fs::remove_file(&witness).unwrap();
        for (what, contents) in [("missing", None), ("empty", Some(&b""[..]))] {
            if let Some(contents) = contents {
                std::fs::write(&witness, contents).unwrap();
            }
            let error = match open_released(&dir, "c1", 1) {
                Ok(_) => panic!("a store with its witness {what} opened"),
                Err(error) => error,
            };
            let StoreError::Damaged { file, .. } = &error else {
                panic!("unexpected error: {error}")
            };
            assert_eq!(file, &witness);
            let message = error.to_string();
            assert!(
                message.contains(what) && message.contains("node rebuild"),
                "{message}"
            );
            if contents.is_none() {
                assert!(!witness.exists(), "the refused open created a new witness");
            }
        }
        std::fs::write(&witness, &saved).unwrap();
        let (store, recovered) = reopen(&dir);
        assert_eq!(recovered.last_index, 1);
        // A store from before stores recorded keeping a witness, and
        // without one: it opens, and keeps a witness from then on.
        store.disk.meta.forget_witness_kept();
        drop(store);
        std::fs::remove_file(&witness).unwrap();
        let (store, recovered) = reopen(&dir);
        assert_eq!(recovered.last_index, 1);
        drop(store);
        assert!(witness.exists());
        std::fs::remove_file(&witness).unwrap();
        assert!(matches!(
            open_released(&dir, "c1", 1),
            Err(StoreError::Damaged { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
