//! The write-ahead journal of data directories written before the log's
//! segments became its write-ahead log (up to e7fdae5): every write batch
//! was appended here with one `fdatasync`, and the segments (`*.seg`) and
//! sled got the same changes unsynced, synced only at checkpoints. On
//! upgrade (`mod.rs`) the records since the last checkpoint are applied
//! over the old segments one last time. The writer is kept, unused by the
//! store, so tests can write journals as those versions did.
//!
//! A record is `[magic "CSJ2"][crc32: u32 LE][payload length: u32 LE]
//! [sequence number: u64 LE][payload]`, the checksum covering everything
//! after it. The payload is a flags byte, then the hard state (term, vote
//! or 0, commit) if flag 1, then if flag 2 the log change: `from`, an entry
//! count, and each stored entry as length-prefixed bytes. Applying a log
//! change removes every entry from `from` on and inserts the new ones, so
//! replaying records over any state the store recovered (a prefix of them
//! applied) ends in the same state.
//!
//! A bad record is either a torn tail (a crash during the last write, never
//! acknowledged) or damage (refused: acknowledged writes after it would be
//! lost), told apart by an intact record after the bad one, as in the
//! segments (`segments.rs`). Journals written before records carried a
//! magic and a sequence number hold `[payload length: u32 LE][crc32 of
//! payload: u32 LE][payload]` and are still read. (Such a length is at most
//! `MAX_RECORD`, so its last byte is never the magic's.)

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::raft::{HardState, Index};
use crate::storage::codec::{self, FrameError, Reader, MAX_RECORD};

pub const JOURNAL_FILE: &str = "journal";
const HAS_HARD_STATE: u8 = 1;
const HAS_LOG: u8 = 2;
const MAGIC: [u8; 4] = *b"CSJ2";
/// Magic, checksum, length, sequence number.
const HEADER: usize = codec::SEQUENCED_HEADER;
/// The smallest record: a header and a flags byte.
const MIN_RECORD: usize = HEADER + 1;

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
    /// The file holds a torn record past `len`, cut before anything is
    /// written after it (`cut_torn_tail`).
    torn_tail: bool,
    /// Records added since the last sync.
    pending: Vec<u8>,
    /// The sequence number of the next record.
    next_seq: u64,
}

