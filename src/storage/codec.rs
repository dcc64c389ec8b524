//! The bytes of everything the store writes: this module lays them out,
//! and the parts of the store only fill in their fields.
//!
//! - A log entry, and every value kept in sled (hard state, identity,
//!   bootstrap configuration, catch-up floor): bincode with [`options`].
//! - Inside a record, numbers are little-endian (written with [`put_u32`],
//!   [`put_u64`], read with [`Reader`]), and a list of byte strings is
//!   `[count: u32][length: u32][bytes]...` ([`put_list`]).
//! - Every checksummed record the store writes is a *sequenced frame*,
//!   `[magic: 4 bytes][crc32: u32][payload length: u32][sequence number:
//!   u64][payload]`, the checksum covering everything after it: the log's
//!   records, which are numbered one more each (`segments.rs`), and the
//!   witness, a single record numbered 0 (`witness.rs`) ([`put_sequenced`],
//!   [`sequenced_at`], [`intact_sequenced_at`]).
//! - Files written by earlier versions hold two more layouts, only read
//!   (their upgrade is in `migration/`): a *frame*, `[payload length:
//!   u32][crc32 of payload: u32][payload]` (old segments, first journals;
//!   [`frame_at`]), and a *sealed* record of fixed size, `[magic][fields]
//!   [crc32 of magic and fields]` (old witnesses, the old log position;
//!   [`unseal`]).
//!
//! What they share lives here once: the checksum, the little-endian
//! fields, the length checks, and the kinds of damage a reader can find
//! ([`FrameError`]), which each file words in its own error messages.

use std::ops::RangeBounds;

use bincode::Options;

use crate::raft::Entry;

/// Larger than any record the store writes (a write batch, a chunk of
/// entries); a length above it is damage, not a record.
pub(super) const MAX_RECORD: usize = 256 << 20;
/// Payload length and checksum.
pub(super) const FRAME_HEADER: usize = 8;
/// Magic, checksum, payload length, sequence number.
pub(super) const SEQUENCED_HEADER: usize = 20;

/// The bincode options of the store's values: fixed-width integers, no
/// trailing bytes, at most 64 MiB. The same as the wire's (`wire.rs`)
/// except for the limit (the wire's is its 16 MiB frame), and kept apart
/// on purpose: the wire format may move with a protocol version, what is
/// on disk must keep reading.
pub(super) fn options() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .reject_trailing_bytes()
        .with_limit(64 << 20)
}

#[cfg(test)]
pub(super) fn encode_entry(entry: &Entry) -> Result<Vec<u8>, bincode::Error> {
    options().serialize(entry)
}

/// Encodes `entries` back to back at the end of `buffer` (one allocation, one
/// pass over each entry, where `encode_entry` sizes it first and then
/// allocates for it), handing back each one's bytes.
pub(super) fn encode_entries(
    entries: &[Entry],
    buffer: &mut Vec<u8>,
) -> Result<Vec<std::ops::Range<usize>>, bincode::Error> {
    buffer.reserve(entries.iter().map(Entry::size).sum());
    let mut ranges = Vec::with_capacity(entries.len());
    for entry in entries {
        let start = buffer.len();
        options().serialize_into(&mut *buffer, entry)?;
        ranges.push(start..buffer.len());
    }
    Ok(ranges)
}

pub(super) fn decode_entry(bytes: &[u8]) -> Result<Entry, String> {
    options().deserialize(bytes).map_err(|e| e.to_string())
}

pub(super) fn checksum(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

pub(super) fn put_u32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_le_bytes());
}

pub(super) fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_le_bytes());
}

/// `[count: u32]`, then each item as `[length: u32][bytes]`.
pub(super) fn put_list<T: AsRef<[u8]>>(out: &mut Vec<u8>, items: &[T]) {
    put_u32(out, items.len() as u32);
    for item in items {
        let item = item.as_ref();
        put_u32(out, item.len() as u32);
        out.extend_from_slice(item);
    }
}

/// Reads little-endian fields from the front of a byte string.
pub(super) struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(super) fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes }
    }

    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.bytes.len() < n {
            return Err(format!("{n} bytes wanted, {} left", self.bytes.len()));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    pub(super) fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    pub(super) fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub(super) fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut array = [0u8; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }

    /// What has not been read.
    pub(super) fn rest(&self) -> &'a [u8] {
        self.bytes
    }

    pub(super) fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// What is wrong with a record's framing (its checksum aside: see
/// `intact`).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum FrameError {
    /// The bytes end inside the header; `have` bytes are there.
    HeaderCut { have: usize },
    /// A payload length outside what the format allows.
    Length { len: usize },
    /// The bytes end inside the payload: `len` announced, `have` there.
    PayloadCut { len: usize, have: usize },
}

