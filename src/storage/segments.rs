//! The log in append-only segment files under `<data>/log/`, which are
//! also its write-ahead log: a write batch is appended as records and made
//! durable with one `fdatasync` of the active segment. Nothing else holds
//! a copy of the entries.
//!
//! Why not sled: sled copies a leaf on every insert (most of a store
//! thread's time under load), and it keeps every page a scan touched in
//! memory until 64 later accesses land in the same one of its 256 cache
//! shards, so one export or restart left the whole log resident. Here a
//! write is one `pwrite` at the end of a file and a read is one `pread`
//! per record; the kernel's page cache does the caching, outside the
//! node's memory.
//!
//! A record is a sequenced frame (`codec.rs`): `[magic "CSL2"][crc32]
//! [payload length][sequence number][payload]`, the sequence number one
//! more per record across all segments, from a random start. The payload
//! is a kind byte and then:
//! - entries: `[from: u64 LE]` and a chunk of entries (`chunk.rs`):
//!   "entries from `from` on are replaced by these";
//! - removal: `[from: u64 LE]`: "entries from `from` on are removed";
//! - hard state: `[term][vote or 0][commit]` (u64 LE): the node's hard
//!   state from here on (sled keeps a copy as of the last checkpoint).
//!
//! Reading the records in order gives the log and the latest hard state.
//! A write's entries are split into records of at most `CHUNK_BYTES`, so
//! reading one entry never reads much more.
//!
//! On open, a bad record is either a torn tail (a crash during a write
//! that was never acknowledged: cut off, once the store has passed its
//! checks) or damage (the file changed after it was written: refused,
//! naming the file, because acknowledged writes after it would be lost).
//! What tells them apart is an intact record after the bad one: every
//! later offset is tried, as a damaged length says nothing of where the
//! next record starts; the magic makes that cheap, and the sequence
//! numbers keep the bytes of a record inside a client's message from
//! passing for one of ours. Only the last segment can end in a torn write:
//! a segment is synced before the next one is created.
//!
//! The active segment is filled with zeros ahead of its records
//! (`PREALLOCATE` bytes at a time), written rather than `fallocate`d: an
//! `fdatasync` after overwriting blocks that are already written has no
//! file length and no extent to record, only data to flush (ext4, 2 KB
//! writes: 0.12 ms instead of 0.16 after `fallocate`, which leaves
//! unwritten extents to convert, and 0.18-0.21 appending; 0.15 instead of
//! 0.21 with two files syncing at once), and one runs per write batch on
//! every node. The zeros cost one larger sync per `PREALLOCATE` bytes, and
//! a second copy of every byte of the log: a write of `ZERO_FILL_BELOW`
//! or more (a busy pipelined round) goes on past them without filling
//! more, as what they save is a fixed part of each sync.
//! Zeros after the last record are therefore room, not a torn write; a
//! full segment is trimmed to its records before the next one starts.
//!
//! Once durable, the log's pages more than `KEEP_CACHED` bytes behind its
//! end are dropped from the page cache (`POSIX_FADV_DONTNEED`): only a
//! follower far behind, a catch-up or an export reads that far back, and
//! they read it in order. Without it, every byte the log writes lands in
//! a page the kernel has to find afresh: on a VM whose host takes back
//! free memory (virtio-balloon free page reporting, as on this project's
//! bench machine) each such page faults on the host, and copying into
//! the page cache ran at 0.3-1 GB/s instead of 3.5-4 GB/s with the old
//! pages recycled, a sixth of a core per node under a pipelined client.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use super::chunk;
use super::codec::{self, FrameError, Reader, MAX_RECORD};
use crate::raft::{Entry, HardState, Index};
use crate::zero_copy;

/// The directory of the segments, inside the data directory.
pub const LOG_DIR: &str = "log";
/// The file name extension of a segment.
pub const SEGMENT_EXTENSION: &str = "wal";
const MAGIC: [u8; 4] = *b"CSL2";
const KIND_ENTRIES: u8 = 1;
const KIND_REMOVAL: u8 = 2;
const KIND_HARD_STATE: u8 = 3;
/// The smallest record: a header, a kind and a `from`.
const MIN_RECORD: usize = codec::SEQUENCED_HEADER + 9;
/// A new segment starts once the active one has grown past this (small
/// in unit tests, so that they cross segments).
const SEGMENT_BYTES: u64 = if cfg!(test) { 4 << 10 } else { 64 << 20 };
/// How far ahead of its records the active segment is allocated (small in
/// unit tests, so that they cross it).
const PREALLOCATE: u64 = if cfg!(test) { 1 << 10 } else { 4 << 20 };
/// Writes of entries this large or larger go past the zeros without
/// filling more, and so does the hard state written after them: what the
/// zeros save is a fixed part of each sync (recording a longer file),
/// worth their copy for the few kilobytes of a small batch but not for a
/// large one, where writing every byte of the log twice was the larger
/// cost (a write of a pipelined client's round is tens of KB or more).
const ZERO_FILL_BELOW: usize = if cfg!(test) { 512 } else { 16 << 10 };
/// How much of the end of the log stays in the page cache once synced
/// (small in unit tests, so that they see pages dropped).
const KEEP_CACHED: u64 = if cfg!(test) { 16 << 10 } else { 256 << 20 };
/// Pages are dropped this much at a time, so a small batch's sync does
/// not cost another syscall.
const DROP_STEP: u64 = if cfg!(test) { 4 << 10 } else { 4 << 20 };
/// The page size `DROP_STEP` and the drops are aligned to.
const PAGE: u64 = 4 << 10;
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
pub(super) fn error(file: &Path, what: impl ToString) -> LogError {
    LogError {
        file: file.to_path_buf(),
        what: what.to_string(),
        damaged: false,
    }
}

