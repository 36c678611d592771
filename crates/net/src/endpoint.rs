//! Building the node's (or the CLI's) Iroh endpoint.

use std::net::SocketAddr;

use iroh::endpoint::presets;
use iroh::{Endpoint, RelayMode, RelayUrl, SecretKey};

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("invalid listen address {0}")]
    Addr(String),
    #[error("cannot bind {addr}: {detail}")]
    Bind { addr: SocketAddr, detail: String },
}

/// Binds an endpoint on exactly `listen`, with relays off unless `relay` is given.
pub async fn bind(
    secret: SecretKey,
    listen: SocketAddr,
    relay: Option<RelayUrl>,
    alpns: Vec<Vec<u8>>,
) -> Result<Endpoint, BindError> {
    let relay_mode = match relay {
        Some(url) => RelayMode::custom([url]),
        None => RelayMode::Disabled,
    };
    Endpoint::builder(presets::Minimal)
        .secret_key(secret)
        .alpns(alpns)
        .relay_mode(relay_mode)
        .clear_ip_transports()
        .bind_addr(listen)
        .map_err(|e| BindError::Addr(e.to_string()))?
        .bind()
        .await
        .map_err(|e| BindError::Bind {
            addr: listen,
            detail: e.to_string(),
        })
}
