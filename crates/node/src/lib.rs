//! A Blixard node: everything `blixard node run` does, as a library the `blixard` binary
//! (and tests) drive. See ARCHITECTURE.md for the map.

pub mod agent;
pub mod audit;
pub mod config;
pub mod daemon;
pub mod datadir;
pub mod declared;
pub mod exit;
pub mod images;
pub mod service;
pub mod tenants;
pub mod vms;
