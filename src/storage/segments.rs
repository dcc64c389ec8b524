//! The log in append-only segment files under `<data>/log/`, with an
//! in-memory index of where each record lies.
//!
//! Why not sled: sled copies a leaf on every insert (most of a store
//! thread's time under load), and it keeps every page a scan touched in
//! memory until 64 later accesses land in the same one of its 256 cache
//! shards, so one export or restart left the whole log resident. Here a
//! write is one `pwrite` at the end of a file and a read is one `pread`
//! per record; the kernel's page cache does the caching, outside the
//! node's memory.
//!
//! A record is `[payload length: u32 LE][crc32 of payload: u32 LE]
//! [payload]` (a frame, `codec.rs`), the payload `[from: u64 LE]` followed
//! by a chunk of entries (`chunk.rs`) or by nothing: "entries from `from`
//! on are replaced by these", or, without a chunk, "are removed". Reading
//! the records in order gives the log. A write's entries are split into
//! records of at most `CHUNK_BYTES`, so reading one entry never reads much
//! more.
//!
//! Durability comes from the store's journal, as before: segments are
//! written without a sync and fsynced at checkpoints, when the position
//! they are durable up to is recorded in `log/position` (replaced
//! atomically by a rename; a sealed record of `codec.rs`). On open,
//! whatever lies past that position was written after the last checkpoint,
//! is covered by the journal, and is cut off; damage before it is reported,
//! naming the file.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use super::chunk;
use super::codec::{self, FrameError, Reader, SealError, MAX_RECORD};
use crate::raft::{Entry, Index};

/// The directory of the segments, inside the data directory.
pub const LOG_DIR: &str = "log";
const POSITION_FILE: &str = "position";
const POSITION_MAGIC: &[u8; 4] = b"CSP1";
/// A new segment starts once the active one has grown past this (small
/// in unit tests, so that they cross segments).
const SEGMENT_BYTES: u64 = if cfg!(test) { 4 << 10 } else { 64 << 20 };
const HEADER: usize = codec::FRAME_HEADER;
/// Records read per look at the index, so a long scan never holds the
/// lock, or a copy of the whole index, for long.
const SCAN_BATCH: usize = 256;

/// Something wrong with a file of the log.
#[derive(Debug)]
pub struct LogError {
    pub file: PathBuf,
    pub what: String,
    /// The file's contents are damaged (as opposed to an I/O failure, such
    /// as a full disk, which says nothing about the data).
    pub damaged: bool,
}

/// An I/O failure on `file`.
fn error(file: &Path, what: impl ToString) -> LogError {
    LogError {
        file: file.to_path_buf(),
        what: what.to_string(),
        damaged: false,
    }
}

/// Damage found in `file`.
fn damage(file: &Path, what: impl ToString) -> LogError {
    LogError {
        damaged: true,
        ..error(file, what)
    }
}

/// What stops a scan.
#[derive(Debug)]
pub enum ScanError {
    /// A file of the log is unreadable or damaged.
    Damaged(LogError),
    /// The caller refused entry `index`.
    Refused { index: Index, what: String },
}

/// Where a record lies: `count` entries from `first`, in `segment` at
/// `offset`, `len` bytes with its header.
#[derive(Clone, Copy, Debug)]
struct Loc {
    first: Index,
    count: u32,
    segment: u32,
    offset: u32,
    len: u32,
}

impl Loc {
    fn end(&self) -> Index {
        self.first + self.count as Index
    }
}

/// The index and the open segments, shared with readers.
#[derive(Default)]
struct Index_ {
    locs: Vec<Loc>,
    segments: Vec<Arc<File>>,
}

impl Index_ {
    fn last_index(&self) -> Index {
        self.locs.last().map_or(0, |loc| loc.end() - 1)
    }

    /// Forgets entries from `from` on.
    fn truncate(&mut self, from: Index) {
        let keep = self.locs.partition_point(|loc| loc.first < from);
        self.locs.truncate(keep);
        if let Some(last) = self.locs.last_mut() {
            if last.end() > from {
                last.count = (from - last.first) as u32;
            }
        }
    }
}