/// Appends `[payload length][crc32 of payload][payload]` to `out`.
#[cfg(test)]
pub(super) fn put_frame(out: &mut Vec<u8>, payload: &[u8]) {
    put_u32(out, payload.len() as u32);
    put_u32(out, checksum(payload));
    out.extend_from_slice(payload);
}

/// A frame found in a byte string; its checksum is checked by `intact`.
pub(super) struct Frame<'a> {
    pub(super) payload: &'a [u8],
    crc: u32,
}

impl Frame<'_> {
    /// Its length with its header.
    pub(super) fn len(&self) -> usize {
        FRAME_HEADER + self.payload.len()
    }

    pub(super) fn intact(&self) -> bool {
        checksum(self.payload) == self.crc
    }
}

/// The frame at the start of `bytes`, whose payload length must lie in
/// `lengths`.
pub(super) fn frame_at(
    bytes: &[u8],
    lengths: impl RangeBounds<usize>,
) -> Result<Frame<'_>, FrameError> {
    let mut header = Reader::new(bytes);
    let (Ok(len), Ok(crc)) = (header.u32(), header.u32()) else {
        return Err(FrameError::HeaderCut { have: bytes.len() });
    };
    let len = len as usize;
    if !lengths.contains(&len) {
        return Err(FrameError::Length { len });
    }
    let payload = header.take(len).map_err(|_| FrameError::PayloadCut {
        len,
        have: bytes.len() - FRAME_HEADER,
    })?;
    Ok(Frame { payload, crc })
}

/// Appends `[magic][crc32][payload length][sequence number][payload]` to
/// `out`, the checksum covering everything after it.
pub(super) fn put_sequenced(out: &mut Vec<u8>, magic: &[u8; 4], seq: u64, payload: &[u8]) {
    put_sequenced_with(out, magic, seq, |out| out.extend_from_slice(payload));
}

/// `put_sequenced` of the payload that `payload` appends to `out`, written
/// in place rather than built apart and copied in.
pub(super) fn put_sequenced_with(
    out: &mut Vec<u8>,
    magic: &[u8; 4],
    seq: u64,
    payload: impl FnOnce(&mut Vec<u8>),
) {
    let start = out.len();
    out.extend_from_slice(magic);
    put_u32(out, 0);
    put_u32(out, 0);
    put_u64(out, seq);
    payload(out);
    let len = (out.len() - start - SEQUENCED_HEADER) as u32;
    out[start + 8..start + 12].copy_from_slice(&len.to_le_bytes());
    let crc = checksum(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// A sequenced frame found in a byte string; its checksum is checked by
/// `intact`.
pub(super) struct Sequenced<'a> {
    pub(super) seq: u64,
    pub(super) payload: &'a [u8],
    crc: u32,
    /// What the checksum covers: length, sequence number and payload.
    covered: &'a [u8],
}

impl Sequenced<'_> {
    /// Its length with its header.
    pub(super) fn len(&self) -> usize {
        SEQUENCED_HEADER + self.payload.len()
    }

    pub(super) fn intact(&self) -> bool {
        checksum(self.covered) == self.crc
    }
}

/// The sequenced frame at the start of `bytes`, whose payload length must
/// lie in `lengths`; `None` if `bytes` do not start with `magic`.
pub(super) fn sequenced_at<'a>(
    bytes: &'a [u8],
    magic: &[u8; 4],
    lengths: impl RangeBounds<usize>,
) -> Option<Result<Sequenced<'a>, FrameError>> {
    if !bytes.starts_with(magic) {
        return None;
    }
    let mut header = Reader::new(&bytes[magic.len()..]);
    let (Ok(crc), Ok(len), Ok(seq)) = (header.u32(), header.u32(), header.u64()) else {
        return Some(Err(FrameError::HeaderCut { have: bytes.len() }));
    };
    let len = len as usize;
    if !lengths.contains(&len) {
        return Some(Err(FrameError::Length { len }));
    }
    let Ok(payload) = header.take(len) else {
        return Some(Err(FrameError::PayloadCut {
            len,
            have: bytes.len() - SEQUENCED_HEADER,
        }));
    };
    Some(Ok(Sequenced {
        seq,
        payload,
        crc,
        covered: &bytes[8..SEQUENCED_HEADER + len],
    }))
}

