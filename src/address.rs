//! A member's address as configured (`host:port`). It is resolved at every
//! connection attempt, not once at start: a container that restarts or a
//! VM that moves gets a new IP, and a peer that is not up yet may have no
//! DNS name at all.

use std::fmt;
use std::net::SocketAddr;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Address(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not host:port (for example vm1.example.org:7000 or 10.0.0.1:7000)")]
pub struct AddressError(String);

impl Address {
    pub fn parse(text: &str) -> Result<Self, AddressError> {
        let text = text.trim();
        let Some((host, port)) = text.rsplit_once(':') else {
            return Err(AddressError(text.to_string()));
        };
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(AddressError(text.to_string()));
        }
        Ok(Address(text.to_string()))
    }

    /// Looks the address up now; the first answer wins.
    pub async fn resolve(&self) -> std::io::Result<SocketAddr> {
        tokio::net::lookup_host(&self.0)
            .await?
            .next()
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{} resolves to no address", self.0),
                )
            })
    }

    /// The address if it is a literal IP and port.
    pub fn literal(&self) -> Option<SocketAddr> {
        self.0.parse().ok()
    }
}

impl From<SocketAddr> for Address {
    fn from(addr: SocketAddr) -> Self {
        Address(addr.to_string())
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_host_and_port() {
        assert!(Address::parse("node1:7000").is_ok());
        assert!(Address::parse("[::1]:7000").is_ok());
        assert!(Address::parse("node1").is_err());
        assert!(Address::parse("node1:http").is_err());
        assert!(Address::parse(":7000").is_err());
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MembersError {
    #[error("{what}: {item:?} is not of the form id=host:port")]
    Form { what: String, item: String },
    #[error("{what}: {id:?} is not a node id (a whole number from 1)")]
    Id { what: String, id: String },
    #[error("{what}: node {id}: {error}")]
    Address {
        what: String,
        id: crate::raft::NodeId,
        error: AddressError,
    },
    #[error("{what}: node {id} is listed twice")]
    Twice {
        what: String,
        id: crate::raft::NodeId,
    },
}

/// Parses a member list, `id=host:port,...` (`what` names the option in
/// errors). Host names are resolved when connecting, so a peer that is not
/// up yet (or has moved) does not stop a node.
pub fn parse_members(
    spec: &str,
    what: &str,
) -> Result<std::collections::BTreeMap<crate::raft::NodeId, Address>, MembersError> {
    let mut members = std::collections::BTreeMap::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (id, address) = item.split_once('=').ok_or_else(|| MembersError::Form {
            what: what.to_string(),
            item: item.to_string(),
        })?;
        let id: crate::raft::NodeId = match id.trim().parse() {
            Ok(id) if id > 0 => id,
            _ => {
                return Err(MembersError::Id {
                    what: what.to_string(),
                    id: id.to_string(),
                })
            }
        };
        let address = Address::parse(address).map_err(|error| MembersError::Address {
            what: what.to_string(),
            id,
            error,
        })?;
        if members.insert(id, address).is_some() {
            return Err(MembersError::Twice {
                what: what.to_string(),
                id,
            });
        }
    }
    Ok(members)
}
