//! Certificate, key and revocation-list files named on the command line.
#![no_main]

use cluster_store::identity;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("cs-fuzz-pem-{}", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(certs) = identity::load_certs(&path) {
        for cert in &certs {
            let _ = identity::identity_of(cert);
            let _ = identity::serial_of(cert);
        }
    }
    let _ = identity::load_key(&path);
    let _ = identity::load_crls(&path);
    let _ = identity::check_validity(&path);
});
