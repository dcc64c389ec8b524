//! The store's write-ahead journal. Every write batch is appended here and
//! made durable with one `fdatasync` of this small file; the log's segments
//! and sled receive the same changes unsynced, and are synced only at
//! checkpoints, after which the journal starts over. On open, the records
//! since the last checkpoint are applied to them again.
//!
//! Why not sync them every time: sled's flush hands the buffer to its I/O
//! thread pool (waking every idle thread in it), calls `sync_file_range`,
//! and still needs an fsync of its data file for the disk cache; with the
//! segments that would be two or three syncs per write instead of one.
//!
//! A record is `[payload length: u32 LE][crc32 of payload: u32 LE][payload]`;
//! the payload is a flags byte, then the hard state (term, vote or 0,
//! commit) if flag 1, then if flag 2 the log change: `from`, an entry
//! count, and each stored entry as length-prefixed bytes. Applying a log
//! change removes every entry from `from` on and inserts the new ones, so
//! replaying records over any state the store recovered (a prefix of them
//! applied) ends in the same state.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::raft::{HardState, Index};

pub const JOURNAL_FILE: &str = "journal";
const HAS_HARD_STATE: u8 = 1;
const HAS_LOG: u8 = 2;
/// Larger than any write batch the node produces; a length above it is
/// damage, not a record.
const MAX_RECORD: usize = 256 << 20;

/// One write batch as journaled.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record {
    pub hard_state: Option<HardState>,
    /// Entries from `.0` on are replaced by `.1` (encoded as the log stores them).
    pub log: Option<(Index, Vec<Vec<u8>>)>,
}

pub struct Journal {
    path: PathBuf,
    file: File,
    /// Bytes durable in the file.
    len: u64,
    /// Records added since the last sync.
    pending: Vec<u8>,
}

