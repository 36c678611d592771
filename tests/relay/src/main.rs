//! An Iroh relay over plain HTTP on one address, for tests: `blixard-test-relay ADDR`.
//! Prints `relay http://ADDR` once it serves, then runs until SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::process::ExitCode;

use iroh_relay::server::{RelayConfig, Server, ServerConfig};

#[tokio::main]
async fn main() -> ExitCode {
    let Some(addr) = std::env::args().nth(1) else {
        eprintln!("usage: blixard-test-relay IP:PORT");
        return ExitCode::from(2);
    };
    let addr: SocketAddr = match addr.parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {addr:?}: {e}");
            return ExitCode::from(2);
        }
    };
    let mut config = ServerConfig::default();
    config.relay = Some(RelayConfig::new(addr));
    let server = match Server::spawn(config).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot start the relay on {addr}: {e}");
            return ExitCode::from(1);
        }
    };
    match server.http_addr() {
        Some(a) => println!("relay http://{a}"),
        None => println!("relay http://{addr}"),
    }
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: signal handler: {e}");
            return ExitCode::from(1);
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    let _ = server.shutdown().await;
    ExitCode::SUCCESS
}
