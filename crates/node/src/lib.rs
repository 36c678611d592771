//! A Blixard node: everything `blixard node run` does, as a library the `blixard` binary
//! (and tests) drive. See ARCHITECTURE.md for the map.

pub mod api;
pub mod audit;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod datadir;
pub mod declared;
pub mod events;
pub mod exit;
pub mod gate;
pub mod images;
pub mod metrics;
pub mod peers;
pub mod telemetry;
pub mod version;
pub mod vms;
