//! A data directory written by an earlier version opens with every entry.
//!
//! `tests/fixtures/e7fdae5-node-3.tar.gz` is node 3's data directory of a
//! three-node cluster run by the `node` binary of commit e7fdae5 (log
//! segments synced only at checkpoints, plus a write-ahead journal): 2,004
//! messages (one of 200,000 bytes, one with non-ASCII text and a tab), all
//! nodes killed -9, restarted, 500 more, killed -9 again, so its journal
//! holds writes its segments had not checkpointed. `e7fdae5-node-3.export.gz`
//! is what that binary's `node export --local` printed for a copy of it.

mod nodes;

use std::path::{Path, PathBuf};
use std::process::Command;

use nodes::export_local;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|item| {
            item.expect("entry")
                .file_name()
                .to_string_lossy()
                .to_string()
        })
        .collect();
    names.sort();
    names
}

#[test]
fn a_data_directory_written_by_e7fdae5_is_upgraded_with_every_entry() {
    let dir = std::env::temp_dir().join(format!("cs-upgrade-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let untar = Command::new("tar")
        .arg("-xzf")
        .arg(fixture("e7fdae5-node-3.tar.gz"))
        .arg("-C")
        .arg(&dir)
        .status()
        .expect("run tar");
    assert!(untar.success(), "tar failed");
    let expected = Command::new("gzip")
        .arg("-dc")
        .arg(fixture("e7fdae5-node-3.export.gz"))
        .output()
        .expect("run gzip");
    assert!(expected.status.success(), "gzip failed");
    let expected = String::from_utf8(expected.stdout).expect("utf-8 fixture");
    assert_eq!(expected.lines().count(), 2503, "the fixture changed");

    let data = dir.join("node-3");
    assert!(data.join("journal").exists() && data.join("log/00000000.seg").exists());
    assert!(
        std::fs::metadata(data.join("journal"))
            .expect("journal")
            .len()
            > 0,
        "the fixture's journal holds writes its segments had not checkpointed"
    );
    // The first open upgrades it; the second reads the new format.
    for open in ["upgrading", "upgraded"] {
        let exported = export_local(&data);
        assert!(
            exported == expected,
            "{open}: the export differs from e7fdae5's ({} lines against {})",
            exported.lines().count(),
            expected.lines().count()
        );
        assert!(
            !data.join("journal").exists(),
            "{open}: the journal is left"
        );
        assert_eq!(files_in(&data.join("log")), vec!["00000000.wal"], "{open}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
