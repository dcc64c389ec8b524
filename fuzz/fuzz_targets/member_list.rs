//! The member lists of --peers, --learner and --cluster.
#![no_main]

use cluster_store::address::parse_members;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let spec = String::from_utf8_lossy(data);
    if let Ok(members) = parse_members(&spec, "--peers") {
        assert!(members.keys().all(|id| *id > 0));
    }
});
