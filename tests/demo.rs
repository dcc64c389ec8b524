//! The README's run command, end to end: `scripts/demo.sh` must leave a
//! complete output.txt and identical backups after killing the leader.

mod nodes;

use std::collections::HashSet;
use std::process::Command;

#[test]
fn demo_script_leaves_output_and_identical_backups() {
    let root = env!("CARGO_MANIFEST_DIR");
    let work = std::env::temp_dir().join(format!("cluster-store-demo-{}", std::process::id()));
    let shared = work.join("shared_data");
    let _claim = nodes::claim_address(130);
    let output = Command::new("bash")
        .arg(format!("{root}/scripts/demo.sh"))
        .args(["--messages", "10"])
        .env("NODE_BIN", env!("CARGO_BIN_EXE_node"))
        .env("DEMO_DIR", work.join("demo"))
        .env("SHARED_DATA", &shared)
        .env("DEMO_HOST", "127.0.0.130")
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run scripts/demo.sh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("kill -9 of the leader"), "{stdout}");
    assert!(stdout.contains("took over"), "{stdout}");

    let log = std::fs::read_to_string(shared.join("output.txt")).expect("output.txt");
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 50, "{log}");
    let mut seen = HashSet::new();
    let mut last_stamp = 0u64;
    for line in &lines {
        let fields: Vec<&str> = line.splitn(4, '\t').collect();
        assert_eq!(fields.len(), 4, "{line}");
        let stamp: u64 = fields[1].parse().expect("lamport");
        assert!(stamp > last_stamp, "stamps must increase: {line}");
        last_stamp = stamp;
        let text = fields[3];
        let message = text
            .split_once(' ')
            .map(|(_, rest)| rest)
            .expect("timestamped text");
        assert!(message.ends_with(&format!("from {}", fields[2])), "{line}");
        assert!(seen.insert(message.to_string()), "{message} written twice");
    }
    for name in ["alice", "bob", "carol", "dave", "erin"] {
        for i in 1..=10 {
            assert!(
                seen.contains(&format!("message {i} from {name}")),
                "message {i} from {name} missing"
            );
        }
    }
    for id in 1..=5 {
        let backup =
            std::fs::read_to_string(shared.join(format!("backup_{id}.txt"))).expect("backup");
        assert_eq!(backup, log, "backup_{id}.txt differs");
    }
    let _ = std::fs::remove_dir_all(&work);
}