struct Shared {
    dir: PathBuf,
    index: RwLock<Index_>,
}

impl Shared {
    fn segment_path(&self, id: u32) -> PathBuf {
        segment_path(&self.dir, id)
    }
}

fn segment_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{id:08}.seg"))
}

/// The writer's side of the log; `reader` hands out readers.
pub struct SegmentLog {
    shared: Arc<Shared>,
    /// The segment written to, and how long it is.
    active: u32,
    active_len: u64,
    /// Segments written since the last checkpoint.
    unsynced: Vec<u32>,
    /// A segment was created since the last checkpoint.
    new_segment: bool,
}

/// Durable up to `len` bytes of segment `segment` (and all before it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Position {
    segment: u32,
    len: u64,
}

impl SegmentLog {
    /// Opens the log in `data_dir`, creating it if there is none, and
    /// cuts off whatever was written after the last checkpoint.
    pub fn open(data_dir: &Path) -> Result<SegmentLog, LogError> {
        let dir = data_dir.join(LOG_DIR);
        if !dir.exists() {
            std::fs::create_dir(&dir).map_err(|e| error(&dir, e))?;
            File::open(data_dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| error(data_dir, e))?;
        }
        let mut ids = Vec::new();
        for item in std::fs::read_dir(&dir).map_err(|e| error(&dir, e))? {
            let item = item.map_err(|e| error(&dir, e))?;
            let name = item.file_name().to_string_lossy().to_string();
            if let Some(id) = name.strip_suffix(".seg") {
                let id = id
                    .parse::<u32>()
                    .map_err(|_| damage(&item.path(), "not a segment of this log"))?;
                ids.push(id);
            }
        }
        ids.sort_unstable();
        let position_path = dir.join(POSITION_FILE);
        let position = match std::fs::read(&position_path) {
            Ok(bytes) => decode_position(&bytes).map_err(|what| damage(&position_path, what))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(id) = ids.first() {
                    let path = segment_path(&dir, *id);
                    let len = std::fs::metadata(&path).map_err(|e| error(&path, e))?.len();
                    if ids.len() > 1 || len > 0 {
                        return Err(damage(
                            &position_path,
                            "missing, while the log has segments: how far they are durable is unknown",
                        ));
                    }
                }
                Position::default()
            }
            Err(e) => return Err(error(&position_path, e)),
        };
        let shared = Arc::new(Shared {
            dir: dir.clone(),
            index: RwLock::new(Index_::default()),
        });
        let mut index = Index_::default();
        for id in 0..=position.segment {
            let path = shared.segment_path(id);
            if id < position.segment && !ids.contains(&id) {
                return Err(damage(&path, "missing"));
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(id == position.segment)
                .truncate(false)
                .open(&path)
                .map_err(|e| error(&path, e))?;
            let len = file.metadata().map_err(|e| error(&path, e))?.len();
            let durable = if id == position.segment {
                position.len
            } else {
                len
            };
            if len < durable {
                return Err(damage(
                    &path,
                    format!("it holds {len} bytes, but {durable} were checkpointed"),
                ));
            }
            if id == position.segment && len > durable {
                // Written after the last checkpoint: the journal has it.
                file.set_len(durable)
                    .and_then(|_| file.sync_data())
                    .map_err(|e| error(&path, e))?;
            }
            read_segment(&file, &path, id, durable, &mut index)?;
            index.segments.push(Arc::new(file));
        }
        for id in ids.into_iter().filter(|id| *id > position.segment) {
            let path = shared.segment_path(id);
            std::fs::remove_file(&path).map_err(|e| error(&path, e))?;
        }
        *shared.index.write().map_err(|_| error(&dir, "poisoned"))? = index;
        Ok(SegmentLog {
            shared,
            active: position.segment,
            active_len: position.len,
            unsynced: Vec::new(),
            new_segment: false,
        })
    }

