//! How writes become durable: staging, group commit and checkpoints.
//!
//! `stage` appends writes to the log, unsynced; `sync_staged` makes
//! everything staged since the last sync durable with one `fdatasync` of
//! the log's active segment: one sync for many writes, that is group
//! commit. The witness is lowered (synced) before a truncation and raised
//! only after a sync, so it never claims more than the store holds. Every
//! `CHECKPOINT_BYTES` of log, a checkpoint copies the hard state into sled
//! and flushes it.
//!
//! The store delegates staging and syncing to a [`Durability`]:
//! [`GroupCommit`] here, or the unsafe no-sync mode of `unsynced.rs`.

use super::{codec, Disk, StoreError};
use crate::raft::{HardState, Index, LogWrite};

/// Log bytes written between checkpoints (a flush of sled).
const CHECKPOINT_BYTES: u64 = 16 << 20;

/// When staged writes reach the disk.
pub(super) trait Durability: Send {
    /// Whether the store keeps the records that make a crash safe: sled
    /// flushed in the background, and the witness checked and written.
    /// False only for the unsafe no-sync mode.
    fn durable(&self) -> bool {
        true
    }

    /// Applies writes without syncing them: the next sync covers them.
    fn stage(
        &mut self,
        disk: &mut Disk,
        writes: &[(Option<HardState>, Option<&LogWrite>)],
    ) -> Result<(), StoreError>;

    /// Makes everything staged durable with one sync, if anything is
    /// staged; says whether it synced.
    fn sync_staged(&mut self, disk: &mut Disk) -> Result<bool, StoreError>;

    /// Whether writes are applied but not yet synced.
    fn has_staged(&self) -> bool;

    /// The commit index the last sync made durable.
    fn synced_commit(&self, disk: &Disk) -> Index;

    /// Told the commit index the store recovered on open (the witness,
    /// where kept, already claims it).
    fn recovered(&mut self, _commit: Index) {}
}

/// The store's durability: every write staged since the last sync made
/// durable by one sync of the log.
#[derive(Default)]
pub(super) struct GroupCommit {
    /// Applied since the last sync, and the latest hard state among them.
    staged: bool,
    staged_hard_state: Option<HardState>,
    /// Test hook: the process kills itself (SIGKILL) right after the sync
    /// that makes a commit index at least this durable, before the witness
    /// claims it (`Store::open_crashing_before_claiming`).
    pub(super) crash_before_claiming: Option<Index>,
}

impl Durability for GroupCommit {
    fn stage(
        &mut self,
        disk: &mut Disk,
        writes: &[(Option<HardState>, Option<&LogWrite>)],
    ) -> Result<(), StoreError> {
        for (hard_state, write) in writes {
            // A truncation may shorten the log: lower the witness first, and
            // durably, so it never claims more than the store holds.
            if let Some(write) = write {
                if write.from <= disk.last_index {
                    let claims = &mut disk.witness.claims;
                    claims.last_index = claims.last_index.min(write.from.saturating_sub(1));
                    disk.write_witness(true)?;
                }
            }
            disk.apply(*hard_state, *write)?;
            if let Some(write) = write {
                disk.last_index = write.from.saturating_sub(1) + write.entries.len() as Index;
            }
            self.staged_hard_state = (*hard_state).or(self.staged_hard_state);
            self.staged |= hard_state.is_some() || write.is_some();
        }
        Ok(())
    }

    fn sync_staged(&mut self, disk: &mut Disk) -> Result<bool, StoreError> {
        if !std::mem::take(&mut self.staged) {
            return Ok(false);
        }
        disk.sync()?;
        if let (Some(at), Some(hs)) = (self.crash_before_claiming, self.staged_hard_state) {
            if hs.commit >= at {
                tracing::error!(
                    commit = hs.commit,
                    "test hook: killing this process between the log's sync and the witness"
                );
                // SAFETY: raise only sends this process a signal; SIGKILL
                // ends it at once, as `kill -9` would.
                unsafe { libc::raise(libc::SIGKILL) };
            }
        }
        // The witness may only claim what is now durable.
        let claims = &mut disk.witness.claims;
        let mut vote_changed = false;
        if let Some(hs) = self.staged_hard_state.take() {
            let vote = hs.vote.unwrap_or(0);
            vote_changed = hs.term != claims.term || vote != claims.vote;
            claims.term = hs.term;
            claims.vote = vote;
            claims.commit = hs.commit;
        }
        claims.last_index = disk.last_index;
        // Entries are durable in the log already; the witness only has to
        // outlive a crash of this process (the page cache does that), except
        // for votes, which are synced because they are rare and precious.
        disk.write_witness(vote_changed)?;
        Ok(true)
    }

    fn has_staged(&self) -> bool {
        self.staged
    }

    fn synced_commit(&self, disk: &Disk) -> Index {
        disk.witness.claims.commit
    }
}

impl Disk {
    /// Appends a write to the log (unsynced, until `sync`): its entries,
    /// then its hard state, so a torn write never keeps a commit index
    /// without the entries it covers.
    pub(super) fn apply(
        &mut self,
        hard_state: Option<HardState>,
        write: Option<&LogWrite>,
    ) -> Result<(), StoreError> {
        if let Some(write) = write {
            let mut encoded = Vec::new();
            let ranges = codec::encode_entries(&write.entries, &mut encoded)
                .map_err(|e| StoreError::write(&self.dir, e))?;
            let entries: Vec<&[u8]> = ranges.into_iter().map(|r| &encoded[r]).collect();
            self.log
                .replace_from(write.from, &entries)
                .map_err(|e| StoreError::from_log(&self.dir, e))?;
        }
        if let Some(hard_state) = hard_state {
            self.log
                .put_hard_state(hard_state)
                .map_err(|e| StoreError::from_log(&self.dir, e))?;
            self.hard_state = hard_state;
        }
        Ok(())
    }

    /// Makes every write applied so far durable: one sync of the log, and
    /// a checkpoint when enough has been written since the last.
    pub(super) fn sync(&mut self) -> Result<(), StoreError> {
        self.log
            .sync()
            .map_err(|e| StoreError::from_log(&self.dir, e))?;
        if self.log.appended() - self.checkpointed > CHECKPOINT_BYTES {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Records the witness's claims; `sync` when they must survive a power
    /// loss before anything else happens (votes, terms, truncations).
    pub(super) fn write_witness(&mut self, sync: bool) -> Result<(), StoreError> {
        self.witness
            .write(sync)
            .map_err(|e| StoreError::write(&self.dir, e))
    }

    /// Copies the hard state into sled and flushes it, with anything else
    /// put there. Only a hard state the log holds durably is copied, so
    /// sled never runs ahead of the log by more than a torn write.
    pub(super) fn checkpoint(&mut self) -> Result<(), StoreError> {
        self.meta.put_hard_state(&self.hard_state)?;
        self.meta.flush()?;
        self.checkpointed = self.log.appended();
        Ok(())
    }
}