impl Journal {
    /// Opens (or creates) the journal in `dir` and reads its records. A
    /// torn last record (a crash during its write) ends the journal; a
    /// damaged record with more after it is an error.
    pub fn open(dir: &Path) -> Result<(Journal, Vec<Record>), String> {
        let path = dir.join(JOURNAL_FILE);
        let created = !path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if created {
            // The new name must survive a crash as well as its contents.
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let (records, valid) = decode(&bytes)?;
        if valid < bytes.len() {
            // Drop the torn tail, or records written after it would be
            // followed by its leftovers.
            file.set_len(valid as u64)
                .and_then(|_| file.sync_data())
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok((
            Journal {
                path,
                file,
                len: valid as u64,
                pending: Vec::new(),
            },
            records,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes in the journal since the last checkpoint.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0 && self.pending.is_empty()
    }

    /// Queues a record; `sync` makes it durable.
    pub fn add(&mut self, hard_state: Option<HardState>, log: Option<(Index, &[Vec<u8>])>) {
        let mut payload = Vec::new();
        let flags = if hard_state.is_some() {
            HAS_HARD_STATE
        } else {
            0
        } | if log.is_some() { HAS_LOG } else { 0 };
        payload.push(flags);
        if let Some(hs) = hard_state {
            for value in [hs.term, hs.vote.unwrap_or(0), hs.commit] {
                payload.extend_from_slice(&value.to_le_bytes());
            }
        }
        if let Some((from, entries)) = log {
            payload.extend_from_slice(&from.to_le_bytes());
            payload.extend_from_slice(&(entries.len() as u32).to_le_bytes());
            for entry in entries {
                payload.extend_from_slice(&(entry.len() as u32).to_le_bytes());
                payload.extend_from_slice(entry);
            }
        }
        self.pending
            .extend_from_slice(&(payload.len() as u32).to_le_bytes());
        self.pending
            .extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        self.pending.extend_from_slice(&payload);
    }

    /// Writes the queued records and syncs them: one `fdatasync`.
    pub fn sync(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.file.write_all_at(&self.pending, self.len)?;
        self.file.sync_data()?;
        self.len += self.pending.len() as u64;
        self.pending.clear();
        Ok(())
    }

    /// Starts over once everything journaled is durable in the store.
    pub fn reset(&mut self) -> std::io::Result<()> {
        self.file.set_len(0)?;
        self.file.sync_data()?;
        self.len = 0;
        Ok(())
    }
}

/// The net effect of `records`, as one change: the last hard state, and
/// the log from the lowest `from` on. (Applying them one by one over a
/// store that already holds their entries would rewrite every later entry
/// once per record.)
pub fn collapse(records: Vec<Record>) -> Result<Record, String> {
    let mut hard_state = None;
    let mut log: Option<(Index, Vec<Vec<u8>>)> = None;
    for (n, record) in records.into_iter().enumerate() {
        hard_state = record.hard_state.or(hard_state);
        let Some((from, entries)) = record.log else {
            continue;
        };
        match &mut log {
            Some((start, tail)) if from >= *start => {
                let keep = usize::try_from(from - *start).unwrap_or(usize::MAX);
                if keep > tail.len() {
                    return Err(format!(
                        "record {} writes from index {from}, past the end of the log ({})",
                        n + 1,
                        *start + tail.len() as Index
                    ));
                }
                tail.truncate(keep);
                tail.extend(entries);
            }
            _ => log = Some((from, entries)),
        }
    }
    Ok(Record { hard_state, log })
}

/// Parses journal bytes: the records, and how many bytes they span. A bad
/// record ends the journal (a write torn by a crash, never acknowledged),
/// unless an intact record follows it: then the file was damaged after it
/// was written, and acknowledged writes may be lost. Public for the fuzz
/// targets and property tests.
pub fn decode(bytes: &[u8]) -> Result<(Vec<Record>, usize), String> {
    let mut records = Vec::new();
    let mut at = 0;
    while let Some((parsed, end)) = record_at(bytes, at) {
        match parsed {
            Ok(record) => records.push(record),
            Err(what) => {
                if matches!(record_at(bytes, end), Some((Ok(_), _))) {
                    return Err(format!(
                        "record {} at byte {at} is damaged ({what}) and intact records follow",
                        records.len() + 1
                    ));
                }
                break;
            }
        }
        at = end;
    }
    Ok((records, at))
}

/// The record starting at `at` and where it ends; `None` when its header
/// or body runs past the end of the file (a torn last write).
fn record_at(bytes: &[u8], at: usize) -> Option<(Result<Record, String>, usize)> {
    let header = bytes.get(at..at.checked_add(8)?)?;
    let len = u32::from_le_bytes(word(&header[..4])) as usize;
    let crc = u32::from_le_bytes(word(&header[4..]));
    if len > MAX_RECORD {
        return None;
    }
    let end = at + 8 + len;
    let payload = bytes.get(at + 8..end)?;
    let parsed = if crc32fast::hash(payload) == crc {
        decode_payload(payload)
    } else {
        Err("checksum mismatch".to_string())
    };
    Some((parsed, end))
}

fn word(bytes: &[u8]) -> [u8; 4] {
    let mut word = [0u8; 4];
    word.copy_from_slice(bytes);
    word
}

fn decode_payload(payload: &[u8]) -> Result<Record, String> {
    let mut reader = Reader { bytes: payload };
    let flags = reader.take(1)?[0];
    if flags & !(HAS_HARD_STATE | HAS_LOG) != 0 {
        return Err(format!("unknown flags {flags:#x}"));
    }
    let mut record = Record::default();
    if flags & HAS_HARD_STATE != 0 {
        let term = reader.u64()?;
        let vote = reader.u64()?;
        let commit = reader.u64()?;
        record.hard_state = Some(HardState {
            term,
            vote: (vote != 0).then_some(vote),
            commit,
        });
    }
    if flags & HAS_LOG != 0 {
        let from = reader.u64()?;
        let count = reader.u32()? as usize;
        let mut entries = Vec::with_capacity(count.min(reader.bytes.len() / 4));
        for _ in 0..count {
            let len = reader.u32()? as usize;
            entries.push(reader.take(len)?.to_vec());
        }
        record.log = Some((from, entries));
    }
    if !reader.bytes.is_empty() {
        return Err(format!("{} trailing bytes", reader.bytes.len()));
    }
    Ok(record)
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.bytes.len() < n {
            return Err(format!("{n} bytes wanted, {} left", self.bytes.len()));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(word(self.take(4)?)))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let mut word = [0u8; 8];
        word.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(word))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cs-journal-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn hs(term: u64) -> HardState {
        HardState {
            term,
            vote: Some(2),
            commit: term * 10,
        }
    }

    #[test]
    fn records_survive_reopen_and_reset() {
        let dir = dir("reopen");
        let (mut journal, records) = Journal::open(&dir).unwrap();
        assert!(records.is_empty());
        let entries = vec![b"one".to_vec(), b"two".to_vec()];
        journal.add(Some(hs(1)), Some((5, &entries)));
        journal.add(None, Some((6, &[])));
        journal.sync().unwrap();
        journal.add(Some(hs(2)), None);
        journal.sync().unwrap();
        drop(journal);
        let (mut journal, records) = Journal::open(&dir).unwrap();
        assert_eq!(
            records,
            vec![
                Record {
                    hard_state: Some(hs(1)),
                    log: Some((5, entries.clone())),
                },
                Record {
                    hard_state: None,
                    log: Some((6, vec![])),
                },
                Record {
                    hard_state: Some(hs(2)),
                    log: None,
                },
            ]
        );
        journal.reset().unwrap();
        drop(journal);
        let (_, records) = Journal::open(&dir).unwrap();
        assert!(records.is_empty());
    }

    #[test]
    fn records_collapse_to_their_net_effect() {
        let bytes = |b: u8| vec![b];
        let records = vec![
            Record {
                hard_state: Some(hs(1)),
                log: Some((5, vec![bytes(5), bytes(6), bytes(7)])),
            },
            Record {
                hard_state: None,
                log: Some((8, vec![bytes(8)])),
            },
            // A new leader replaces 7 and 8.
            Record {
                hard_state: Some(hs(2)),
                log: Some((7, vec![bytes(70)])),
            },
            Record {
                hard_state: None,
                log: None,
            },
        ];
        assert_eq!(
            collapse(records).unwrap(),
            Record {
                hard_state: Some(hs(2)),
                log: Some((5, vec![bytes(5), bytes(6), bytes(70)])),
            }
        );
        // A write below the first one replaces everything from there.
        let records = vec![
            Record {
                hard_state: None,
                log: Some((5, vec![bytes(5)])),
            },
            Record {
                hard_state: None,
                log: Some((3, vec![bytes(30)])),
            },
        ];
        assert_eq!(
            collapse(records).unwrap(),
            Record {
                hard_state: None,
                log: Some((3, vec![bytes(30)])),
            }
        );
        // A write past the end of the log cannot come from this node.
        let records = vec![
            Record {
                hard_state: None,
                log: Some((5, vec![bytes(5)])),
            },
            Record {
                hard_state: None,
                log: Some((9, vec![bytes(9)])),
            },
        ];
        assert!(collapse(records).is_err());
    }

    #[test]
    fn a_torn_tail_ends_the_journal_and_damage_before_the_end_is_refused() {
        let dir = dir("torn");
        let (mut journal, _) = Journal::open(&dir).unwrap();
        for term in 1..=3 {
            journal.add(Some(hs(term)), Some((term, &[vec![7u8; 50]])));
        }
        journal.sync().unwrap();
        let path = journal.path().to_path_buf();
        drop(journal);
        let bytes = std::fs::read(&path).unwrap();
        // Cut inside the last record: two records remain.
        let (records, _) = decode(&bytes[..bytes.len() - 10]).unwrap();
        assert_eq!(records.len(), 2);
        // The last record's bytes flipped: torn, two remain.
        let mut torn = bytes.clone();
        let last = torn.len() - 3;
        torn[last] ^= 0xff;
        assert_eq!(decode(&torn).unwrap().0.len(), 2);
        // The first record's payload flipped, with intact ones after it: damage.
        let mut damaged = bytes.clone();
        damaged[20] ^= 0x01;
        let error = decode(&damaged).unwrap_err();
        assert!(error.contains("record 1"), "{error}");
    }
}
