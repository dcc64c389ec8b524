//! The client API: one request and one response per QUIC stream.

use std::sync::mpsc::{SyncSender, TrySendError};

use bytes::Bytes;
use quinn::Connection;
use tokio::sync::oneshot;
use tracing::{debug, warn};

use super::driver::Input;
use crate::raft::{NodeId, Payload, Proposal, ProposeError, RequestId};
use crate::storage::LogReader;
use crate::wire::{read_frame, write_frame, ClientRequest, ClientResponse, ExportedEntry};

/// Most entries one export page returns.
pub const PAGE: u64 = 10_000;
/// Most messages one send request may carry.
pub const MAX_BATCH: usize = 4096;

#[derive(Clone)]
pub struct Api {
    pub me: NodeId,
    pub inputs: SyncSender<Input>,
    pub log: LogReader,
}

fn error(message: impl Into<String>, retry: bool) -> ClientResponse {
    ClientResponse::Error {
        message: message.into(),
        retry,
        detail: None,
    }
}

impl Api {
    pub async fn serve(&self, connection: Connection, client: String) {
        debug!(client, remote = %connection.remote_address(), "client connected");
        while let Ok((mut send, mut recv)) = connection.accept_bi().await {
            let api = self.clone();
            let client = client.clone();
            tokio::spawn(async move {
                let response = match read_frame::<_, ClientRequest>(&mut recv).await {
                    Ok(Some(request)) => api.handle(&client, request).await,
                    Ok(None) => return,
                    Err(e) => {
                        warn!(client, "bad request: {e}");
                        error(format!("bad request: {e}"), false)
                    }
                };
                if write_frame(&mut send, &response).await.is_ok() {
                    let _ = send.finish();
                }
            });
        }
    }

    fn submit(&self, input: Input) -> Result<(), ClientResponse> {
        match self.inputs.try_send(input) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(error("node busy, retry", true)),
            Err(TrySendError::Disconnected(_)) => Err(error("node shutting down", true)),
        }
    }

    async fn handle(&self, client: &str, request: ClientRequest) -> ClientResponse {
        match request {
            ClientRequest::Send {
                client_id,
                first_seq,
                lamport,
                texts,
            } => {
                self.send(client, client_id, first_seq, lamport, texts)
                    .await
            }
            ClientRequest::Export { from, limit, upto } => {
                let upto = match upto {
                    Some(upto) => upto,
                    None => match self.read_index().await {
                        Ok(index) => index,
                        Err(response) => return response,
                    },
                };
                self.page(from, upto, limit)
            }
            ClientRequest::LocalExport { from, limit } => match self.status().await {
                Ok(status) => self.page(from, status.commit, limit),
                Err(response) => response,
            },
            ClientRequest::Status => match self.status().await {
                Ok(status) => ClientResponse::Status(Box::new(status)),
                Err(response) => response,
            },
        }
    }

    async fn send(
        &self,
        client: &str,
        client_id: u64,
        first_seq: u64,
        lamport: u64,
        texts: Vec<String>,
    ) -> ClientResponse {
        if texts.is_empty() || texts.len() > MAX_BATCH {
            return error(
                format!(
                    "a send carries 1 to {MAX_BATCH} messages, not {}",
                    texts.len()
                ),
                false,
            );
        }
        let proposals = texts
            .into_iter()
            .enumerate()
            .map(|(i, text)| Proposal {
                id: RequestId {
                    client_id,
                    seq: first_seq + i as u64,
                },
                lamport,
                sender: client.to_string(),
                data: Bytes::from(text),
            })
            .collect();
        let (reply, answer) = oneshot::channel();
        if let Err(response) = self.submit(Input::Propose(proposals, reply)) {
            return response;
        }
        let Ok(results) = answer.await else {
            return error("node shutting down", true);
        };
        let mut committed = Vec::with_capacity(results.len());
        for result in results {
            match result {
                Ok(c) => committed.push(c),
                Err(ProposeError::NotLeader { leader }) => {
                    return ClientResponse::Redirect { leader }
                }
                Err(e @ (ProposeError::LeadershipLost | ProposeError::TransferInProgress)) => {
                    return ClientResponse::Error {
                        message: e.to_string(),
                        retry: true,
                        detail: Some(e),
                    }
                }
                Err(e) => {
                    return ClientResponse::Error {
                        message: e.to_string(),
                        retry: false,
                        detail: Some(e),
                    }
                }
            }
        }
        ClientResponse::Sent {
            committed,
            leader: self.me,
        }
    }

    async fn read_index(&self) -> Result<u64, ClientResponse> {
        let (reply, answer) = oneshot::channel();
        self.submit(Input::Read(reply))?;
        match answer.await {
            Ok(Ok(index)) => Ok(index),
            Ok(Err(ProposeError::NotLeader { leader })) => Err(ClientResponse::Redirect { leader }),
            Ok(Err(e)) => Err(error(e.to_string(), true)),
            Err(_) => Err(error("node shutting down", true)),
        }
    }

    /// This node's status, for local callers such as the HTTP API.
    pub async fn local_status(&self) -> Result<crate::raft::Status, String> {
        self.status().await.map_err(|response| match response {
            ClientResponse::Error { message, .. } => message,
            other => format!("{other:?}"),
        })
    }

    async fn status(&self) -> Result<crate::raft::Status, ClientResponse> {
        let (reply, answer) = oneshot::channel();
        self.submit(Input::Status(reply))?;
        answer.await.map_err(|_| error("node shutting down", true))
    }

    fn page(&self, from: u64, upto: u64, limit: u64) -> ClientResponse {
        let limit = limit.clamp(1, PAGE) as usize;
        match self.log.entries(from.max(1), upto, limit) {
            Ok(entries) => {
                let next = entries.last().map_or(from.max(1), |e| e.index + 1);
                let entries = entries
                    .into_iter()
                    .filter_map(|e| match e.payload {
                        Payload::Command(c) => Some(ExportedEntry {
                            index: e.index,
                            term: e.term,
                            lamport: e.lamport,
                            sender: c.sender,
                            text: String::from_utf8_lossy(&c.data).into_owned(),
                        }),
                        Payload::Noop => None,
                    })
                    .collect();
                ClientResponse::Entries {
                    entries,
                    upto,
                    next,
                }
            }
            Err(e) => error(e.to_string(), false),
        }
    }
}
