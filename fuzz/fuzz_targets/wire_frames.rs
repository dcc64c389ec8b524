//! Frames from peers and clients: a stream of arbitrary bytes read frame by
//! frame, and arbitrary bodies decoded as every message type.
#![no_main]

use cluster_store::wire::{decode, read_frame, ClientRequest, ClientResponse, PeerFrame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode::<ClientRequest>(data);
    let _ = decode::<ClientResponse>(data);
    let _ = decode::<PeerFrame>(data);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut reader = data;
        while let Ok(Some(_)) = read_frame::<_, PeerFrame>(&mut reader).await {}
    });
});
