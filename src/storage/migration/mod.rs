//! Data directories of earlier versions, upgraded on open to the current
//! format, in which the log's segments are its write-ahead log
//! (`segments.rs`, [`LOG_FORMAT`] recorded in sled):
//!
//! - up to e7fdae5: old segments (`log/*.seg`, `old_segments.rs`) synced
//!   only at checkpoints, with a write-ahead journal (`journal`,
//!   `journal.rs`) holding every write since;
//! - before segments: the log in sled's `log` tree, one key per entry (the
//!   index, 8 bytes big-endian) holding the entry as bincode, perhaps with
//!   a journal too.
//!
//! The upgrade writes a new log from the old one (the old segments or the
//! sled tree, then the journal's records since the last checkpoint, then
//! the hard state as the journal or sled last had it) and syncs it, while
//! the old files stay as they are. Once the store has passed its checks
//! (identity, witness), `finish` records the new format in sled, durably:
//! that is the moment the upgrade takes effect, and only then are the old
//! files removed. An upgrade cut short by a crash before it starts over
//! from the old files; one cut short after it only has old files left to
//! remove, which every open does. (Stores written before witnesses existed
//! are adopted by the witness check in `witness.rs`.)

pub mod journal;
pub mod old_segments;

use std::path::{Path, PathBuf};

use super::meta::Meta;
use super::segments::{SegmentLog, LOG_DIR};
use super::StoreError;
use crate::raft::{HardState, Index};

/// The format of the log's files this version writes.
pub(super) const LOG_FORMAT: u32 = 2;

/// The sled tree in which stores written before segments kept the log.
pub(super) const SLED_LOG_TREE: &str = "log";

/// An upgrade written but not yet in effect: what `finish` removes.
pub(super) struct Upgrade {
    old_files: Vec<PathBuf>,
}

/// Opens the log of the store in `dir`: the current format's as it is, or,
/// for a data directory of an earlier version, a new log written from the
/// old one, which takes effect at `finish`.
pub(super) fn open_log(
    dir: &Path,
    meta: &Meta,
) -> Result<(SegmentLog, Option<Upgrade>), StoreError> {
    let log_error = |error| StoreError::from_log(dir, error);
    let current = meta.log_format()?;
    if let Some(format) = current.filter(|format| *format != LOG_FORMAT) {
        return Err(StoreError::corrupt(
            dir,
            format!("its log is in format {format}, which this version does not know: a newer version wrote it"),
        ));
    }
    let old_files = old_files(dir)?;
    if current.is_some() || old_files.is_empty() && !has_sled_log(meta) {
        return Ok((SegmentLog::open(dir).map_err(log_error)?, None));
    }
    // The journal is read first: damage in it is refused before anything
    // is written.
    let journal_path = dir.join(journal::JOURNAL_FILE);
    let journaled = if journal_path.exists() {
        let (_, records) = journal::Journal::open(dir).map_err(|what| StoreError::Damaged {
            dir: dir.to_path_buf(),
            file: journal_path.clone(),
            what,
        })?;
        journal::collapse(records).map_err(|what| StoreError::Damaged {
            dir: dir.to_path_buf(),
            file: journal_path.clone(),
            what,
        })?
    } else {
        journal::Record::default()
    };
    let mut log = SegmentLog::create_empty(dir).map_err(log_error)?;
    if has_sled_log(meta) {
        move_sled_log(
            dir,
            meta,
            &mut log,
            journaled.log.as_ref().map(|(from, _)| *from),
        )?;
    } else {
        old_segments::read(dir, &mut |record| {
            let entries: Vec<Vec<u8>> = record.entries.iter().map(|e| e.to_vec()).collect();
            log.replace_from(record.from, &entries)
        })
        .map_err(log_error)?;
    }
    if let Some((from, entries)) = &journaled.log {
        log.replace_from(*from, entries).map_err(log_error)?;
    }
    let hard_state = match journaled.hard_state {
        Some(hard_state) => hard_state,
        None => meta.hard_state()?,
    };
    if hard_state != HardState::default() {
        log.put_hard_state(hard_state).map_err(log_error)?;
    }
    log.sync().map_err(log_error)?;
    tracing::info!(
        dir = %dir.display(),
        entries = log.last_index(),
        "wrote this data directory's log in the current format; the old files go once the store has passed its checks"
    );
    Ok((log, Some(Upgrade { old_files })))
}

