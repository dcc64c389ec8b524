//! Decoding log entries without a copy and an allocation per entry.
//!
//! An entry decoded by serde's defaults costs a `Vec` for its message
//! (copied out of the buffer it was read from) and a `String` plus an
//! `Arc` for its sender. On a follower that is every entry of every
//! append, and on the leader every entry it reads back for a follower
//! that fell behind: a pipelined burst on the WAN spent a seventh of a
//! follower's CPU decoding appends and a tenth more freeing them again.
//!
//! Here a message decoded inside [`sharing`] is a slice of the buffer
//! being decoded (a `Bytes` that keeps it alive), and a sender equal to
//! the one decoded last on this thread shares that one's `Arc`: the
//! entries of an append almost always come from a few clients. The bytes
//! on the wire and on disk are unchanged; outside [`sharing`] (or for
//! formats that cannot lend their input) the message is copied as before.
//!
//! A shared message keeps its whole buffer alive: a received frame (at
//! most an append's worth of entries) or a read chunk of the log (a few
//! KiB), for as long as any of its entries lives. Both are short-lived:
//! entries are written, sent or turned into pages, then dropped.

use std::cell::RefCell;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use serde::de::{Deserializer, SeqAccess, Visitor};

thread_local! {
    /// The buffer that the decoding in progress reads from, if shared.
    static SOURCE: RefCell<Option<Bytes>> = const { RefCell::new(None) };
    /// The sender decoded last on this thread.
    static LAST_SENDER: RefCell<Option<Arc<str>>> = const { RefCell::new(None) };
}

/// Runs `decode`; messages it decodes from within `source`'s bytes share
/// `source` instead of being copied out of it.
pub fn sharing<R>(source: &Bytes, decode: impl FnOnce() -> R) -> R {
    /// Puts back the outer source even if `decode` panics.
    struct Restore(Option<Bytes>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let outer = self.0.take();
            SOURCE.with(|source| *source.borrow_mut() = outer);
        }
    }
    let _restore = Restore(SOURCE.with(|slot| slot.replace(Some(source.clone()))));
    decode()
}

/// `deserialize_with` for a message: a slice of the shared source when
/// the decoder lends its input, a copy otherwise.
pub fn message<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Bytes, D::Error> {
    deserializer.deserialize_bytes(MessageVisitor)
}

/// `deserialize_with` for a sender: the `Arc` of the sender decoded last
/// on this thread if the name is the same.
pub fn sender<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Arc<str>, D::Error> {
    deserializer.deserialize_str(SenderVisitor)
}

/// `bytes` as a slice of the shared source if it lies within it.
fn shared(bytes: &[u8]) -> Bytes {
    SOURCE.with(|source| match &*source.borrow() {
        Some(source) if within(source, bytes) => source.slice_ref(bytes),
        _ => Bytes::copy_from_slice(bytes),
    })
}

fn within(outer: &[u8], inner: &[u8]) -> bool {
    let outer = outer.as_ptr_range();
    let inner = inner.as_ptr_range();
    outer.start <= inner.start && inner.end <= outer.end
}

fn interned(name: &str) -> Arc<str> {
    LAST_SENDER.with(|last| {
        let mut last = last.borrow_mut();
        match &*last {
            Some(known) if **known == *name => known.clone(),
            _ => {
                let fresh: Arc<str> = Arc::from(name);
                *last = Some(fresh.clone());
                fresh
            }
        }
    })
}

struct MessageVisitor;

impl<'de> Visitor<'de> for MessageVisitor {
    type Value = Bytes;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a byte string")
    }

    fn visit_borrowed_bytes<E>(self, bytes: &'de [u8]) -> Result<Bytes, E> {
        Ok(shared(bytes))
    }

    fn visit_bytes<E>(self, bytes: &[u8]) -> Result<Bytes, E> {
        Ok(Bytes::copy_from_slice(bytes))
    }

    fn visit_byte_buf<E>(self, bytes: Vec<u8>) -> Result<Bytes, E> {
        Ok(Bytes::from(bytes))
    }

    /// Formats without byte strings (JSON) write a sequence of numbers.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
        let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(byte) = seq.next_element::<u8>()? {
            bytes.push(byte);
        }
        Ok(Bytes::from(bytes))
    }
}

struct SenderVisitor;

impl<'de> Visitor<'de> for SenderVisitor {
    type Value = Arc<str>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E>(self, name: &str) -> Result<Arc<str>, E> {
        Ok(interned(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::{Command, Entry, Payload};
    use bincode::Options;

    fn options() -> impl Options {
        bincode::DefaultOptions::new()
            .with_fixint_encoding()
            .reject_trailing_bytes()
    }

    fn entry(index: u64, sender: &str, data: &'static [u8]) -> Entry {
        Entry {
            index,
            term: 1,
            lamport: index,
            payload: Payload::Command(Command {
                client_id: 7,
                seq: index,
                sender: sender.into(),
                data: Bytes::from_static(data),
            }),
        }
    }

    fn command(entry: &Entry) -> &Command {
        match &entry.payload {
            Payload::Command(command) => command,
            other => panic!("not a command: {other:?}"),
        }
    }

    #[test]
    fn messages_decoded_while_sharing_point_into_the_buffer() {
        let entries = vec![entry(1, "alice", b"hello"), entry(2, "alice", b"")];
        let buffer = Bytes::from(options().serialize(&entries).unwrap());
        let decoded: Vec<Entry> = sharing(&buffer, || options().deserialize(&buffer).unwrap());
        assert_eq!(decoded, entries);
        let hello = &command(&decoded[0]).data;
        assert!(within(&buffer, hello), "the message was copied");
        assert!(Arc::ptr_eq(
            &command(&decoded[0]).sender,
            &command(&decoded[1]).sender
        ));
        // The buffer lives on in the message after every other handle is gone.
        drop(buffer);
        assert_eq!(&hello[..], b"hello");
    }

    #[test]
    fn outside_sharing_messages_are_copied_and_senders_still_told_apart() {
        let entries = vec![entry(1, "alice", b"a"), entry(2, "bob", b"b")];
        let bytes = options().serialize(&entries).unwrap();
        let decoded: Vec<Entry> = options().deserialize(&bytes).unwrap();
        assert_eq!(decoded, entries);
        assert!(!within(&bytes, &command(&decoded[0]).data));
        assert_eq!(&*command(&decoded[1]).sender, "bob");
        // A reader that cannot lend its input (a stream) copies.
        let streamed: Vec<Entry> = options().deserialize_from(&bytes[..]).unwrap();
        assert_eq!(streamed, entries);
    }

    #[test]
    fn the_outer_source_comes_back_after_a_nested_or_failed_decode() {
        let outer = Bytes::from_static(b"outer");
        sharing(&outer, || {
            let inner = Bytes::from_static(b"inner");
            let _ = std::panic::catch_unwind(|| sharing(&inner, || panic!("decoding failed")));
            SOURCE.with(|source| assert_eq!(source.borrow().as_deref(), Some(&b"outer"[..])));
        });
        SOURCE.with(|source| assert!(source.borrow().is_none()));
    }

    #[test]
    fn json_round_trips() {
        let original = entry(3, "carol", b"json");
        let text = serde_json::to_string(&original).unwrap();
        let back: Entry = serde_json::from_str(&text).unwrap();
        assert_eq!(back, original);
    }
}
