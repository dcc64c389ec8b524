//! Reading the log from other threads (the driver's fetches, the API's
//! watches and exports) while the driver keeps writing it.

use std::path::{Path, PathBuf};

use super::segments::{ScanError, SegmentReader};
use super::StoreError;
use crate::raft::{Entry, Index};

/// Reads committed entries while the driver keeps writing.
#[derive(Clone)]
pub struct LogReader {
    dir: PathBuf,
    log: SegmentReader,
}

impl LogReader {
    pub(super) fn new(dir: &Path, log: SegmentReader) -> LogReader {
        LogReader {
            dir: dir.to_path_buf(),
            log,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Entries `from..=to`, at most `limit`, checked to be contiguous.
    pub fn entries(&self, from: Index, to: Index, limit: usize) -> Result<Vec<Entry>, StoreError> {
        self.entries_within(from, to, limit, usize::MAX)
    }

    /// Like `entries`, and no more than `max_bytes` of them (`Entry::size`)
    /// unless the first alone is larger: then just that one.
    pub fn entries_within(
        &self,
        from: Index,
        to: Index,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let mut entries = Vec::new();
        self.scan(from, to, limit, max_bytes, &mut |entry| {
            entries.push(entry);
            Ok(())
        })?;
        Ok(entries)
    }

    /// Hands entries `from..=to` (at most `limit`) to `each` in order,
    /// checking that they decode and are contiguous from `from`; returns
    /// the index of the last one handed over.
    pub(super) fn scan(
        &self,
        from: Index,
        to: Index,
        limit: usize,
        max_bytes: usize,
        each: &mut dyn FnMut(Entry) -> Result<(), String>,
    ) -> Result<Index, StoreError> {
        self.log
            .scan(from, to, limit, max_bytes, each)
            .map_err(|error| match error {
                ScanError::Damaged(error) => StoreError::from_log(&self.dir, error),
                ScanError::Refused { index, what } => {
                    StoreError::corrupt(&self.dir, format!("log entry {index}: {what}"))
                }
            })
    }
}