/// Puts an upgrade into effect: records the new format, and the hard state
/// the store opened with, durably in sled; then removes the old files.
pub(super) fn finish(dir: &Path, meta: &Meta, upgrade: Option<Upgrade>) -> Result<(), StoreError> {
    if meta.log_format()? != Some(LOG_FORMAT) {
        meta.put_log_format(LOG_FORMAT)?;
        meta.flush()?;
    }
    let old_files = match upgrade {
        Some(upgrade) => upgrade.old_files,
        // Left by an upgrade that took effect just before a crash.
        None => old_files(dir)?,
    };
    if old_files.is_empty() && !has_sled_log(meta) {
        return Ok(());
    }
    for file in &old_files {
        match std::fs::remove_file(file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::write(dir, format!("{}: {e}", file.display()))),
        }
    }
    if has_sled_log(meta) {
        meta.db
            .drop_tree(SLED_LOG_TREE)
            .map_err(|e| StoreError::write(dir, e))?;
        meta.flush()?;
    }
    for synced in [dir.to_path_buf(), dir.join(LOG_DIR)] {
        if synced.exists() {
            std::fs::File::open(&synced)
                .and_then(|d| d.sync_all())
                .map_err(|e| StoreError::write(dir, format!("{}: {e}", synced.display())))?;
        }
    }
    tracing::info!(dir = %dir.display(), removed = old_files.len(), "removed the files of the log's earlier format");
    Ok(())
}

/// The files of an earlier format in `dir`: the journal and old segments.
fn old_files(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let mut files = old_segments::present(dir).map_err(|e| StoreError::from_log(dir, e))?;
    let journal = dir.join(journal::JOURNAL_FILE);
    if journal.exists() {
        files.push(journal);
    }
    Ok(files)
}

fn has_sled_log(meta: &Meta) -> bool {
    meta.db
        .tree_names()
        .iter()
        .any(|name| name == SLED_LOG_TREE.as_bytes())
}