    pub fn last_index(&self) -> Index {
        self.shared
            .index
            .read()
            .map_or(0, |index| index.last_index())
    }

    pub fn reader(&self) -> SegmentReader {
        SegmentReader {
            shared: self.shared.clone(),
        }
    }

    /// Replaces the entries from `from` on with `entries` (encoded), or
    /// removes them if there are none. Not durable until `checkpoint`.
    pub fn replace_from(&mut self, from: Index, entries: &[Vec<u8>]) -> Result<(), LogError> {
        if self.active_len >= SEGMENT_BYTES {
            self.rotate()?;
        }
        let mut bytes = Vec::new();
        let mut locs = Vec::new();
        let push = |first: Index, chunk: Option<Vec<u8>>, bytes: &mut Vec<u8>| {
            let mut payload = Vec::with_capacity(8 + chunk.as_ref().map_or(0, Vec::len));
            codec::put_u64(&mut payload, first);
            if let Some(chunk) = &chunk {
                payload.extend_from_slice(chunk);
            }
            let offset = self.active_len + bytes.len() as u64;
            codec::put_frame(bytes, &payload);
            (offset, HEADER + payload.len())
        };
        let runs = chunk::runs(entries);
        if runs.is_empty() {
            push(from, None, &mut bytes);
        }
        let path = self.shared.segment_path(self.active);
        let too_large = |what: &str| error(&path, format!("{what} too large for a segment"));
        for (offset, run) in runs {
            let first = from + offset as Index;
            let (at, len) = push(first, Some(chunk::encode(run)), &mut bytes);
            locs.push(Loc {
                first,
                count: u32::try_from(run.len()).map_err(|_| too_large("a write"))?,
                segment: self.active,
                offset: u32::try_from(at).map_err(|_| too_large("a segment"))?,
                len: u32::try_from(len).map_err(|_| too_large("a record"))?,
            });
        }
        // This is the only writer: the index cannot change until the end,
        // so readers are held up only while it is updated, not during the
        // write.
        let (last, file) = {
            let index = self
                .shared
                .index
                .read()
                .map_err(|_| error(&path, "poisoned"))?;
            let file = index
                .segments
                .get(self.active as usize)
                .cloned()
                .ok_or_else(|| error(&path, "not open"))?;
            (index.last_index(), file)
        };
        if from == 0 || from > last + 1 {
            return Err(error(
                &path,
                format!("a write from index {from} would leave a gap after {last}"),
            ));
        }
        // Bytes first, then the index: a reader never finds a record
        // that is not there yet.
        file.write_all_at(&bytes, self.active_len)
            .map_err(|e| error(&path, e))?;
        self.active_len += bytes.len() as u64;
        if self.unsynced.last() != Some(&self.active) {
            self.unsynced.push(self.active);
        }
        let mut index = self
            .shared
            .index
            .write()
            .map_err(|_| error(&path, "poisoned"))?;
        index.truncate(from);
        index.locs.extend(locs);
        Ok(())
    }