/// Damage found in `file`.
pub(super) fn damage(file: &Path, what: impl ToString) -> LogError {
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

/// One record of the log.
#[derive(Debug, PartialEq, Eq)]
enum Record<'a> {
    Entries { from: Index, chunk: &'a [u8] },
    Removal { from: Index },
    HardState(HardState),
}

/// Where a record of entries lies: `count` entries from `first`, in
/// `segment` at `offset`, `len` bytes with its header.
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

/// The path of segment `id` in the log directory `dir`.
pub(super) fn segment_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{id:08}.{SEGMENT_EXTENSION}"))
}

/// A torn write found at the end of the last segment on open.
#[derive(Clone, Debug)]
pub(super) struct TornTail {
    pub(super) file: PathBuf,
    /// Where the intact records end, and how long the file was.
    pub(super) valid: u64,
    pub(super) len: u64,
}

/// The writer's side of the log; `reader` hands out readers.
pub struct SegmentLog {
    shared: Arc<Shared>,
    /// The segment written to, and how long it is.
    active: u32,
    active_len: u64,
    /// How long the active segment's file is: records, then zeros
    /// allocated ahead of them.
    allocated: u64,
    /// Off after allocating ahead failed once (the file system cannot, or
    /// is full): writes then only append.
    preallocate: bool,
    /// The sequence number of the next record.
    next_seq: u64,
    /// Written since the last sync.
    unsynced: bool,
    /// Bytes appended since this log was opened.
    appended: u64,
    /// What this log wrote that may still be in the page cache, oldest
    /// first: (segment, from, to) byte ranges, and their total.
    cached: VecDeque<(u32, u64, u64)>,
    cached_bytes: u64,
    /// Cut before anything is written after it (`cut_torn_tail`).
    torn_tail: Option<TornTail>,
    /// The latest hard state the log records.
    hard_state: Option<HardState>,
}

