//! Building the node's (or the CLI's) Iroh endpoint.

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use iroh::address_lookup::{AddressLookup, EndpointInfo, Error as LookupError, Item};
use iroh::endpoint::{presets, QuicTransportConfig};
use iroh::{Endpoint, EndpointId, RelayMode, RelayUrl, SecretKey};

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
    let (relay_mode, lookup) = match relay {
        Some(url) => (RelayMode::custom([url.clone()]), Some(SharedRelay(url))),
        None => (RelayMode::Disabled, None),
    };
    // A peer that vanished (kill -9, power loss) is noticed within the idle timeout, and
    // its restarted incarnation gets fresh connections instead of writes into a dead one.
    let mut transport = QuicTransportConfig::builder().keep_alive_interval(Duration::from_secs(1));
    if let Ok(idle) = Duration::from_secs(IDLE_TIMEOUT_SECS).try_into() {
        transport = transport.max_idle_timeout(Some(idle));
    }
    let mut builder = Endpoint::builder(presets::Minimal);
    if let Some(lookup) = lookup {
        builder = builder.address_lookup(lookup);
    }
    builder
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

/// With a relay, every peer is also looked for at that relay: members' records and join
/// tickets carry only IP addresses, so a member behind a NAT is found through the relay
/// the cluster shares (every member configured with the same `relay_url`).
#[derive(Debug)]
struct SharedRelay(RelayUrl);

type Lookups = Pin<Box<dyn futures_util::Stream<Item = Result<Item, LookupError>> + Send>>;

impl AddressLookup for SharedRelay {
    fn resolve(&self, id: EndpointId) -> Option<Lookups> {
        let info = EndpointInfo::new(id).with_relay_url(self.0.clone());
        let item = Item::new(info, "blixard-shared-relay", None);
        Some(Box::pin(futures_util::stream::iter([Ok(item)])))
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    #[tokio::test]
    async fn every_peer_is_looked_for_at_the_shared_relay() {
        let url: RelayUrl = "http://10.77.0.1:3340".parse().unwrap();
        let id = SecretKey::generate().public();
        let mut items = SharedRelay(url.clone()).resolve(id).unwrap();
        let addr = items.next().await.unwrap().unwrap().into_endpoint_addr();
        assert_eq!(addr.id, id);
        assert_eq!(addr.relay_urls().collect::<Vec<_>>(), vec![&url]);
        assert!(items.next().await.is_none());
    }
}
