pub mod client;
pub mod identity;
pub mod raft;
pub mod server;
pub mod sim;
pub mod storage;
pub mod tls;
pub mod wire;