    /// Starts a new segment.
    fn rotate(&mut self) -> Result<(), LogError> {
        let id = self.active + 1;
        let path = self.shared.segment_path(id);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| error(&path, e))?;
        self.shared
            .index
            .write()
            .map_err(|_| error(&path, "poisoned"))?
            .segments
            .push(Arc::new(file));
        self.active = id;
        self.active_len = 0;
        self.new_segment = true;
        Ok(())
    }

    /// Makes everything written durable and records how far that is.
    pub fn checkpoint(&mut self) -> Result<(), LogError> {
        {
            let index = self
                .shared
                .index
                .read()
                .map_err(|_| error(&self.shared.dir, "poisoned"))?;
            for id in &self.unsynced {
                if let Some(file) = index.segments.get(*id as usize) {
                    file.sync_data()
                        .map_err(|e| error(&self.shared.segment_path(*id), e))?;
                }
            }
        }
        self.unsynced.clear();
        // A segment created since the last checkpoint must be in the
        // directory before the position can name it.
        if std::mem::take(&mut self.new_segment) {
            File::open(&self.shared.dir)
                .and_then(|dir| dir.sync_all())
                .map_err(|e| error(&self.shared.dir, e))?;
        }
        let position = Position {
            segment: self.active,
            len: self.active_len,
        };
        let path = self.shared.dir.join(POSITION_FILE);
        let temporary = self.shared.dir.join(format!("{POSITION_FILE}.new"));
        std::fs::write(&temporary, encode_position(position))
            .and_then(|_| File::open(&temporary)?.sync_all())
            .and_then(|_| std::fs::rename(&temporary, &path))
            .and_then(|_| File::open(&self.shared.dir)?.sync_all())
            .map_err(|e| error(&path, e))?;
        Ok(())
    }

    /// Empties the log (durably), to fill it again from elsewhere.
    pub fn clear(&mut self) -> Result<(), LogError> {
        let path = self.shared.dir.join(POSITION_FILE);
        let segments = {
            let mut index = self
                .shared
                .index
                .write()
                .map_err(|_| error(&path, "poisoned"))?;
            index.locs.clear();
            index.segments.len() as u32
        };
        // The position first: a crash part way leaves an empty log, not
        // a position past the end of what is there.
        self.active = 0;
        self.active_len = 0;
        self.unsynced.clear();
        self.checkpoint()?;
        let index = self
            .shared
            .index
            .read()
            .map_err(|_| error(&path, "poisoned"))?;
        if let Some(first) = index.segments.first() {
            first
                .set_len(0)
                .and_then(|_| first.sync_data())
                .map_err(|e| error(&self.shared.segment_path(0), e))?;
        }
        drop(index);
        for id in 1..segments {
            let path = self.shared.segment_path(id);
            let _ = std::fs::remove_file(&path);
        }
        if let Ok(mut index) = self.shared.index.write() {
            index.segments.truncate(1);
        }
        Ok(())
    }
}

/// Reads the log while the store keeps writing it.
#[derive(Clone)]
pub struct SegmentReader {
    shared: Arc<Shared>,
}

impl SegmentReader {
    /// Hands entries `from..=to` (at most `limit`) to `each`, in order;
    /// returns the index of the last one handed over.
    pub fn scan(
        &self,
        from: Index,
        to: Index,
        limit: usize,
        max_bytes: usize,
        each: &mut dyn FnMut(Entry) -> Result<(), String>,
    ) -> Result<Index, ScanError> {
        let mut expected = from.max(1);
        let mut left = limit;
        let mut bytes_left = max_bytes;
        while expected <= to && left > 0 {
            let batch: Vec<(Loc, Arc<File>)> = {
                let index = self
                    .shared
                    .index
                    .read()
                    .map_err(|_| ScanError::Damaged(error(&self.shared.dir, "poisoned")))?;
                let start = index.locs.partition_point(|loc| loc.end() <= expected);
                index.locs[start..]
                    .iter()
                    .take(SCAN_BATCH)
                    .take_while(|loc| loc.first <= to)
                    .map(|loc| match index.segments.get(loc.segment as usize) {
                        Some(file) => Ok((*loc, file.clone())),
                        None => Err(ScanError::Damaged(error(
                            &self.shared.segment_path(loc.segment),
                            "not open",
                        ))),
                    })
                    .collect::<Result<_, _>>()?
            };
            if batch.is_empty() {
                break;
            }
            for (loc, file) in batch {
                let path = self.shared.segment_path(loc.segment);
                let mut bytes = vec![0u8; loc.len as usize];
                file.read_exact_at(&mut bytes, loc.offset as u64)
                    .map_err(|e| {
                        ScanError::Damaged(damage(&path, format!("offset {}: {e}", loc.offset)))
                    })?;
                let record = parse_record(&bytes)
                    .and_then(|(record, _)| record)
                    .map_err(|what| {
                        ScanError::Damaged(damage(&path, format!("offset {}: {what}", loc.offset)))
                    })?;
                let (first, Some(chunk)) = record else {
                    return Err(ScanError::Damaged(damage(
                        &path,
                        format!("offset {}: the index points at a removal", loc.offset),
                    )));
                };
                let entries = chunk::split(chunk).map_err(|what| {
                    ScanError::Damaged(damage(&path, format!("offset {}: {what}", loc.offset)))
                })?;
                if first != loc.first || first > expected {
                    return Err(ScanError::Damaged(damage(
                        &path,
                        format!(
                            "offset {}: a record from index {first} where {expected} was expected",
                            loc.offset
                        ),
                    )));
                }
                let skip = (expected - first) as usize;
                for (index, bytes) in (first..)
                    .zip(entries.iter().take(loc.count as usize))
                    .skip(skip)
                {
                    if index > to || left == 0 {
                        return Ok(expected - 1);
                    }
                    let entry = codec::decode_entry(bytes).map_err(|what| {
                        ScanError::Damaged(damage(&path, format!("log entry {index}: {what}")))
                    })?;
                    if entry.index != index {
                        return Err(ScanError::Damaged(damage(
                            &path,
                            format!("log entry {index} is stored as entry {}", entry.index),
                        )));
                    }
                    // At least one entry, whatever its size.
                    if entry.size() > bytes_left && left < limit {
                        return Ok(expected - 1);
                    }
                    bytes_left = bytes_left.saturating_sub(entry.size());
                    each(entry).map_err(|what| ScanError::Refused { index, what })?;
                    expected += 1;
                    left -= 1;
                }
            }
        }
        Ok(expected - 1)
    }
}

