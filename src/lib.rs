pub mod raft;
pub mod sim;
pub mod storage;
pub mod identity;
pub mod tls;
pub mod wire;
