//! Join tickets: what `cluster token create` prints and `node run --join` takes.

use std::net::SocketAddr;
use std::str::FromStr;

use blixard_core::{ClusterId, EndpointKey};
use serde::{Deserialize, Serialize};

const PREFIX: &str = "blixard1";

/// A cluster to join: its id, where its members listen, and a one-time secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTicket {
    pub cluster_id: ClusterId,
    pub members: Vec<(EndpointKey, Vec<SocketAddr>)>,
    pub secret: [u8; 32],
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TicketError {
    #[error("not a blixard join ticket (expected it to start with {PREFIX})")]
    Prefix,
    #[error("the join ticket is damaged: {0}")]
    Damaged(String),
}

impl JoinTicket {
    /// The hash under which the cluster stores the secret.
    pub fn secret_hash(&self) -> [u8; 32] {
        hash_secret(&self.secret)
    }
}

pub fn hash_secret(secret: &[u8; 32]) -> [u8; 32] {
    *blake3::hash(secret).as_bytes()
}

impl std::fmt::Display for JoinTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bytes = postcard::to_stdvec(self).map_err(|_| std::fmt::Error)?;
        write!(
            f,
            "{PREFIX}{}",
            data_encoding::BASE32_NOPAD.encode(&bytes).to_lowercase()
        )
    }
}

impl FromStr for JoinTicket {
    type Err = TicketError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let body = s.trim().strip_prefix(PREFIX).ok_or(TicketError::Prefix)?;
        let bytes = data_encoding::BASE32_NOPAD
            .decode(body.to_uppercase().as_bytes())
            .map_err(|e| TicketError::Damaged(e.to_string()))?;
        postcard::from_bytes(&bytes).map_err(|e| TicketError::Damaged(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_round_trip_and_damage_is_reported() {
        let t = JoinTicket {
            cluster_id: ClusterId([3; 16]),
            members: vec![(
                EndpointKey([4; 32]),
                vec!["127.0.0.1:7001".parse().unwrap()],
            )],
            secret: [5; 32],
        };
        let s = t.to_string();
        assert_eq!(s.parse::<JoinTicket>(), Ok(t));
        assert_eq!("nope".parse::<JoinTicket>(), Err(TicketError::Prefix));
        assert!(matches!(
            s[..s.len() - 5].parse::<JoinTicket>(),
            Err(TicketError::Damaged(_))
        ));
    }
}
