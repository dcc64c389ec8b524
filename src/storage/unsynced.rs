//! Breaks durability on purpose: writes are acknowledged at once and
//! written seconds later, so a crash loses acknowledged writes. It exists
//! only so the chaos tests can show that their checker notices
//! acknowledged messages being lost (`CLUSTER_STORE_UNSAFE_SKIP_SYNC=1`,
//! `Store::open_without_sync_unsafely`). Never use it otherwise.
//!
//! A store in this mode keeps no witness (it would claim what was never
//! synced, or stop the node from restarting) and turns off sled's
//! background flush; the group commit of `commit.rs` never sees its writes.

use std::time::{Duration, Instant};

use super::commit::Durability;
use super::{Disk, StoreError};
use crate::raft::{HardState, Index, LogWrite};

/// How long acknowledged writes wait before they are applied and synced.
const DEFERRAL: Duration = Duration::from_secs(3);

pub(super) struct Unsynced {
    /// Acknowledged writes not yet applied, and when they were last applied.
    deferred: Vec<(Option<HardState>, Option<LogWrite>)>,
    last_applied: Instant,
    /// Staged since the last pretended sync, and the latest hard state
    /// among them.
    staged: bool,
    staged_hard_state: Option<HardState>,
    /// The commit index the last pretended sync claimed.
    synced_commit: Index,
}

impl Unsynced {
    pub(super) fn new() -> Unsynced {
        Unsynced {
            deferred: Vec::new(),
            last_applied: Instant::now(),
            staged: false,
            staged_hard_state: None,
            synced_commit: 0,
        }
    }
}

impl Durability for Unsynced {
    fn durable(&self) -> bool {
        false
    }

    fn stage(
        &mut self,
        disk: &mut Disk,
        writes: &[(Option<HardState>, Option<&LogWrite>)],
    ) -> Result<(), StoreError> {
        for (hard_state, write) in writes {
            self.staged_hard_state = (*hard_state).or(self.staged_hard_state);
            self.staged |= hard_state.is_some() || write.is_some();
        }
        // Acknowledge now, write seconds later: a crash in between loses
        // acknowledged entries.
        self.deferred
            .extend(writes.iter().map(|(hs, w)| (*hs, w.cloned())));
        if self.last_applied.elapsed() < DEFERRAL {
            return Ok(());
        }
        self.last_applied = Instant::now();
        for (hard_state, write) in std::mem::take(&mut self.deferred) {
            disk.apply(hard_state, write.as_ref())?;
        }
        disk.sync()
    }

    /// Pretends: nothing is synced here.
    fn sync_staged(&mut self, _disk: &mut Disk) -> Result<bool, StoreError> {
        if !std::mem::take(&mut self.staged) {
            return Ok(false);
        }
        if let Some(hs) = self.staged_hard_state.take() {
            self.synced_commit = hs.commit;
        }
        Ok(true)
    }

    fn has_staged(&self) -> bool {
        self.staged
    }

    fn synced_commit(&self, _disk: &Disk) -> Index {
        self.synced_commit
    }

    fn recovered(&mut self, commit: Index) {
        self.synced_commit = commit;
    }
}

#[cfg(test)]
mod tests {
    use crate::raft::{HardState, LogWrite};
    use crate::storage::tests::{entry, reopen};
    use crate::storage::Store;

    #[test]
    fn acknowledges_what_a_crash_then_loses() {
        let dir = std::env::temp_dir().join(format!("cs-store-unsynced-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (mut store, _) = Store::open_without_sync_unsafely(&dir, "c1", 1).unwrap();
        let commit = HardState {
            term: 1,
            vote: Some(1),
            commit: 2,
        };
        let append = LogWrite {
            from: 1,
            entries: vec![entry(1, 1), entry(2, 1)],
        };
        store.stage(&[(Some(commit), Some(&append))]).unwrap();
        assert!(store.has_staged());
        assert!(store.sync_staged().unwrap(), "it says it synced");
        assert_eq!(store.synced_commit(), 2);
        assert!(!store.has_staged());
        drop(store);
        let (_, recovered) = reopen(&dir);
        assert_eq!(recovered.last_index, 0, "the acknowledged entries are lost");
        assert_eq!(recovered.hard_state, HardState::default());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
