//! How the log is laid out in sled: one value per write, keyed by the
//! index of its first entry (big-endian, so keys sort by index), holding
//! that write's entries. A value is `[count: u32 LE]` followed, per entry,
//! by `[length: u32 LE][entry as bincode]`.
//!
//! Why not one key per entry: sled copies a leaf on every insert, so a
//! write of a thousand entries cost a thousand leaf copies (most of a
//! store thread's time under load) and sled kept ~80 bytes of index per
//! entry in memory. One write, one insert.

use crate::raft::Index;

/// Packs a write's encoded entries into one stored value.
pub fn encode(entries: &[Vec<u8>]) -> Vec<u8> {
    let size = 4 + entries.iter().map(|e| 4 + e.len()).sum::<usize>();
    let mut bytes = Vec::with_capacity(size);
    bytes.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for entry in entries {
        bytes.extend_from_slice(&(entry.len() as u32).to_le_bytes());
        bytes.extend_from_slice(entry);
    }
    bytes
}

/// How many entries a stored value holds, from its header alone.
pub fn count(bytes: &[u8]) -> Result<u64, String> {
    match bytes.get(..4) {
        Some(word) => {
            let count = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
            if count == 0 {
                Err("a log chunk with no entries".into())
            } else {
                Ok(count as Index)
            }
        }
        None => Err(format!("a log chunk of {} bytes", bytes.len())),
    }
}

/// The encoded entries of a stored value, checked to fill it exactly.
pub fn split(bytes: &[u8]) -> Result<Vec<&[u8]>, String> {
    let count = count(bytes)?;
    let mut entries = Vec::with_capacity((count as usize).min(bytes.len() / 4));
    let mut rest = &bytes[4..];
    for i in 0..count {
        let Some(word) = rest.get(..4) else {
            return Err(format!("log chunk ends inside entry {i} of {count}"));
        };
        let len = u32::from_le_bytes([word[0], word[1], word[2], word[3]]) as usize;
        let Some(entry) = rest.get(4..4 + len) else {
            return Err(format!(
                "log chunk ends inside entry {i} of {count} ({len} bytes announced)"
            ));
        };
        entries.push(entry);
        rest = &rest[4 + len..];
    }
    if !rest.is_empty() {
        return Err(format!(
            "{} stray bytes after the {count} entries of a log chunk",
            rest.len()
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
}
