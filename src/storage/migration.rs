//! Data directories of earlier versions: before segments, the log lived in
//! sled's `log` tree, one key per entry (the index, 8 bytes big-endian)
//! holding the entry as bincode. Opening such a store moves the log into
//! segments (`move_sled_log`); nothing else reads that tree.
//!
//! (Journals written before their records carried a magic are read by
//! `journal.rs`; stores written before witnesses existed are adopted by the
//! witness check in `mod.rs`.)

use std::path::Path;

use super::meta::Meta;
use super::segments::SegmentLog;
use super::StoreError;
use crate::raft::Index;

/// The sled tree in which stores written before segments kept the log.
pub(super) const SLED_LOG_TREE: &str = "log";

/// Moves a log kept in sled, one key per entry (stores written before
/// segments), into segments, then drops the sled tree. A move cut short
/// by a crash starts over on the next open: the tree is dropped last.
/// `journal_from`: the journal, replayed next, rewrites the log from
/// there on.
pub(super) fn move_sled_log(
    dir: &Path,
    meta: &Meta,
    log: &mut SegmentLog,
    journal_from: Option<Index>,
) -> Result<(), StoreError> {
    let names = meta.db.tree_names();
    if !names.iter().any(|n| n == SLED_LOG_TREE.as_bytes()) {
        return Ok(());
    }
    let corrupt = |what: String| StoreError::corrupt(dir, what);
    let log_error = |error| StoreError::from_log(dir, error);
    let old = meta
        .db
        .open_tree(SLED_LOG_TREE)
        .map_err(|e| corrupt(e.to_string()))?;
    log.clear().map_err(log_error)?;
    let mut pending: Vec<Vec<u8>> = Vec::new();
    let mut next = 1;
    for item in old.iter() {
        let (key, value) = item.map_err(|e| corrupt(e.to_string()))?;
        let index = index_of(&key).map_err(corrupt)?;
        if index != next {
            // A crash in the middle of a write can leave a gap, which
            // the journal, replayed next, fills; any other gap is
            // damage, and the tree stays as it is.
            if journal_from.is_none_or(|from| from > next) {
                return Err(corrupt(format!("log entry {next} missing (found {index})")));
            }
            tracing::warn!(
                dir = %dir.display(),
                "the log kept in sled skips from {} to {index}; moving what precedes the gap",
                next - 1
            );
            break;
        }
        pending.push(value.to_vec());
        next += 1;
        if pending.len() == 1024 {
            log.replace_from(next - 1024, &pending).map_err(log_error)?;
            pending.clear();
        }
    }
    if !pending.is_empty() {
        log.replace_from(next - pending.len() as Index, &pending)
            .map_err(log_error)?;
    }
    log.checkpoint().map_err(log_error)?;
    tracing::info!(
        dir = %dir.display(),
        entries = next - 1,
        "moved the log from sled into segment files"
    );
    meta.db
        .drop_tree(SLED_LOG_TREE)
        .map_err(|e| StoreError::write(dir, e))?;
    meta.flush()
}

/// The index a log key names (8 bytes, big-endian).
fn index_of(key: &[u8]) -> Result<Index, String> {
    let key: [u8; 8] = key
        .try_into()
        .map_err(|_| format!("log key of {} bytes", key.len()))?;
    Ok(Index::from_be_bytes(key))
}

#[cfg(test)]
mod tests {
    use bincode::Options;

    use super::*;
    use crate::raft::HardState;
    use crate::storage::codec;
    use crate::storage::tests::{entry, open_released, released, reopen};
    use crate::storage::Store;

    #[test]
    fn moves_a_log_kept_in_sled_into_segments() {
        let dir = std::env::temp_dir().join(format!("cs-store-convert-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            // A store as versions before chunks left it: identity, hard
            // state and one sled key per entry, all flushed.
            let (mut store, _) = Store::open(&dir, "c1", 1).unwrap();
            let hs = HardState {
                term: 1,
                vote: Some(1),
                commit: 2000,
            };
            store.write(Some(hs), None).unwrap();
            let old = store.disk.meta.db.open_tree(SLED_LOG_TREE).unwrap();
            for index in 1..=2500u64 {
                old.insert(
                    index.to_be_bytes(),
                    codec::options().serialize(&entry(index, 1)).unwrap(),
                )
                .unwrap();
            }
            store.disk.checkpoint().unwrap();
        }
        let (store, recovered) = reopen(&dir);
        assert_eq!(recovered.last_index, 2500);
        assert_eq!(recovered.hard_state.commit, 2000);
        assert_eq!(store.verify().unwrap(), 2500);
        assert_eq!(
            store.entries(1020, 1030, 100).unwrap(),
            (1020..=1030).map(|i| entry(i, 1)).collect::<Vec<_>>()
        );
        assert!(!store
            .disk
            .meta
            .db
            .tree_names()
            .iter()
            .any(|n| n == SLED_LOG_TREE.as_bytes()));
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_gap_in_a_log_kept_in_sled_is_refused_and_the_tree_kept() {
        let dir = std::env::temp_dir().join(format!("cs-store-gap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let (mut store, _) = Store::open(&dir, "c1", 1).unwrap();
            let old = store.disk.meta.db.open_tree(SLED_LOG_TREE).unwrap();
            for index in (1..=10u64).chain(15..=20) {
                old.insert(
                    index.to_be_bytes(),
                    codec::options().serialize(&entry(index, 1)).unwrap(),
                )
                .unwrap();
            }
            store.disk.checkpoint().unwrap();
        }
        match open_released(&dir, "c1", 1) {
            Err(StoreError::Corrupt { what, .. }) => {
                assert!(what.contains("log entry 11 missing"), "{what}")
            }
            Err(other) => panic!("unexpected error: {other}"),
            Ok(_) => panic!("a log with a gap was accepted"),
        }
        let db = released(|| sled::open(&dir)).unwrap();
        assert_eq!(
            db.open_tree(SLED_LOG_TREE).unwrap().len(),
            16,
            "the tree is kept"
        );
        drop(db);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