/// A record's `from` and chunk (none for a removal).
type Record<'a> = (Index, Option<&'a [u8]>);

/// Parses the record at the start of `bytes`: `None` if they end before
/// it does, else the record (or why it is damaged) and its length.
#[allow(clippy::type_complexity)]
fn parse_record(bytes: &[u8]) -> Result<(Result<Record<'_>, String>, usize), String> {
    let frame = codec::frame_at(bytes, 8..=MAX_RECORD).map_err(|error| match error {
        FrameError::HeaderCut { have } => format!("a record header cut short at {have} bytes"),
        FrameError::Length { len } => format!("a record length of {len} bytes"),
        FrameError::PayloadCut { len, have } => {
            format!("a record of {len} bytes cut short at {have}")
        }
    })?;
    if !frame.intact() {
        return Ok((Err("checksum mismatch".into()), frame.len()));
    }
    let mut payload = Reader::new(frame.payload);
    let from = payload.u64()?;
    let chunk = (!payload.is_empty()).then(|| payload.rest());
    Ok((Ok((from, chunk)), frame.len()))
}

/// Decodes a segment's records as the store does on open: each record's
/// `from` and entry count (0 for a removal). Public for the fuzz targets
/// and property tests.
pub fn decode_segment(bytes: &[u8]) -> Result<Vec<(Index, u64)>, String> {
    let mut records = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let (record, len) = parse_record(&bytes[at..]).map_err(|e| format!("offset {at}: {e}"))?;
        let (from, chunk) = record.map_err(|e| format!("offset {at}: {e}"))?;
        let count = match chunk {
            Some(chunk) => chunk::count(chunk).map_err(|e| format!("offset {at}: {e}"))?,
            None => 0,
        };
        records.push((from, count));
        at += len;
    }
    Ok(records)
}

