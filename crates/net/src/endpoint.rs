//! Building the node's (or the CLI's) Iroh endpoint.

use std::net::SocketAddr;
use std::time::Duration;

use iroh::endpoint::{presets, QuicTransportConfig};
use iroh::{Endpoint, RelayMode, RelayUrl, SecretKey};

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("invalid listen address {0}")]
    Addr(String),
    #[error("cannot bind {addr}: {detail}")]
    Bind { addr: SocketAddr, detail: String },
}

/// Seconds without any packet from a peer before its connection is considered dead.
pub const IDLE_TIMEOUT_SECS: u64 = 4;

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
    // A peer that vanished (kill -9, power loss) is noticed within the idle timeout, and
    // its restarted incarnation gets fresh connections instead of writes into a dead one.
    let mut transport = QuicTransportConfig::builder().keep_alive_interval(Duration::from_secs(1));
    if let Ok(idle) = Duration::from_secs(IDLE_TIMEOUT_SECS).try_into() {
        transport = transport.max_idle_timeout(Some(idle));
    }
    Endpoint::builder(presets::Minimal)
        .transport_config(transport.build())
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