impl Journal {
    /// Opens (or creates) the journal in `dir` and reads its records. A
    /// torn last record (a crash during its write) ends the journal and is
    /// left in the file until `cut_torn_tail` or the next write, so a store
    /// that its other checks then refuse keeps the file as it was found. A
    /// damaged record with intact ones after it is an error, and the file is
    /// left untouched.
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
        let decoded = decode_journal(&bytes)?;
        Ok((
            Journal {
                path,
                file,
                len: decoded.valid as u64,
                torn_tail: decoded.valid < bytes.len(),
                pending: Vec::new(),
                next_seq: decoded
                    .last_seq
                    .map_or_else(random_seq, |seq| seq.wrapping_add(1)),
            },
            decoded.records,
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

    /// Whether the file ends in a torn record not yet cut.
    pub fn has_torn_tail(&self) -> bool {
        self.torn_tail
    }

    /// Drops the torn tail, if any: records written after it would be
    /// followed by its leftovers.
    pub fn cut_torn_tail(&mut self) -> std::io::Result<()> {
        if !self.torn_tail {
            return Ok(());
        }
        let size = self.file.metadata()?.len();
        self.file.set_len(self.len)?;
        self.file.sync_data()?;
        self.torn_tail = false;
        tracing::warn!(
            file = %self.path.display(),
            kept = self.len,
            cut = size.saturating_sub(self.len),
            "cut a torn write off the end of the journal (a crash during a write that was never acknowledged)"
        );
        Ok(())
    }

    /// Queues a record; `sync` makes it durable.
    pub fn add(&mut self, hard_state: Option<HardState>, log: Option<(Index, &[Vec<u8>])>) {
        let payload = encode_payload(hard_state, log);
        codec::put_sequenced(&mut self.pending, &MAGIC, self.next_seq, &payload);
        self.next_seq = self.next_seq.wrapping_add(1);
    }

    /// Writes the queued records and syncs them: one `fdatasync`.
    pub fn sync(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.cut_torn_tail()?;
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
        self.torn_tail = false;
        Ok(())
    }
}

/// A first sequence number nobody outside this process can predict (std's
/// hasher keys come from the operating system's random source).
fn random_seq() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

fn encode_payload(hard_state: Option<HardState>, log: Option<(Index, &[Vec<u8>])>) -> Vec<u8> {
    let mut payload = Vec::new();
    let flags = if hard_state.is_some() {
        HAS_HARD_STATE
    } else {
        0
    } | if log.is_some() { HAS_LOG } else { 0 };
    payload.push(flags);
    if let Some(hs) = hard_state {
        for value in [hs.term, hs.vote.unwrap_or(0), hs.commit] {
            codec::put_u64(&mut payload, value);
        }
    }
    if let Some((from, entries)) = log {
        codec::put_u64(&mut payload, from);
        codec::put_list(&mut payload, entries);
    }
    payload
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

/// What a journal's bytes hold.
struct Decoded {
    records: Vec<Record>,
    /// How many bytes the records span; anything after is a torn tail.
    valid: usize,
    /// The last record's sequence number (none in the old format).
    last_seq: Option<u64>,
}

/// Parses journal bytes: the records, and how many bytes they span. A bad
/// record ends the journal (a write torn by a crash, never acknowledged),
/// unless an intact record follows it: then the file was damaged after it
/// was written, and acknowledged writes may be lost. Public for the fuzz
/// targets and property tests.
pub fn decode(bytes: &[u8]) -> Result<(Vec<Record>, usize), String> {
    decode_journal(bytes).map(|decoded| (decoded.records, decoded.valid))
}

fn decode_journal(bytes: &[u8]) -> Result<Decoded, String> {
    let mut records = Vec::new();
    let mut last_seq: Option<u64> = None;
    let mut at = 0;
    while at < bytes.len() {
        let problem = match record_at(bytes, at) {
            Ok((record, seq, end)) => match (last_seq, seq) {
                (Some(last), Some(seq)) if seq != last.wrapping_add(1) => {
                    format!("sequence number {seq} after {last}")
                }
                (Some(_), None) => "a record of the old format after newer ones".to_string(),
                _ => {
                    records.push(record);
                    last_seq = seq;
                    at = end;
                    continue;
                }
            },
            Err(problem) => problem,
        };
        let legacy = !bytes.starts_with(&MAGIC);
        if let Some(intact) = intact_record_after(bytes, at, last_seq, legacy) {
            return Err(format!(
                "record {} at byte {at} is damaged ({problem}) and an intact record follows at byte {intact}",
                records.len() + 1
            ));
        }
        break;
    }
    Ok(Decoded {
        records,
        valid: at,
        last_seq,
    })
}

/// What is wrong with a record's framing, as a journal says it.
fn framing_problem(error: FrameError) -> String {
    match error {
        FrameError::HeaderCut { have } => format!("its header is cut short at {have} bytes"),
        FrameError::Length { len } => format!("length {len}, more than any record"),
        FrameError::PayloadCut { len, .. } => format!("length {len} runs past the end of the file"),
    }
}

/// The record starting at `at`, its sequence number (none in the old
/// format) and where it ends; or what is wrong with it.
fn record_at(bytes: &[u8], at: usize) -> Result<(Record, Option<u64>, usize), String> {
    let rest = bytes.get(at..).unwrap_or_default();
    let Some(frame) = codec::sequenced_at(rest, &MAGIC, ..=MAX_RECORD) else {
        return legacy_record_at(rest).map(|(record, len)| (record, None, at + len));
    };
    let frame = frame.map_err(framing_problem)?;
    if !frame.intact() {
        return Err("checksum mismatch".into());
    }
    let record = parse_payload(frame.payload, true)?;
    Ok((record, Some(frame.seq), at + frame.len()))
}

/// A record of the old format at the start of `rest`, and its size.
fn legacy_record_at(rest: &[u8]) -> Result<(Record, usize), String> {
    let frame = codec::frame_at(rest, ..=MAX_RECORD).map_err(framing_problem)?;
    if !frame.intact() {
        return Err("checksum mismatch".into());
    }
    Ok((parse_payload(frame.payload, true)?, frame.len()))
}

/// Where the first intact record after the bad one at `at` starts, if one
/// does. Every offset is tried, as the bad record's length cannot be
/// trusted. A record of the current format counts only if its sequence
/// number can follow the last good record's (`last_seq`): one more than
/// it, plus at most one per `MIN_RECORD` bytes between the two. One of the
/// old format counts only in a journal of that format (`legacy`).
fn intact_record_after(
    bytes: &[u8],
    at: usize,
    last_seq: Option<u64>,
    legacy: bool,
) -> Option<usize> {
    (at + 1..bytes.len()).find(|&offset| {
        let rest = bytes.get(offset..).unwrap_or_default();
        codec::intact_sequenced_at(rest, &MAGIC, last_seq, offset - at, MIN_RECORD, |p| {
            parse_payload(p, false).is_ok()
        })
        .unwrap_or_else(|| legacy && legacy_record_is_intact(rest))
    })
}

/// Whether an intact record of the old format starts `rest`. Its shape is
/// checked first, so at most offsets no checksum is computed.
fn legacy_record_is_intact(rest: &[u8]) -> bool {
    let Ok(frame) = codec::frame_at(rest, ..) else {
        return false;
    };
    parse_payload(frame.payload, false).is_ok() && frame.intact()
}

/// Decodes a record's payload; with `keep_entries` false it only checks
/// its shape, copying nothing (the entries come back empty).
fn parse_payload(payload: &[u8], keep_entries: bool) -> Result<Record, String> {
    let mut reader = Reader::new(payload);
    let flags = reader.u8()?;
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
        let mut entries = Vec::new();
        if keep_entries {
            entries.reserve(count.min(reader.rest().len() / 4));
        }
        for _ in 0..count {
            let len = reader.u32()? as usize;
            let entry = reader.take(len)?;
            if keep_entries {
                entries.push(entry.to_vec());
            }
        }
        record.log = Some((from, entries));
    }
    if !reader.is_empty() {
        return Err(format!("{} trailing bytes", reader.rest().len()));
    }
    Ok(record)
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

    /// Where each record of an intact journal of the current format starts.
    fn record_starts(bytes: &[u8]) -> Vec<usize> {
        let mut starts = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            starts.push(at);
            let len = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            at += HEADER + len as usize;
        }
        starts
    }

    /// A record as journals were written before the magic.
    fn legacy_record(hard_state: Option<HardState>, log: Option<(Index, &[Vec<u8>])>) -> Vec<u8> {
        let payload = encode_payload(hard_state, log);
        let mut record = (payload.len() as u32).to_le_bytes().to_vec();
        record.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        record.extend_from_slice(&payload);
        record
    }

    /// Four records, one sync each, as a store writes them.
    fn four_writes(dir: &Path) -> (PathBuf, Vec<u8>) {
        let (mut journal, _) = Journal::open(dir).unwrap();
        for term in 1..=4 {
            journal.add(Some(hs(term)), Some((term, &[vec![7u8; 50]])));
            journal.sync().unwrap();
        }
        let path = journal.path().to_path_buf();
        drop(journal);
        let bytes = std::fs::read(&path).unwrap();
        (path, bytes)
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

    #[test]
    fn a_damaged_length_is_refused_as_damage_and_the_file_left_as_found() {
        let dir = dir("length");
        let (path, intact) = four_writes(&dir);
        let starts = record_starts(&intact);
        assert_eq!(starts.len(), 4);
        let second = starts[1];
        let cases = [
            ("more than any record", u32::MAX),
            ("past the end of the file", intact.len() as u32),
            (
                "into the middle of the next record",
                (starts[2] - second - HEADER + 7) as u32,
            ),
            ("into its own payload", 10),
        ];
        for (what, len) in cases {
            let mut damaged = intact.clone();
            damaged[second + 8..second + 12].copy_from_slice(&len.to_le_bytes());
            std::fs::write(&path, &damaged).unwrap();
            let error = match Journal::open(&dir) {
                Err(error) => error,
                Ok((_, records)) => panic!(
                    "{what}: read as a torn tail, {} records kept",
                    records.len()
                ),
            };
            assert!(
                error.contains("record 2")
                    && error.contains(&format!("intact record follows at byte {}", starts[2])),
                "{what}: {error}"
            );
            assert_eq!(
                std::fs::read(&path).unwrap(),
                damaged,
                "{what}: the journal was changed"
            );
        }
    }

    #[test]
    fn a_torn_tail_is_accepted_and_cut_before_the_next_write() {
        let dir = dir("tail");
        let (path, intact) = four_writes(&dir);
        let starts = record_starts(&intact);
        let last = starts[3];
        // The last write cut short inside its payload or its header, or its
        // length garbled: nothing intact follows any of them.
        let mut garbled = intact.clone();
        garbled[last + 8..last + 12].copy_from_slice(&u32::MAX.to_le_bytes());
        for torn in [
            intact[..intact.len() - 10].to_vec(),
            intact[..last + 5].to_vec(),
            garbled,
        ] {
            std::fs::write(&path, &torn).unwrap();
            let (mut journal, records) = Journal::open(&dir).expect("a torn tail is accepted");
            assert_eq!(records.len(), 3);
            assert!(journal.has_torn_tail());
            assert_eq!(
                std::fs::read(&path).unwrap(),
                torn,
                "opening alone leaves the file as found"
            );
            journal.add(Some(hs(9)), None);
            journal.sync().unwrap();
            drop(journal);
            // Flags byte and hard state: 25 bytes of payload.
            assert_eq!(std::fs::read(&path).unwrap().len(), last + HEADER + 25);
            let (journal, records) = Journal::open(&dir).unwrap();
            assert!(!journal.has_torn_tail());
            assert_eq!(records.len(), 4);
            assert_eq!(records[3].hard_state, Some(hs(9)));
        }
    }

    #[test]
    fn a_record_inside_a_message_does_not_pass_for_an_intact_one() {
        let dir = dir("forged");
        let (mut journal, _) = Journal::open(&dir).unwrap();
        journal.add(Some(hs(1)), None);
        journal.sync().unwrap();
        let path = journal.path().to_path_buf();
        let first = std::fs::read(&path).unwrap();
        let seq = u64::from_le_bytes(first[12..20].try_into().unwrap());
        // A client's message holding the bytes of a record, its sequence
        // number guessed wrong; the write carrying it is torn after it.
        let mut forged = Vec::new();
        codec::put_sequenced(
            &mut forged,
            &MAGIC,
            seq.wrapping_add(1000),
            &encode_payload(Some(hs(66)), None),
        );
        journal.add(None, Some((1, &[forged.clone(), vec![0u8; 10]])));
        journal.sync().unwrap();
        drop(journal);
        let bytes = std::fs::read(&path).unwrap();
        let torn = &bytes[..bytes.len() - 5];
        assert!(torn.windows(forged.len()).any(|w| w == forged.as_slice()));
        let (records, valid) = decode(torn).expect("a torn tail, not damage");
        assert_eq!(records.len(), 1);
        assert_eq!(valid, first.len());
    }

    #[test]
    fn journals_of_the_old_format_still_open() {
        let dir = dir("legacy");
        let entries = vec![b"one".to_vec(), b"two".to_vec()];
        let old: Vec<Vec<u8>> = (1..=3)
            .map(|term| legacy_record(Some(hs(term)), Some((term, &entries))))
            .collect();
        let bytes = old.concat();
        let path = dir.join(JOURNAL_FILE);
        std::fs::write(&path, &bytes).unwrap();
        let (mut journal, records) = Journal::open(&dir).unwrap();
        assert_eq!(records.len(), 3);
        assert_eq!(
            records[2],
            Record {
                hard_state: Some(hs(3)),
                log: Some((3, entries.clone())),
            }
        );
        // The store checkpoints what it replays; what it writes next is
        // in the current format.
        journal.reset().unwrap();
        journal.add(Some(hs(4)), None);
        journal.sync().unwrap();
        drop(journal);
        assert!(std::fs::read(&path).unwrap().starts_with(&MAGIC));
        let (_, records) = Journal::open(&dir).unwrap();
        assert_eq!(
            records,
            vec![Record {
                hard_state: Some(hs(4)),
                log: None,
            }]
        );
        // Damage and a torn tail are told apart in the old format too.
        let mut damaged = bytes.clone();
        damaged[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        let error = decode(&damaged).expect_err("a damaged length read as a torn tail");
        assert!(
            error.contains("record 1") && error.contains(&format!("byte {}", old[0].len())),
            "{error}"
        );
        let (records, valid) = decode(&bytes[..bytes.len() - 3]).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(valid, old[0].len() + old[1].len());
    }
}
