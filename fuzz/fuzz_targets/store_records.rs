//! Records read back from the data directory: log entries, chunks and
//! segments, the hard state, the directory's identity, the witness, and
//! the journal and segments of earlier versions.
#![no_main]

use cluster_store::storage::{decode_chunk, decode_entry, decode_metadata, decode_witness};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_entry(data);
    let _ = decode_chunk(data);
    let _ = cluster_store::storage::segments::decode_segment(data);
    let _ = decode_metadata(data);
    let _ = decode_witness(data);
    let _ = cluster_store::storage::migration::journal::decode(data);
    let _ = cluster_store::storage::migration::old_segments::decode_segment(data);
});