impl SegmentLog {
    /// Opens the log in `data_dir`, creating it if there is none. A torn
    /// write at its end is left in the file until `cut_torn_tail` (or the
    /// next write), so a store that its other checks refuse keeps the file
    /// as it was found.
    pub fn open(data_dir: &Path) -> Result<SegmentLog, LogError> {
        let dir = data_dir.join(LOG_DIR);
        if !dir.exists() {
            std::fs::create_dir(&dir).map_err(|e| error(&dir, e))?;
            sync_dir(data_dir)?;
        }
        let ids = segment_ids(&dir)?;
        let mut index = Index_::default();
        let mut hard_state = None;
        let mut last_seq = None;
        let mut torn_tail = None;
        let mut active_len = 0;
        let mut allocated = 0;
        for (position, id) in ids.iter().enumerate() {
            let path = segment_path(&dir, *id);
            if *id as usize != position {
                return Err(damage(
                    &segment_path(&dir, position as u32),
                    "missing, while later segments are there",
                ));
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| error(&path, e))?;
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut &file, &mut bytes).map_err(|e| error(&path, e))?;
            let last = position + 1 == ids.len();
            let valid = read_segment(&bytes, last, &mut last_seq, &mut |offset, len, record| {
                apply_to_index(&mut index, &mut hard_state, *id, offset, len, record)
            })
            .map_err(|what| damage(&path, what))?;
            if !is_room(&bytes[valid..]) {
                torn_tail = Some(TornTail {
                    file: path.clone(),
                    valid: valid as u64,
                    len: bytes.len() as u64,
                });
            }
            active_len = valid as u64;
            allocated = bytes.len() as u64;
            index.segments.push(Arc::new(file));
        }
        let active = ids.len().saturating_sub(1) as u32;
        if ids.is_empty() {
            let path = segment_path(&dir, 0);
            let file = create_segment(&dir, &path)?;
            index.segments.push(Arc::new(file));
        }
        Ok(SegmentLog {
            shared: Arc::new(Shared {
                dir,
                index: RwLock::new(index),
            }),
            active,
            active_len,
            allocated,
            preallocate: true,
            next_seq: last_seq.map_or_else(random_seq, |seq: u64| seq.wrapping_add(1)),
            unsynced: false,
            appended: 0,
            cached: VecDeque::new(),
            cached_bytes: 0,
            torn_tail,
            hard_state,
        })
    }

    /// Removes every segment in `data_dir` (durably), then opens an empty
    /// log there: to fill it again from elsewhere.
    pub(super) fn create_empty(data_dir: &Path) -> Result<SegmentLog, LogError> {
        let dir = data_dir.join(LOG_DIR);
        if dir.exists() {
            let ids = segment_ids(&dir)?;
            for id in ids.iter().rev() {
                let path = segment_path(&dir, *id);
                std::fs::remove_file(&path).map_err(|e| error(&path, e))?;
            }
            if !ids.is_empty() {
                sync_dir(&dir)?;
            }
        }
        SegmentLog::open(data_dir)
    }

    pub fn last_index(&self) -> Index {
        self.shared
            .index
            .read()
            .map_or(0, |index| index.last_index())
    }

    /// The latest hard state the log records, if any.
    pub(super) fn hard_state(&self) -> Option<HardState> {
        self.hard_state
    }

    /// The torn write found at the end on open, until it is cut.
    pub(super) fn torn_tail(&self) -> Option<&TornTail> {
        self.torn_tail.as_ref()
    }

    /// Bytes appended since the log was opened.
    pub(super) fn appended(&self) -> u64 {
        self.appended
    }

    pub fn reader(&self) -> SegmentReader {
        SegmentReader {
            shared: self.shared.clone(),
        }
    }

    /// Replaces the entries from `from` on with `entries` (encoded), or
    /// removes them if there are none. Durable at the next `sync`.
    pub fn replace_from<T: AsRef<[u8]>>(
        &mut self,
        from: Index,
        entries: &[T],
    ) -> Result<(), LogError> {
        self.prepare_append()?;
        let mut bytes = Vec::new();
        let mut locs = Vec::new();
        let runs = chunk::runs(entries);
        if runs.is_empty() {
            let mut payload = vec![KIND_REMOVAL];
            codec::put_u64(&mut payload, from);
            self.frame(&mut bytes, &payload);
        }
        let path = self.shared.segment_path(self.active);
        let too_large = |what: &str| error(&path, format!("{what} too large for a segment"));
        // Each record is framed in place: the entries are copied once,
        // into the bytes written.
        bytes.reserve(
            runs.iter()
                .map(|(_, run)| codec::SEQUENCED_HEADER + 9 + chunk::encoded_len(run))
                .sum(),
        );
        for (offset, run) in runs {
            let first = from + offset as Index;
            let at = self.active_len + bytes.len() as u64;
            let len = self.frame_with(&mut bytes, |payload| {
                payload.push(KIND_ENTRIES);
                codec::put_u64(payload, first);
                codec::put_list(payload, run);
            });
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
        let last = self
            .shared
            .index
            .read()
            .map_err(|_| error(&path, "poisoned"))?
            .last_index();
        if from == 0 || from > last + 1 {
            return Err(error(
                &path,
                format!("a write from index {from} would leave a gap after {last}"),
            ));
        }
        // Bytes first, then the index: a reader never finds a record
        // that is not there yet.
        self.append(&bytes, bytes.len() < ZERO_FILL_BELOW)?;
        let mut index = self
            .shared
            .index
            .write()
            .map_err(|_| error(&path, "poisoned"))?;
        index.truncate(from);
        index.locs.extend(locs);
        Ok(())
    }

    /// Records `hard_state` as the node's from here on. Durable at the
    /// next `sync`.
    pub fn put_hard_state(&mut self, hard_state: HardState) -> Result<(), LogError> {
        self.prepare_append()?;
        let mut payload = vec![KIND_HARD_STATE];
        for value in [
            hard_state.term,
            hard_state.vote.unwrap_or(0),
            hard_state.commit,
        ] {
            codec::put_u64(&mut payload, value);
        }
        let mut bytes = Vec::new();
        self.frame(&mut bytes, &payload);
        // Never fills: it follows a batch's entries, whose size decides.
        self.append(&bytes, false)?;
        self.hard_state = Some(hard_state);
        Ok(())
    }

    /// Makes everything written durable: one `fdatasync` of the active
    /// segment (the ones before it were synced when it was created).
    pub fn sync(&mut self) -> Result<(), LogError> {
        if !std::mem::take(&mut self.unsynced) {
            return Ok(());
        }
        let path = self.shared.segment_path(self.active);
        self.active_file()?
            .sync_data()
            .map_err(|e| error(&path, e))?;
        self.drop_cached_behind();
        Ok(())
    }

    /// Drops the synced pages more than `KEEP_CACHED` behind the end from
    /// the page cache, `DROP_STEP` or more at a time.
    fn drop_cached_behind(&mut self) {
        while self.cached_bytes >= KEEP_CACHED + DROP_STEP {
            let Some(&(segment, from, to)) = self.cached.front() else {
                break;
            };
            // Only the last range can be in the active segment: appends to
            // one segment extend one range.
            let sealed = self.cached.len() > 1;
            let excess = self.cached_bytes - KEEP_CACHED;
            let end = if sealed && from + excess >= to {
                to
            } else {
                // Whole pages: the kernel keeps a partial one.
                (from + excess).min(to) / PAGE * PAGE
            };
            if end <= from {
                break;
            }
            // A sealed segment goes to its end, its last partial page too.
            self.drop_cached(
                segment,
                from,
                if end == to && sealed { 0 } else { end - from },
            );
            self.cached_bytes -= end - from;
            match self.cached.front_mut() {
                Some(front) if end < to => front.1 = end,
                _ => {
                    self.cached.pop_front();
                }
            }
        }
    }

    /// `POSIX_FADV_DONTNEED` on `len` bytes (0: to the end) of `segment`
    /// from `from`. Only an optimization: a failure is logged and the
    /// pages stay.
    fn drop_cached(&self, segment: u32, from: u64, len: u64) {
        let Ok(file) = self.segment_file(segment) else {
            return;
        };
        // SAFETY: a syscall on a descriptor that `file` keeps open; it
        // touches no memory of this process.
        let result = unsafe {
            libc::posix_fadvise(
                file.as_raw_fd(),
                from as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_DONTNEED,
            )
        };
        if result != 0 {
            tracing::debug!(
                file = %self.shared.segment_path(segment).display(),
                error = %std::io::Error::from_raw_os_error(result),
                "cannot drop the log's older pages from the page cache"
            );
        }
    }

    /// Syncs the active segment even if this process wrote nothing to it:
    /// on open, what an earlier process wrote may still be only in the
    /// page cache.
    pub fn sync_written(&mut self) -> Result<(), LogError> {
        self.unsynced = true;
        self.sync()
    }

    /// Drops the torn write found on open, if any: records written after
    /// it would be followed by its leftovers.
    pub fn cut_torn_tail(&mut self) -> Result<(), LogError> {
        let Some(torn) = self.torn_tail.take() else {
            return Ok(());
        };
        let file = self.active_file()?;
        file.set_len(torn.valid)
            .and_then(|_| file.sync_data())
            .map_err(|e| error(&torn.file, e))?;
        self.allocated = torn.valid;
        tracing::warn!(
            file = %torn.file.display(),
            kept = torn.valid,
            cut = torn.len - torn.valid,
            "cut a torn write off the end of the log (a crash during a write that was never acknowledged)"
        );
        Ok(())
    }

    /// Appends a sequenced frame of `payload` to `bytes`; its length.
    fn frame(&mut self, bytes: &mut Vec<u8>, payload: &[u8]) -> usize {
        self.frame_with(bytes, |out| out.extend_from_slice(payload))
    }

    /// `frame` of the payload that `payload` appends in place.
    fn frame_with(&mut self, bytes: &mut Vec<u8>, payload: impl FnOnce(&mut Vec<u8>)) -> usize {
        let start = bytes.len();
        codec::put_sequenced_with(bytes, &MAGIC, self.next_seq, payload);
        self.next_seq = self.next_seq.wrapping_add(1);
        bytes.len() - start
    }

    /// Before a write: the torn tail goes, and a full segment makes way
    /// for a new one.
    fn prepare_append(&mut self) -> Result<(), LogError> {
        self.cut_torn_tail()?;
        if self.active_len >= SEGMENT_BYTES {
            self.rotate()?;
        }
        Ok(())
    }

    /// Writes `bytes` after the records, first filling zeros ahead if
    /// `fill` and they would pass the room.
    fn append(&mut self, bytes: &[u8], fill: bool) -> Result<(), LogError> {
        let path = self.shared.segment_path(self.active);
        let file = self.active_file()?;
        let end = self.active_len + bytes.len() as u64;
        if end > self.allocated && self.preallocate && fill {
            self.allocate_ahead(&file, &path, end);
        }
        file.write_all_at(bytes, self.active_len)
            .map_err(|e| error(&path, e))?;
        match self.cached.back_mut() {
            Some((segment, _, to)) if *segment == self.active && *to == self.active_len => {
                *to = end
            }
            _ => self.cached.push_back((self.active, self.active_len, end)),
        }
        self.cached_bytes += bytes.len() as u64;
        self.active_len = end;
        self.appended += bytes.len() as u64;
        self.unsynced = true;
        Ok(())
    }

    /// Fills the active segment with zeros up to `PREALLOCATE` bytes past
    /// `end`. Only an optimization: a failure turns it off and the write
    /// goes on (`allocated` still covers the zeros written, so a full
    /// segment is trimmed of them).
    fn allocate_ahead(&mut self, file: &File, path: &Path, end: u64) {
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        let target = end + PREALLOCATE;
        let mut offset = self.allocated.max(self.active_len);
        while offset < target {
            let len = (target - offset).min(ZEROS.len() as u64) as usize;
            if let Err(e) = file.write_all_at(&ZEROS[..len], offset) {
                self.preallocate = false;
                tracing::warn!(
                    file = %path.display(),
                    error = %e,
                    "cannot fill the log with zeros ahead of its writes; appending without (each sync costs a little more)"
                );
                break;
            }
            offset += len as u64;
            self.allocated = offset;
        }
    }

    fn active_file(&self) -> Result<Arc<File>, LogError> {
        self.segment_file(self.active)
    }

    /// Segment `id`'s open file, from the index the readers share.
    fn segment_file(&self, id: u32) -> Result<Arc<File>, LogError> {
        let path = self.shared.segment_path(id);
        self.shared
            .index
            .read()
            .map_err(|_| error(&path, "poisoned"))?
            .segments
            .get(id as usize)
            .cloned()
            .ok_or_else(|| error(&path, "not open"))
    }

    /// Starts a new segment. The full one is synced first, so that only
    /// the last segment can ever end in a torn write, and the new one's
    /// name is synced before anything in it is.
    fn rotate(&mut self) -> Result<(), LogError> {
        if self.allocated > self.active_len {
            let path = self.shared.segment_path(self.active);
            self.active_file()?
                .set_len(self.active_len)
                .map_err(|e| error(&path, e))?;
            self.unsynced = true;
        }
        self.sync()?;
        let id = self.active + 1;
        let path = self.shared.segment_path(id);
        let file = create_segment(&self.shared.dir, &path)?;
        self.shared
            .index
            .write()
            .map_err(|_| error(&path, "poisoned"))?
            .segments
            .push(Arc::new(file));
        self.active = id;
        self.active_len = 0;
        self.allocated = 0;
        Ok(())
    }
}