/// Writes a log kept in sled, one key per entry (stores written before
/// segments), into `log`. `journal_from`: the journal, replayed next,
/// rewrites the log from there on.
fn move_sled_log(
    dir: &Path,
    meta: &Meta,
    log: &mut SegmentLog,
    journal_from: Option<Index>,
) -> Result<(), StoreError> {
    let corrupt = |what: String| StoreError::corrupt(dir, what);
    let log_error = |error| StoreError::from_log(dir, error);
    let old = meta
        .db
        .open_tree(SLED_LOG_TREE)
        .map_err(|e| corrupt(e.to_string()))?;
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
    Ok(())
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
            store.disk.meta.forget_log_format();
            store.disk.meta.flush().unwrap();
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
            store.disk.meta.forget_log_format();
            store.disk.meta.flush().unwrap();
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

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|at| u8::from_str_radix(&text[at..at + 2], 16).unwrap())
            .collect()
    }

    /// Writes a data directory as e7fdae5 left it: the exact bytes of its
    /// segment, position and witness (its pinned test recorded them: the
    /// log [1@1, 2@2] then 2 removed, hard state term 2, vote 1, commit 1,
    /// all checkpointed), sled's records, and a journal holding two writes
    /// since the checkpoint and a torn third.
    fn write_e7fdae5_directory(dir: &Path) {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir.join(LOG_DIR)).unwrap();
        std::fs::write(
            dir.join(LOG_DIR).join("00000000.seg"),
            hex("730000009ac8a3c00100000000000000020000001c000000010000000000000001000000000000000100000000000000000000004300000002000000000000000200000000000000090000000000000001000000070000000000000001000000000000000500000000000000616c696365020000000000000068690800000014d807270200000000000000"),
        )
        .unwrap();
        std::fs::write(
            dir.join(LOG_DIR).join(old_segments::POSITION_FILE),
            hex("43535031000000008b00000000000000ade15c87"),
        )
        .unwrap();
        std::fs::write(
            dir.join("witness"),
            hex("43535731020000000000000001000000000000000100000000000000010000000000000012821d0d"),
        )
        .unwrap();
        let meta = Meta::open(dir, true).unwrap();
        meta.put_identity(&crate::storage::DataIdentity {
            cluster_id: "c1".into(),
            node_id: 1,
        })
        .unwrap();
        meta.put_hard_state(&HardState {
            term: 2,
            vote: Some(1),
            commit: 1,
        })
        .unwrap();
        meta.record_witness_kept().unwrap();
        meta.flush().unwrap();
        drop(meta);
        let (mut journal, _) = journal::Journal::open(dir).unwrap();
        let encoded = |index, term| codec::encode_entry(&entry(index, term)).unwrap();
        journal.add(
            Some(HardState {
                term: 3,
                vote: Some(2),
                commit: 2,
            }),
            Some((2, &[encoded(2, 3)])),
        );
        journal.add(None, Some((3, &[encoded(3, 3)])));
        journal.sync().unwrap();
        drop(journal);
        let path = dir.join(journal::JOURNAL_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(b"CSJ2\x01\x02");
        std::fs::write(&path, bytes).unwrap();
    }

    fn old_files_left(dir: &Path) -> Vec<String> {
        let mut left: Vec<String> = std::fs::read_dir(dir.join(LOG_DIR))
            .unwrap()
            .map(|item| item.unwrap().file_name().to_string_lossy().to_string())
            .filter(|name| !name.ends_with(".wal"))
            .collect();
        if dir.join(journal::JOURNAL_FILE).exists() {
            left.push(journal::JOURNAL_FILE.into());
        }
        left.sort();
        left
    }

    #[test]
    fn a_directory_written_by_e7fdae5_opens_with_everything_in_the_new_format() {
        let dir = std::env::temp_dir().join(format!("cs-store-e7fdae5-{}", std::process::id()));
        write_e7fdae5_directory(&dir);
        let expected = vec![entry(1, 1), entry(2, 3), entry(3, 3)];
        let hard_state = HardState {
            term: 3,
            vote: Some(2),
            commit: 2,
        };
        for open in ["upgrade", "reopen"] {
            let (store, recovered) = reopen(&dir);
            assert_eq!(recovered.last_index, 3, "{open}");
            assert_eq!(recovered.hard_state, hard_state, "{open}");
            assert_eq!(store.entries(1, 10, 10).unwrap(), expected, "{open}");
            assert_eq!(store.disk.meta.log_format().unwrap(), Some(LOG_FORMAT));
            assert_eq!(old_files_left(&dir), Vec::<String>::new(), "{open}");
            drop(store);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_upgrade_cut_short_starts_over_or_finishes() {
        let dir = std::env::temp_dir().join(format!("cs-store-cut-upgrade-{}", std::process::id()));
        let expected = vec![entry(1, 1), entry(2, 3), entry(3, 3)];
        // Cut short before it took effect: the new log was written, the
        // old files are all there, and the next open starts over.
        write_e7fdae5_directory(&dir);
        let before = old_files_left(&dir);
        {
            let meta = Meta::open(&dir, true).unwrap();
            let (log, upgrade) = open_log(&dir, &meta).unwrap();
            assert!(upgrade.is_some());
            assert_eq!(log.last_index(), 3);
        }
        assert_eq!(old_files_left(&dir), before, "the old files were touched");
        let (store, _) = reopen(&dir);
        assert_eq!(store.entries(1, 10, 10).unwrap(), expected);
        drop(store);
        // Cut short after it took effect: old files left beside the new
        // log are removed, not read again.
        std::fs::write(dir.join(journal::JOURNAL_FILE), b"junk").unwrap();
        std::fs::write(dir.join(LOG_DIR).join("00000000.seg"), b"junk").unwrap();
        let (store, recovered) = reopen(&dir);
        assert_eq!(recovered.last_index, 3);
        assert_eq!(store.entries(1, 10, 10).unwrap(), expected);
        assert_eq!(old_files_left(&dir), Vec::<String>::new());
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn damage_in_an_old_directory_is_refused_and_the_files_left_as_found() {
        let dir = std::env::temp_dir().join(format!("cs-store-old-damage-{}", std::process::id()));
        write_e7fdae5_directory(&dir);
        let segment = dir.join(LOG_DIR).join("00000000.seg");
        let mut bytes = std::fs::read(&segment).unwrap();
        bytes[40] ^= 0xff;
        std::fs::write(&segment, &bytes).unwrap();
        let journal = std::fs::read(dir.join(journal::JOURNAL_FILE)).unwrap();
        match open_released(&dir, "c1", 1) {
            Err(StoreError::Damaged { file, what, .. }) => {
                assert_eq!(file, segment);
                assert!(
                    what.contains("offset 0") && what.contains("checksum"),
                    "{what}"
                );
            }
            Err(other) => panic!("unexpected error: {other}"),
            Ok(_) => panic!("a damaged old segment was accepted"),
        }
        assert_eq!(std::fs::read(&segment).unwrap(), bytes);
        assert_eq!(
            std::fs::read(dir.join(journal::JOURNAL_FILE)).unwrap(),
            journal
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