/// Whether an intact sequenced frame with `magic` starts `rest`, `None`
/// if no frame of ours starts there at all. Used to tell damage from a
/// torn tail: an intact record after a bad one means the bad one was not
/// the last write. The frame counts only if its sequence number can follow
/// `last_seq` (one more than it, plus at most one per `min_record` bytes of
/// the `gap` since the bad record) and `payload_ok` accepts its payload;
/// the sequence number is checked before the checksum is computed, so a
/// frame that cannot be ours costs nothing.
pub(super) fn intact_sequenced_at(
    rest: &[u8],
    magic: &[u8; 4],
    last_seq: Option<u64>,
    gap: usize,
    min_record: usize,
    payload_ok: impl Fn(&[u8]) -> bool,
) -> Option<bool> {
    match sequenced_at(rest, magic, ..=MAX_RECORD)? {
        Ok(frame) => {
            let follows = last_seq.is_none_or(|last| {
                let most = 1 + (gap / min_record) as u64;
                (1..=most).contains(&frame.seq.wrapping_sub(last))
            });
            Some(follows && frame.intact() && payload_ok(frame.payload))
        }
        Err(_) => Some(false),
    }
}

/// Why a sealed record was refused.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum SealError {
    /// Not the size, or not the magic, of the record asked for.
    Shape,
    Checksum,
}

/// `[magic][fields][crc32 of magic and fields]` (written only by tests:
/// the store reads such records, it no longer writes them).
#[cfg(test)]
pub(super) fn seal(magic: &[u8; 4], fields: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(magic.len() + fields.len() + 4);
    bytes.extend_from_slice(magic);
    bytes.extend_from_slice(fields);
    let crc = checksum(&bytes);
    put_u32(&mut bytes, crc);
    bytes
}

/// The fields of a sealed record with `magic` and `len` bytes of fields.
pub(super) fn unseal<'a>(
    bytes: &'a [u8],
    magic: &[u8; 4],
    len: usize,
) -> Result<Reader<'a>, SealError> {
    let end = magic.len() + len;
    if bytes.len() != end + 4 || !bytes.starts_with(magic) {
        return Err(SealError::Shape);
    }
    let crc = Reader::new(&bytes[end..]).u32();
    if crc != Ok(checksum(&bytes[..end])) {
        return Err(SealError::Checksum);
    }
    Ok(Reader::new(&bytes[magic.len()..end]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_say_what_is_wrong() {
        let mut bytes = Vec::new();
        put_frame(&mut bytes, b"payload");
        assert_eq!(&bytes[..4], &7u32.to_le_bytes());
        assert_eq!(&bytes[4..8], &crc32fast::hash(b"payload").to_le_bytes());
        let frame = frame_at(&bytes, ..).unwrap();
        assert_eq!(
            (frame.payload, frame.len(), frame.intact()),
            (&b"payload"[..], 15, true)
        );
        assert_eq!(
            frame_at(&bytes[..7], ..).err(),
            Some(FrameError::HeaderCut { have: 7 })
        );
        assert_eq!(
            frame_at(&bytes, 8..).err(),
            Some(FrameError::Length { len: 7 })
        );
        assert_eq!(
            frame_at(&bytes[..12], ..).err(),
            Some(FrameError::PayloadCut { len: 7, have: 4 })
        );
        bytes[10] ^= 1;
        assert!(!frame_at(&bytes, ..).unwrap().intact());
    }

    #[test]
    fn sequenced_frames_round_trip_and_checksum_their_header() {
        let mut bytes = Vec::new();
        put_sequenced(&mut bytes, b"TEST", 42, b"payload");
        assert_eq!(bytes.len(), SEQUENCED_HEADER + 7);
        let frame = sequenced_at(&bytes, b"TEST", ..).unwrap().unwrap();
        assert_eq!(
            (frame.seq, frame.payload, frame.len()),
            (42, &b"payload"[..], 27)
        );
        assert!(frame.intact());
        assert!(sequenced_at(&bytes, b"ELSE", ..).is_none());
        assert_eq!(
            sequenced_at(&bytes[..19], b"TEST", ..).unwrap().err(),
            Some(FrameError::HeaderCut { have: 19 })
        );
        // The sequence number is covered by the checksum.
        bytes[12] ^= 1;
        assert!(!sequenced_at(&bytes, b"TEST", ..).unwrap().unwrap().intact());
    }

    #[test]
    fn sealed_records_round_trip_and_refuse_any_other_shape() {
        let mut fields = Vec::new();
        put_u64(&mut fields, 7);
        put_u32(&mut fields, 9);
        let bytes = seal(b"TEST", &fields);
        assert_eq!(bytes.len(), 4 + 12 + 4);
        let mut reader = unseal(&bytes, b"TEST", 12).unwrap();
        assert_eq!((reader.u64(), reader.u32()), (Ok(7), Ok(9)));
        assert!(reader.is_empty());
        assert_eq!(unseal(&bytes, b"ELSE", 12).err(), Some(SealError::Shape));
        assert_eq!(unseal(&bytes, b"TEST", 8).err(), Some(SealError::Shape));
        let mut flipped = bytes.clone();
        flipped[5] ^= 1;
        assert_eq!(
            unseal(&flipped, b"TEST", 12).err(),
            Some(SealError::Checksum)
        );
    }
}