/// Reads the first `len` bytes of segment `id` into the index.
fn read_segment(
    file: &File,
    path: &Path,
    id: u32,
    len: u64,
    index: &mut Index_,
) -> Result<(), LogError> {
    let mut bytes = vec![0u8; len as usize];
    file.read_exact_at(&mut bytes, 0)
        .map_err(|e| error(path, e))?;
    let mut at = 0usize;
    while at < bytes.len() {
        let (record, record_len) = parse_record(&bytes[at..])
            .map_err(|what| damage(path, format!("offset {at}: {what}")))?;
        let (from, chunk) = record.map_err(|what| damage(path, format!("offset {at}: {what}")))?;
        let last = index.last_index();
        if from == 0 || from > last + 1 {
            return Err(damage(
                path,
                format!("offset {at}: a record from index {from} after a log ending at {last}"),
            ));
        }
        index.truncate(from);
        if let Some(chunk) = chunk {
            let count =
                chunk::count(chunk).map_err(|what| damage(path, format!("offset {at}: {what}")))?;
            index.locs.push(Loc {
                first: from,
                count: count as u32,
                segment: id,
                offset: at as u32,
                len: record_len as u32,
            });
        }
        at += record_len;
    }
    Ok(())
}

/// The position's fields: segment (u32) and length (u64).
const POSITION_FIELDS: usize = 12;

fn encode_position(position: Position) -> Vec<u8> {
    let mut fields = Vec::with_capacity(POSITION_FIELDS);
    codec::put_u32(&mut fields, position.segment);
    codec::put_u64(&mut fields, position.len);
    codec::seal(POSITION_MAGIC, &fields)
}

fn decode_position(bytes: &[u8]) -> Result<Position, String> {
    let mut fields =
        codec::unseal(bytes, POSITION_MAGIC, POSITION_FIELDS).map_err(|error| match error {
            SealError::Shape => format!("{} bytes, not a log position", bytes.len()),
            SealError::Checksum => "checksum mismatch".to_string(),
        })?;
    Ok(Position {
        segment: fields.u32()?,
        len: fields.u64()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::Payload;

    fn encoded(from: Index, to: Index, term: u64) -> Vec<Vec<u8>> {
        (from..=to)
            .map(|index| {
                let entry = Entry {
                    index,
                    term,
                    lamport: index,
                    payload: Payload::Noop,
                };
                codec::encode_entry(&entry).unwrap()
            })
            .collect()
    }

    fn terms(log: &SegmentLog, from: Index, to: Index) -> Vec<(Index, u64)> {
        let mut seen = Vec::new();
        log.reader()
            .scan(from, to, usize::MAX, usize::MAX, &mut |e| {
                seen.push((e.index, e.term));
                Ok(())
            })
            .unwrap();
        seen
    }

    #[test]
    fn crosses_segments_truncates_and_cuts_what_was_not_checkpointed() {
        let dir = std::env::temp_dir().join(format!("cs-segments-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut log = SegmentLog::open(&dir).unwrap();
        for from in (1..=2000).step_by(10) {
            log.replace_from(from, &encoded(from, from + 9, 1)).unwrap();
        }
        assert!(log.active > 3, "only {} segments", log.active + 1);
        // A new leader replaces everything from 1500 on, then 1800 on goes.
        log.replace_from(1500, &encoded(1500, 1900, 2)).unwrap();
        log.replace_from(1800, &[]).unwrap();
        assert_eq!(log.last_index(), 1799);
        let seen = terms(&log, 1495, 5000);
        assert_eq!(seen.len(), 305);
        assert_eq!(seen[4], (1499, 1));
        assert_eq!(seen[5], (1500, 2));
        assert!(
            log.replace_from(1801, &encoded(1801, 1801, 2)).is_err(),
            "a gap"
        );
        log.checkpoint().unwrap();
        // Written after the checkpoint: cut off on open.
        log.replace_from(1800, &encoded(1800, 1900, 3)).unwrap();
        drop(log);
        let log = SegmentLog::open(&dir).unwrap();
        assert_eq!(log.last_index(), 1799);
        assert_eq!(terms(&log, 1, 5000).len(), 1799);
        assert_eq!(terms(&log, 1799, 1799), vec![(1799, 2)]);
        drop(log);
        // A checkpointed segment gone missing is damage, named.
        let victim = segment_path(&dir.join(LOG_DIR), 1);
        std::fs::remove_file(&victim).unwrap();
        let err = SegmentLog::open(&dir)
            .err()
            .expect("opened without a segment");
        assert_eq!(err.file, victim);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
