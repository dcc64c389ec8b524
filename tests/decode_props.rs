//! Property tests for everything that decodes bytes from outside the
//! process: frames from peers and clients, records read back from sled, the
//! member lists given on the command line, and certificate, key and
//! revocation-list files. Arbitrary input must give a value or a clear
//! error, never a panic, and what we encode must decode to itself. The
//! coverage-guided versions of the same targets live in `fuzz/`.

use std::io::Write;

use cluster_store::address::parse_members;
use cluster_store::identity;
use cluster_store::raft::{Entry, Envelope, Message, Payload};
use cluster_store::storage::migration::{journal, old_segments};
use cluster_store::storage::segments::decode_segment;
use cluster_store::storage::{
    decode_chunk, decode_entry, decode_metadata, decode_witness, Store, StoreError,
};
use cluster_store::wire::{
    decode, encode, read_frame, ClientRequest, ClientResponse, PeerFrame, WireError, MAX_FRAME,
};
use proptest::prelude::*;

fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(future)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_frame_bodies_are_values_or_errors(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        // A body that does not decode is refused as malformed, saying what
        // is wrong with it.
        let errors = [
            decode::<ClientRequest>(&bytes).err(),
            decode::<ClientResponse>(&bytes).err(),
            decode::<PeerFrame>(&bytes).err(),
        ];
        for error in errors.into_iter().flatten() {
            prop_assert!(matches!(error, WireError::Malformed(_)), "{}", error);
            prop_assert!(error.to_string().len() > "malformed frame: ".len(), "{}", error);
        }
    }

    #[test]
    fn arbitrary_streams_never_yield_an_oversized_frame(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut reader = &bytes[..];
        loop {
            match block_on(read_frame::<_, PeerFrame>(&mut reader)) {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(WireError::TooLarge(len)) => {
                    prop_assert!(len > MAX_FRAME);
                    break;
                }
                // A stream cut short says where.
                Err(WireError::TruncatedLength(got)) => {
                    prop_assert!((1..4).contains(&got));
                    break;
                }
                Err(WireError::Truncated { expected, received }) => {
                    prop_assert!(received < expected && expected <= MAX_FRAME);
                    break;
                }
                Err(WireError::Malformed(_)) => break,
                // Reading a slice cannot fail otherwise.
                Err(other) => prop_assert!(false, "unexpected error: {}", other),
            }
        }
    }

    #[test]
    fn client_requests_round_trip(
        client_id in any::<u64>(),
        first_seq in any::<u64>(),
        lamport in any::<u64>(),
        since in any::<u64>(),
        texts in proptest::collection::vec(".{0,40}", 0..8),
        after in any::<Option<u64>>(),
    ) {
        let request = ClientRequest::Send { client_id, first_seq, lamport, since, texts, after };
        let frame = encode(&request).expect("encode");
        let back: ClientRequest = decode(&frame[4..]).expect("decode");
        prop_assert_eq!(back, request);
    }

    #[test]
    fn peer_frames_round_trip(from in 1u64..10, to in 1u64..10, term in any::<u64>(), commit in any::<u64>()) {
        let frame = PeerFrame::Raft(Envelope {
            from,
            to,
            term,
            lamport: term ^ commit,
            message: Message::Heartbeat { commit, read_seq: 7 },
        });
        let bytes = encode(&frame).expect("encode");
        prop_assert_eq!(decode::<PeerFrame>(&bytes[4..]).expect("decode"), frame);
    }

    #[test]
    fn arbitrary_store_records_are_values_or_errors(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_entry(&bytes);
        let _ = decode_chunk(&bytes);
        let _ = decode_segment(&bytes);
        let _ = decode_metadata(&bytes);
        let _ = decode_witness(&bytes);
        let _ = journal::decode(&bytes);
        let _ = old_segments::decode_segment(&bytes);
    }

    #[test]
    fn journal_records_round_trip_and_a_flipped_bit_never_passes_unnoticed(
        records in proptest::collection::vec(
            (any::<Option<(u64, u64, u64)>>(), any::<Option<(u64, Vec<Vec<u8>>)>>()),
            1..5,
        ),
        bit in any::<proptest::sample::Index>(),
    ) {
        use journal::{decode, Journal, Record};
        let dir = std::env::temp_dir().join(format!("cs-journal-prop-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let (mut journal, _) = Journal::open(&dir).expect("open");
        let expected: Vec<Record> = records
            .iter()
            .map(|(hs, log)| Record {
                hard_state: hs.map(|(term, vote, commit)| cluster_store::raft::HardState {
                    term,
                    vote: (vote != 0).then_some(vote),
                    commit,
                }),
                log: log.clone(),
            })
            .collect();
        for record in &expected {
            let log = record.log.as_ref().map(|(from, entries)| (*from, entries.as_slice()));
            journal.add(record.hard_state, log);
        }
        journal.sync().expect("sync");
        let mut bytes = std::fs::read(journal.path()).expect("read");
        prop_assert_eq!(&decode(&bytes).expect("decode").0, &expected);
        // One flipped bit: refused, or read as a torn tail (fewer records),
        // never read as different records.
        let at = bit.index(bytes.len() * 8);
        bytes[at / 8] ^= 1 << (at % 8);
        if let Ok((records, _)) = decode(&bytes) {
            prop_assert!(records.len() < expected.len());
            prop_assert_eq!(&records[..], &expected[..records.len()]);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_witness_with_one_flipped_bit_is_refused(bit in 0usize..(40 * 8)) {
        // A witness as the store writes it: magic, four words, checksum.
        let mut bytes = b"CSW1".to_vec();
        for word in [5u64, 2, 900, 880] {
            bytes.extend_from_slice(&word.to_le_bytes());
        }
        let crc = crc32(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        prop_assert_eq!(decode_witness(&bytes), Ok([5, 2, 900, 880]));
        bytes[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(decode_witness(&bytes).is_err());
    }

    #[test]
    fn a_witness_of_the_current_layout_with_one_flipped_bit_is_refused(bit in 0usize..(52 * 8)) {
        // Magic, checksum of what follows, payload length 32, sequence
        // number 0, the four words.
        let mut covered = 32u32.to_le_bytes().to_vec();
        covered.extend_from_slice(&0u64.to_le_bytes());
        for word in [5u64, 2, 900, 880] {
            covered.extend_from_slice(&word.to_le_bytes());
        }
        let mut bytes = b"CSW2".to_vec();
        bytes.extend_from_slice(&crc32(&covered).to_le_bytes());
        bytes.extend_from_slice(&covered);
        prop_assert_eq!(decode_witness(&bytes), Ok([5, 2, 900, 880]));
        bytes[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(decode_witness(&bytes).is_err());
    }

    #[test]
    fn arbitrary_member_lists_are_parsed_or_refused(spec in ".{0,60}") {
        if let Ok(members) = parse_members(&spec, "--peers") {
            prop_assert!(members.keys().all(|id| *id > 0));
        }
    }

    #[test]
    fn member_lists_round_trip(ports in proptest::collection::btree_map(1u64..50, 1u16..u16::MAX, 1..6)) {
        let spec: Vec<String> = ports.iter().map(|(id, port)| format!("{id}=host-{id}.example:{port}")).collect();
        let members = parse_members(&spec.join(","), "--peers").expect("parse");
        prop_assert_eq!(members.len(), ports.len());
        for (id, port) in &ports {
            prop_assert_eq!(members[id].to_string(), format!("host-{id}.example:{port}"));
        }
    }

    #[test]
    fn arbitrary_certificate_key_and_crl_files_are_refused_cleanly(
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
        wrap in any::<bool>(),
    ) {
        // Raw garbage, or garbage inside PEM armour.
        let contents = if wrap {
            let body: String = bytes.iter().map(|b| char::from(b'A' + b % 26)).collect();
            format!("-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n-----BEGIN X509 CRL-----\n{body}\n-----END X509 CRL-----\n").into_bytes()
        } else {
            bytes.clone()
        };
        let path = std::env::temp_dir().join(format!("cs-prop-pem-{}", std::process::id()));
        std::fs::File::create(&path).and_then(|mut f| f.write_all(&contents)).expect("write");
        if let Ok(certs) = identity::load_certs(&path) {
            for cert in &certs {
                let _ = identity::identity_of(cert);
                let _ = identity::serial_of(cert);
            }
        }
        let _ = identity::load_key(&path);
        let _ = identity::load_crls(&path);
        let _ = identity::check_validity(&path);
        let _ = std::fs::remove_file(&path);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Garbage written anywhere over a real store's log segment (the only
    /// copy of its entries): opening it gives a clear "damaged" error
    /// naming the file, never a panic, and never a shorter log; in the
    /// room after the records it is a torn write, cut.
    #[test]
    fn garbage_in_a_log_segment_is_reported_as_damaged(
        garbage in proptest::collection::vec(any::<u8>(), 1..64),
        at in any::<proptest::sample::Index>(),
    ) {
        let dir = std::env::temp_dir().join(format!("cs-prop-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let (mut store, _) = Store::open(&dir, "c", 1).expect("open");
            let entries = (1..=3)
                .map(|index| Entry { index, term: 1, lamport: index, payload: Payload::Noop })
                .collect();
            store
                .write(None, Some(&cluster_store::raft::LogWrite { from: 1, entries }))
                .expect("write");
        }
        let segment = dir.join("log").join("00000000.wal");
        let mut bytes = std::fs::read(&segment).expect("segment");
        let before = bytes.clone();
        // The records, then zeros: room allocated ahead of the next write.
        let records = bytes.iter().rposition(|byte| *byte != 0).map_or(0, |at| at + 1);
        let start = at.index((records + 64).min(bytes.len()));
        let n = garbage.len().min(bytes.len() - start);
        bytes[start..start + n].copy_from_slice(&garbage[..n]);
        std::fs::write(&segment, &bytes).expect("write");
        match released(|| Store::open(&dir, "c", 1)).and_then(|(store, _)| store.verify()) {
            // Only if the garbage happens to equal what was there, or lies
            // in the room after the records (a write torn before it was
            // synced, cut): every entry is still there.
            Ok(last) => {
                prop_assert!(bytes == before || start >= records);
                prop_assert_eq!(last, 3);
            }
            Err(StoreError::Damaged { file, .. }) => prop_assert_eq!(file, segment),
            Err(other) => prop_assert!(false, "unexpected error: {}", other),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Runs `open` on a store this process has just dropped: sled's background
/// threads let go of the directory's lock a moment after the drop, so a
/// lock conflict is waited out (briefly); any other outcome is returned.
fn released<T, E: std::fmt::Display>(open: impl Fn() -> Result<T, E>) -> Result<T, E> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match open() {
            Err(e)
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            result => return result,
        }
    }
}

fn crc32(bytes: &[u8]) -> u32 {
    // The IEEE CRC-32 the store uses, computed independently.
    let mut crc = !0u32;
    for byte in bytes {
        crc ^= *byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