/// Creates an empty segment at `path` and syncs its name into `dir`.
fn create_segment(dir: &Path, path: &Path) -> Result<File, LogError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| error(path, e))?;
    sync_dir(dir)?;
    Ok(file)
}

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| error(dir, e))
}

/// The ids of the segments in the log directory `dir`, in order.
fn segment_ids(dir: &Path) -> Result<Vec<u32>, LogError> {
    let mut ids = Vec::new();
    for item in std::fs::read_dir(dir).map_err(|e| error(dir, e))? {
        let item = item.map_err(|e| error(dir, e))?;
        let name = item.file_name().to_string_lossy().to_string();
        if let Some(id) = name.strip_suffix(&format!(".{SEGMENT_EXTENSION}")) {
            let id = id
                .parse::<u32>()
                .map_err(|_| damage(&item.path(), "not a segment of this log"))?;
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// A first sequence number nobody outside this process can predict (std's
/// hasher keys come from the operating system's random source).
fn random_seq() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// Applies one record read on open to the index being built.
fn apply_to_index(
    index: &mut Index_,
    hard_state: &mut Option<HardState>,
    segment: u32,
    offset: usize,
    len: usize,
    record: Record<'_>,
) -> Result<(), String> {
    let (from, chunk) = match record {
        Record::HardState(recorded) => {
            *hard_state = Some(recorded);
            return Ok(());
        }
        Record::Removal { from } => (from, None),
        Record::Entries { from, chunk } => (from, Some(chunk)),
    };
    let last = index.last_index();
    if from == 0 || from > last + 1 {
        return Err(format!(
            "offset {offset}: a record from index {from} after a log ending at {last}"
        ));
    }
    index.truncate(from);
    if let Some(chunk) = chunk {
        let count = chunk::count(chunk).map_err(|what| format!("offset {offset}: {what}"))?;
        index.locs.push(Loc {
            first: from,
            count: u32::try_from(count).map_err(|_| format!("offset {offset}: {count} entries"))?,
            segment,
            offset: u32::try_from(offset).map_err(|_| format!("offset {offset}: too far"))?,
            len: len as u32,
        });
    }
    Ok(())
}

/// Reads the records of one segment in order, handing each to `each` with
/// its offset and length; `last_seq` carries the sequence numbers from one
/// segment to the next. Returns how many bytes the intact records span:
/// less than `bytes` only for a torn write at the end of the `last`
/// segment. Damage is an error.
fn read_segment(
    bytes: &[u8],
    last: bool,
    last_seq: &mut Option<u64>,
    each: &mut dyn FnMut(usize, usize, Record<'_>) -> Result<(), String>,
) -> Result<usize, String> {
    let mut at = 0;
    while at < bytes.len() {
        let problem = match record_at(&bytes[at..]) {
            Ok((seq, record, len)) => match *last_seq {
                Some(previous) if seq != previous.wrapping_add(1) => {
                    format!("sequence number {seq} after {previous}")
                }
                _ => {
                    each(at, len, record)?;
                    *last_seq = Some(seq);
                    at += len;
                    continue;
                }
            },
            Err(problem) => problem,
        };
        // Allocated ahead and never written: only the active segment has
        // such room (a full one is trimmed and synced before the next is
        // created), so zeros at the end of an earlier one are damage.
        if last && is_room(&bytes[at..]) {
            return Ok(at);
        }
        if !last {
            return Err(format!(
                "the record at offset {at} is damaged ({problem}), and later segments follow"
            ));
        }
        if let Some(intact) = intact_record_after(bytes, at, *last_seq) {
            return Err(format!(
                "the record at offset {at} is damaged ({problem}) and an intact record follows at offset {intact}"
            ));
        }
        return Ok(at);
    }
    Ok(at)
}

/// Whether `tail`, after a segment's last record, is only space allocated
/// ahead (zeros), as opposed to a torn write.
fn is_room(tail: &[u8]) -> bool {
    tail.iter().all(|byte| *byte == 0)
}

/// The record at the start of `rest`: its sequence number, what it says
/// and its length; or what is wrong with it.
fn record_at(rest: &[u8]) -> Result<(u64, Record<'_>, usize), String> {
    let frame = codec::sequenced_at(rest, &MAGIC, 9..=MAX_RECORD)
        .ok_or("no record starts here")?
        .map_err(|error| match error {
            FrameError::HeaderCut { have } => format!("its header is cut short at {have} bytes"),
            FrameError::Length { len } => format!("a length of {len} bytes"),
            FrameError::PayloadCut { len, .. } => {
                format!("its length {len} runs past the end of the file")
            }
        })?;
    if !frame.intact() {
        return Err("checksum mismatch".into());
    }
    let record = parse_payload(frame.payload)?;
    Ok((frame.seq, record, frame.len()))
}

fn parse_payload(payload: &[u8]) -> Result<Record<'_>, String> {
    let mut reader = Reader::new(payload);
    let record = match reader.u8()? {
        KIND_ENTRIES => {
            let from = reader.u64()?;
            if reader.is_empty() {
                return Err("a record of entries without entries".into());
            }
            Record::Entries {
                from,
                chunk: reader.rest(),
            }
        }
        KIND_REMOVAL => Record::Removal {
            from: reader.u64()?,
        },
        KIND_HARD_STATE => {
            let term = reader.u64()?;
            let vote = reader.u64()?;
            let commit = reader.u64()?;
            Record::HardState(HardState {
                term,
                vote: (vote != 0).then_some(vote),
                commit,
            })
        }
        kind => return Err(format!("unknown record kind {kind}")),
    };
    if !matches!(record, Record::Entries { .. }) && !reader.is_empty() {
        return Err(format!("{} trailing bytes", reader.rest().len()));
    }
    Ok(record)
}

/// Where the first intact record after the bad one at `at` starts, if one
/// does: one whose sequence number can follow the last good record's.
fn intact_record_after(bytes: &[u8], at: usize, last_seq: Option<u64>) -> Option<usize> {
    (at + 1..bytes.len()).find(|&offset| {
        codec::intact_sequenced_at(
            &bytes[offset..],
            &MAGIC,
            last_seq,
            offset - at,
            MIN_RECORD,
            |payload| parse_payload(payload).is_ok(),
        )
        .unwrap_or(false)
    })
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
                // Named only when something is wrong: formatting it for
                // every record was a tenth of reading a far follower's
                // appends back.
                let path = || self.shared.segment_path(loc.segment);
                let damaged = |what: String| {
                    ScanError::Damaged(damage(&path(), format!("offset {}: {what}", loc.offset)))
                };
                let mut record = vec![0u8; loc.len as usize];
                file.read_exact_at(&mut record, loc.offset as u64)
                    .map_err(|e| damaged(e.to_string()))?;
                // Messages stay in the record's buffer (`zero_copy`).
                let record = bytes::Bytes::from(record);
                let (first, chunk) = match record_at(&record).map_err(damaged)? {
                    (_, Record::Entries { from, chunk }, _) => (from, chunk),
                    _ => {
                        return Err(damaged(
                            "the index points at a record without entries".into(),
                        ))
                    }
                };
                let entries = chunk::split(chunk).map_err(damaged)?;
                if first != loc.first || first > expected {
                    return Err(damaged(format!(
                        "a record from index {first} where {expected} was expected"
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
                    let entry = zero_copy::sharing(&record, || codec::decode_entry(bytes))
                        .map_err(|what| {
                            ScanError::Damaged(damage(
                                &path(),
                                format!("log entry {index}: {what}"),
                            ))
                        })?;
                    if entry.index != index {
                        return Err(ScanError::Damaged(damage(
                            &path(),
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

/// Decodes a segment's records as the store does on open: each record of
/// entries' `from` and entry count (0 for a removal; hard states are
/// skipped). Damage is an error, a torn end is not. Public for the fuzz
/// targets and property tests.
pub fn decode_segment(bytes: &[u8]) -> Result<Vec<(Index, u64)>, super::DecodeError> {
    let mut records = Vec::new();
    read_segment(bytes, true, &mut None, &mut |_, _, record| {
        match record {
            Record::Entries { from, chunk } => records.push((from, chunk::count(chunk)?)),
            Record::Removal { from } => records.push((from, 0)),
            Record::HardState(_) => {}
        }
        Ok(())
    })
    .map_err(super::DecodeError)?;
    Ok(records)
}

/// The records of the segment file at `path`, without the room allocated
/// after them.
#[cfg(test)]
pub(crate) fn written(path: &Path) -> Vec<u8> {
    let mut bytes = std::fs::read(path).expect("read a segment");
    let end = read_segment(&bytes, true, &mut None, &mut |_, _, _| Ok(())).expect("a segment");
    bytes.truncate(end);
    bytes
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
    fn crosses_segments_truncates_and_keeps_what_it_wrote() {
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
        log.replace_from::<Vec<u8>>(1800, &[]).unwrap();
        let hard_state = HardState {
            term: 2,
            vote: Some(3),
            commit: 1700,
        };
        log.put_hard_state(hard_state).unwrap();
        assert_eq!(log.last_index(), 1799);
        let seen = terms(&log, 1495, 5000);
        assert_eq!(seen.len(), 305);
        assert_eq!(seen[4], (1499, 1));
        assert_eq!(seen[5], (1500, 2));
        assert!(
            log.replace_from(1801, &encoded(1801, 1801, 2)).is_err(),
            "a gap"
        );
        log.sync().unwrap();
        drop(log);
        let mut log = SegmentLog::open(&dir).unwrap();
        assert_eq!(log.last_index(), 1799);
        assert_eq!(log.hard_state(), Some(hard_state));
        assert!(log.torn_tail().is_none());
        assert_eq!(terms(&log, 1, 5000).len(), 1799);
        assert_eq!(terms(&log, 1799, 1799), vec![(1799, 2)]);
        // Writing on after a reopen continues the sequence.
        log.replace_from(1800, &encoded(1800, 1800, 3)).unwrap();
        drop(log);
        let log = SegmentLog::open(&dir).unwrap();
        assert_eq!(terms(&log, 1800, 1800), vec![(1800, 3)]);
        drop(log);
        // A segment gone missing before the last is damage, named.
        let victim = segment_path(&dir.join(LOG_DIR), 1);
        std::fs::remove_file(&victim).unwrap();
        let err = SegmentLog::open(&dir)
            .err()
            .expect("opened without a segment");
        assert_eq!(err.file, victim);
        assert!(err.damaged);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_torn_tail_is_cut_and_damage_before_intact_records_refused() {
        let dir = std::env::temp_dir().join(format!("cs-segments-torn-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut log = SegmentLog::open(&dir).unwrap();
        for from in 1..=4 {
            log.replace_from(from, &encoded(from, from, 1)).unwrap();
        }
        log.sync().unwrap();
        drop(log);
        let path = segment_path(&dir.join(LOG_DIR), 0);
        let intact = written(&path);
        let record = intact.len() / 4;
        // The last record cut short: a torn write, cut once asked.
        std::fs::write(&path, &intact[..intact.len() - 5]).unwrap();
        let mut log = SegmentLog::open(&dir).unwrap();
        assert_eq!(log.last_index(), 3);
        assert_eq!(log.torn_tail().map(|t| t.valid), Some(3 * record as u64));
        assert_eq!(
            std::fs::read(&path).unwrap().len(),
            intact.len() - 5,
            "cut before being asked"
        );
        log.cut_torn_tail().unwrap();
        assert_eq!(std::fs::read(&path).unwrap().len(), 3 * record);
        log.replace_from(4, &encoded(4, 4, 2)).unwrap();
        drop(log);
        assert_eq!(
            terms(&SegmentLog::open(&dir).unwrap(), 1, 10),
            vec![(1, 1), (2, 1), (3, 1), (4, 2)]
        );
        // A flipped byte in the second record, with intact ones after it:
        // damage, named, and the file left as it was.
        let mut damaged = std::fs::read(&path).unwrap();
        damaged[record + 30] ^= 0xff;
        std::fs::write(&path, &damaged).unwrap();
        let err = SegmentLog::open(&dir).err().expect("opened damaged");
        assert_eq!(err.file, path);
        assert!(
            err.damaged && err.what.contains("offset") && err.what.contains("intact"),
            "{}",
            err.what
        );
        assert_eq!(std::fs::read(&path).unwrap(), damaged);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The room ahead of the records is written zeros, not `fallocate`d
    /// space: the filesystem sees no hole in the file (ext4 reports
    /// unwritten extents as holes), so a sync there overwrites written
    /// blocks and has no extent to convert (BENCHMARKS.md: 64 clients +9%).
    #[test]
    fn room_ahead_is_written_zeros_not_unwritten_extents() {
        let dir = std::env::temp_dir().join(format!("cs-segments-zeros-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut log = SegmentLog::open(&dir).unwrap();
        // One entry at a time until the room reaches into a second 4 KiB
        // block, the records still in the first segment's first block.
        let mut next = 1;
        while log.allocated <= 4 << 10 {
            log.replace_from(next, &encoded(next, next, 1)).unwrap();
            next += 1;
        }
        assert_eq!(log.active, 0, "the records crossed a segment");
        log.sync().unwrap();
        let file = File::open(segment_path(&dir.join(LOG_DIR), 0)).unwrap();
        let len = file.metadata().unwrap().len();
        assert!(len > 4 << 10, "{len} bytes");
        // SAFETY: `file` stays open for the call, which reads none of our
        // memory.
        let hole =
            unsafe { libc::lseek(std::os::fd::AsRawFd::as_raw_fd(&file), 0, libc::SEEK_HOLE) };
        assert_eq!(
            u64::try_from(hole).ok(),
            Some(len),
            "a hole or unwritten range at {hole} in the {len} bytes of the segment"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A large write, and the small hard state after it, go past the room
    /// without filling more zeros (they would double what it writes); the
    /// next small write of entries fills again.
    #[test]
    fn only_small_writes_fill_zeros_ahead() {
        let dir = std::env::temp_dir().join(format!("cs-segments-large-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut log = SegmentLog::open(&dir).unwrap();
        let large = encoded(1, 60, 1);
        assert!(large.iter().map(Vec::len).sum::<usize>() >= ZERO_FILL_BELOW);
        log.replace_from(1, &large).unwrap();
        // Nor does the small hard state written after it.
        log.put_hard_state(HardState {
            term: 1,
            vote: Some(1),
            commit: 60,
        })
        .unwrap();
        log.sync().unwrap();
        let first = segment_path(&dir.join(LOG_DIR), 0);
        let records = written(&first).len() as u64;
        assert_eq!(std::fs::metadata(&first).unwrap().len(), records);
        log.replace_from(61, &encoded(61, 61, 1)).unwrap();
        log.sync().unwrap();
        let records = written(&first).len() as u64;
        let len = std::fs::metadata(&first).unwrap().len();
        assert!(
            len >= records + PREALLOCATE,
            "{len} bytes for {records} of records"
        );
        drop(log);
        // Reopened, every entry is there and the zeros are room.
        let log = SegmentLog::open(&dir).unwrap();
        assert!(log.torn_tail().is_none());
        assert_eq!(log.last_index(), 61);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Pages of `path` in the page cache.
    fn resident_pages(path: &Path) -> usize {
        let file = File::open(path).unwrap();
        let len = file.metadata().unwrap().len() as usize;
        if len == 0 {
            return 0;
        }
        let mut pages = vec![0u8; len.div_ceil(PAGE as usize)];
        // SAFETY: the mapping is only passed to `mincore` (never read)
        // and unmapped before `file` closes.
        unsafe {
            let addr = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(addr, libc::MAP_FAILED);
            assert_eq!(libc::mincore(addr, len, pages.as_mut_ptr()), 0);
            libc::munmap(addr, len);
        }
        pages.iter().filter(|page| *page & 1 == 1).count()
    }

    #[test]
    fn synced_pages_far_behind_the_end_leave_the_page_cache() {
        // Under the package's target directory: /tmp may be a tmpfs,
        // whose pages cannot be dropped.
        let dir = Path::new("target").join(format!("cs-segments-cached-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut log = SegmentLog::open(&dir).unwrap();
        let mut next = 1;
        while log.appended() < 4 * (KEEP_CACHED + DROP_STEP) {
            log.replace_from(next, &encoded(next, next + 9, 1)).unwrap();
            log.sync().unwrap();
            next += 10;
        }
        let log_dir = dir.join(LOG_DIR);
        let mut behind = 0;
        for id in segment_ids(&log_dir).unwrap().into_iter().rev() {
            let path = segment_path(&log_dir, id);
            let resident = resident_pages(&path);
            if behind >= KEEP_CACHED + DROP_STEP {
                assert_eq!(resident, 0, "{} is far behind the end", path.display());
            }
            if behind + std::fs::metadata(&path).unwrap().len() <= KEEP_CACHED {
                assert!(resident > 0, "{} is near the end", path.display());
            }
            behind += written(&path).len() as u64;
        }
        assert!(behind >= 4 * (KEEP_CACHED + DROP_STEP));
        // What left the page cache reads back from the disk.
        drop(log);
        let log = SegmentLog::open(&dir).unwrap();
        assert_eq!(log.last_index(), next - 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn room_allocated_ahead_is_neither_records_nor_a_torn_write() {
        let dir = std::env::temp_dir().join(format!("cs-segments-room-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut log = SegmentLog::open(&dir).unwrap();
        log.replace_from(1, &encoded(1, 3, 1)).unwrap();
        log.sync().unwrap();
        drop(log);
        let first = segment_path(&dir.join(LOG_DIR), 0);
        let records = written(&first).len() as u64;
        let len = std::fs::metadata(&first).unwrap().len();
        assert!(
            len >= records + PREALLOCATE,
            "{len} bytes for {records} of records"
        );
        // Reopened: the zeros are room, not a torn write, and the next
        // write lands right after the records.
        let mut log = SegmentLog::open(&dir).unwrap();
        assert!(log.torn_tail().is_none());
        assert_eq!(log.last_index(), 3);
        log.replace_from(4, &encoded(4, 4, 1)).unwrap();
        log.sync().unwrap();
        // Filled past a segment: the full one is trimmed to its records.
        let mut next = 5;
        while segment_ids(&dir.join(LOG_DIR)).unwrap().len() < 2 {
            log.replace_from(next, &encoded(next, next, 1)).unwrap();
            next += 1;
        }
        log.sync().unwrap();
        drop(log);
        assert_eq!(
            std::fs::metadata(&first).unwrap().len(),
            written(&first).len() as u64,
            "the full segment keeps room after its records"
        );
        let log = SegmentLog::open(&dir).unwrap();
        assert_eq!(log.last_index(), next - 1);
        assert_eq!(terms(&log, 1, 3), vec![(1, 1), (2, 1), (3, 1)]);
        drop(log);
        // Zeros after the records of a full segment are not room: damage.
        let full = std::fs::read(&first).unwrap();
        let mut padded = full.clone();
        padded.extend_from_slice(&[0; 64]);
        std::fs::write(&first, &padded).unwrap();
        let err = SegmentLog::open(&dir)
            .err()
            .expect("opened a padded full segment");
        assert!(err.damaged && err.file == first, "{}", err.what);
        std::fs::write(&first, &full).unwrap();
        // Bytes in the room are a torn write: cut, and the log goes on.
        let active = segment_path(&dir.join(LOG_DIR), 1);
        let end = written(&active).len();
        let mut bytes = std::fs::read(&active).unwrap();
        assert!(bytes.len() > end + 10);
        bytes[end + 7] = 0x5a;
        std::fs::write(&active, &bytes).unwrap();
        let mut log = SegmentLog::open(&dir).unwrap();
        assert_eq!(log.torn_tail().map(|torn| torn.valid), Some(end as u64));
        log.replace_from(next, &encoded(next, next, 2)).unwrap();
        log.sync().unwrap();
        drop(log);
        let log = SegmentLog::open(&dir).unwrap();
        assert!(log.torn_tail().is_none());
        assert_eq!(terms(&log, next, next), vec![(next, 2)]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
