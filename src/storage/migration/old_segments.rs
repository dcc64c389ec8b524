//! The log's segments as versions up to e7fdae5 wrote them: `log/*.seg`
//! files of frames (`[payload length: u32 LE][crc32 of payload: u32 LE]
//! [payload]`, the payload `[from: u64 LE]` and a chunk of entries or
//! nothing), durable up to where `log/position` (a sealed record: segment
//! and length) says the last checkpoint got; whatever lies past it was
//! covered by the journal. Read once, on upgrade; damage is refused by
//! name and nothing here writes.

use std::path::{Path, PathBuf};

use crate::raft::Index;
use crate::storage::chunk;
use crate::storage::codec::{self, FrameError, Reader, SealError, MAX_RECORD};
use crate::storage::segments::{damage, error, LogError, LOG_DIR};

pub(super) const POSITION_FILE: &str = "position";
pub(super) const EXTENSION: &str = "seg";
const POSITION_MAGIC: &[u8; 4] = b"CSP1";

/// One old record: entries from `from` on are replaced by `entries`
/// (removed if there are none).
pub(super) struct OldRecord<'a> {
    pub(super) from: Index,
    pub(super) entries: Vec<&'a [u8]>,
}

/// The old segment files in `data_dir`, and whether a position is there:
/// either means the log is in the old format.
pub(super) fn present(data_dir: &Path) -> Result<Vec<PathBuf>, LogError> {
    let dir = data_dir.join(LOG_DIR);
    let mut files = Vec::new();
    if !dir.exists() {
        return Ok(files);
    }
    for item in std::fs::read_dir(&dir).map_err(|e| error(&dir, e))? {
        let item = item.map_err(|e| error(&dir, e))?;
        let name = item.file_name().to_string_lossy().to_string();
        if name.ends_with(&format!(".{EXTENSION}")) || name.starts_with(POSITION_FILE) {
            files.push(item.path());
        }
    }
    files.sort();
    Ok(files)
}

/// Hands every record of the old segments in `data_dir`, up to the last
/// checkpoint, to `each`, in order.
pub(super) fn read(
    data_dir: &Path,
    each: &mut dyn FnMut(OldRecord<'_>) -> Result<(), LogError>,
) -> Result<(), LogError> {
    let dir = data_dir.join(LOG_DIR);
    let position_path = dir.join(POSITION_FILE);
    let (last_segment, last_len) = match std::fs::read(&position_path) {
        Ok(bytes) => decode_position(&bytes).map_err(|what| damage(&position_path, what))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let first = segment_path(&dir, 0);
            let len = std::fs::metadata(&first).map_or(0, |m| m.len());
            if len > 0 || segment_path(&dir, 1).exists() {
                return Err(damage(
                    &position_path,
                    "missing, while the log has segments: how far they are durable is unknown",
                ));
            }
            return Ok(());
        }
        Err(e) => return Err(error(&position_path, e)),
    };
    for id in 0..=last_segment {
        let path = segment_path(&dir, id);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(damage(&path, "missing"))
            }
            Err(e) => return Err(error(&path, e)),
        };
        let durable = if id == last_segment {
            usize::try_from(last_len).unwrap_or(usize::MAX)
        } else {
            bytes.len()
        };
        if bytes.len() < durable {
            return Err(damage(
                &path,
                format!(
                    "it holds {} bytes, but {durable} were checkpointed",
                    bytes.len()
                ),
            ));
        }
        let mut at = 0;
        while at < durable {
            let (record, len) = record_at(&bytes[at..durable])
                .map_err(|what| damage(&path, format!("offset {at}: {what}")))?;
            each(record)?;
            at += len;
        }
    }
    Ok(())
}

fn segment_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{id:08}.{EXTENSION}"))
}

/// The record at the start of `bytes`, and its length.
fn record_at(bytes: &[u8]) -> Result<(OldRecord<'_>, usize), String> {
    let frame = codec::frame_at(bytes, 8..=MAX_RECORD).map_err(|error| match error {
        FrameError::HeaderCut { have } => format!("a record header cut short at {have} bytes"),
        FrameError::Length { len } => format!("a record length of {len} bytes"),
        FrameError::PayloadCut { len, have } => {
            format!("a record of {len} bytes cut short at {have}")
        }
    })?;
    if !frame.intact() {
        return Err("checksum mismatch".into());
    }
    let mut payload = Reader::new(frame.payload);
    let from = payload.u64()?;
    let entries = if payload.is_empty() {
        Vec::new()
    } else {
        chunk::split(payload.rest())?
    };
    Ok((OldRecord { from, entries }, frame.len()))
}

fn decode_position(bytes: &[u8]) -> Result<(u32, u64), String> {
    let mut fields = codec::unseal(bytes, POSITION_MAGIC, 12).map_err(|error| match error {
        SealError::Shape => format!("{} bytes, not a log position", bytes.len()),
        SealError::Checksum => "checksum mismatch".to_string(),
    })?;
    Ok((fields.u32()?, fields.u64()?))
}

/// Decodes an old segment's records: each record's `from` and entry count
/// (0 for a removal). Public for the fuzz targets and property tests.
pub fn decode_segment(bytes: &[u8]) -> Result<Vec<(Index, u64)>, crate::storage::DecodeError> {
    let mut records = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let (record, len) = record_at(&bytes[at..])
            .map_err(|e| crate::storage::DecodeError(format!("offset {at}: {e}")))?;
        records.push((record.from, record.entries.len() as u64));
        at += len;
    }
    Ok(records)
}
