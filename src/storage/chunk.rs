//! How a record of the log (`segments.rs`) packs consecutive entries:
//! `[count: u32 LE]` followed, per entry, by `[length: u32 LE][entry as
//! bincode]` (a list, `codec.rs`). A write's entries are split into chunks
//! of at most `CHUNK_BYTES`, so that reading one entry (a lagging
//! follower's next batch, a page of an export) never reads much more than
//! it needs.

use super::codec::Reader;
use crate::raft::Index;

/// Largest chunk, unless a single entry is larger.
pub const CHUNK_BYTES: usize = 6 << 10;

/// Splits a write's encoded entries into runs of at most `CHUNK_BYTES`
/// each (a run always has at least one entry): `(offset, entries)`.
pub fn runs<T: AsRef<[u8]>>(entries: &[T]) -> Vec<(usize, &[T])> {
    let mut runs = Vec::new();
    let mut start = 0;
    let mut size = 4;
    for (i, entry) in entries.iter().enumerate() {
        if i > start && size + 4 + entry.as_ref().len() > CHUNK_BYTES {
            runs.push((start, &entries[start..i]));
            start = i;
            size = 4;
        }
        size += 4 + entry.as_ref().len();
    }
    if start < entries.len() {
        runs.push((start, &entries[start..]));
    }
    runs
}

/// Packs a write's encoded entries into one stored value (the log writes
/// the same bytes in place, `codec::put_list` into its record).
#[cfg(test)]
pub fn encode(entries: &[Vec<u8>]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(encoded_len(entries));
    super::codec::put_list(&mut bytes, entries);
    bytes
}

/// The length of `encode(entries)`.
pub fn encoded_len<T: AsRef<[u8]>>(entries: &[T]) -> usize {
    4 + entries.iter().map(|e| 4 + e.as_ref().len()).sum::<usize>()
}

/// How many entries a stored value holds, from its header alone.
pub fn count(bytes: &[u8]) -> Result<u64, String> {
    match Reader::new(bytes).u32() {
        Ok(0) => Err("a log chunk with no entries".into()),
        Ok(count) => Ok(count as Index),
        Err(_) => Err(format!("a log chunk of {} bytes", bytes.len())),
    }
}

/// The encoded entries of a stored value, checked to fill it exactly.
pub fn split(bytes: &[u8]) -> Result<Vec<&[u8]>, String> {
    let count = count(bytes)?;
    let mut entries = Vec::with_capacity((count as usize).min(bytes.len() / 4));
    let mut rest = Reader::new(&bytes[4..]);
    for i in 0..count {
        let Ok(len) = rest.u32() else {
            return Err(format!("log chunk ends inside entry {i} of {count}"));
        };
        let len = len as usize;
        let Ok(entry) = rest.take(len) else {
            return Err(format!(
                "log chunk ends inside entry {i} of {count} ({len} bytes announced)"
            ));
        };
        entries.push(entry);
    }
    if !rest.is_empty() {
        return Err(format!(
            "{} stray bytes after the {count} entries of a log chunk",
            rest.rest().len()
        ));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_round_trip_and_refuse_damage() {
        let entries = vec![b"one".to_vec(), Vec::new(), b"three".to_vec()];
        let bytes = encode(&entries);
        assert_eq!(count(&bytes), Ok(3));
        assert_eq!(split(&bytes).unwrap(), vec![&b"one"[..], b"", b"three"]);
        for cut in 0..bytes.len() {
            assert!(split(&bytes[..cut]).is_err(), "cut at {cut} accepted");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(split(&longer).is_err());
        assert!(
            split(&encode(&[])).is_err(),
            "empty chunks are never written"
        );
    }

    #[test]
    fn runs_stay_under_the_chunk_size() {
        let entries: Vec<Vec<u8>> = (0..1000).map(|i| vec![0u8; 100 + i % 50]).collect();
        let runs = runs(&entries);
        let mut next = 0;
        for (offset, run) in &runs {
            assert_eq!(*offset, next, "runs are contiguous");
            assert!(!run.is_empty());
            assert!(encode(run).len() <= CHUNK_BYTES);
            next += run.len();
        }
        assert_eq!(next, entries.len());
        assert!(
            runs.len() < 40,
            "{} runs: chunks are well filled",
            runs.len()
        );
        let huge = vec![vec![1u8; CHUNK_BYTES * 2], vec![2u8; 10]];
        let runs = super::runs(&huge);
        assert_eq!(runs.len(), 2, "an entry larger than a chunk gets its own");
        assert!(super::runs::<Vec<u8>>(&[]).is_empty());
    }
}
