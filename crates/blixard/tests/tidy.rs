//! Tidy checks: the docs keep up with the code.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

fn repo_file(name: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::fs::read_to_string(root.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn every_crate_has_a_heading_in_architecture_md() {
    let arch = repo_file("ARCHITECTURE.md");
    let manifest = repo_file("Cargo.toml");
    let members = manifest
        .lines()
        .find(|l| l.trim_start().starts_with("members"))
        .expect("workspace members");
    for path in members.split('"').skip(1).step_by(2) {
        let cargo = repo_file(&format!("{path}/Cargo.toml"));
        let name = cargo
            .lines()
            .find_map(|l| l.strip_prefix("name = \""))
            .and_then(|l| l.strip_suffix('"'))
            .expect("package name");
        assert!(
            arch.contains(&format!("### `{name}` ({path})")),
            "ARCHITECTURE.md has no heading for crate {name} ({path})"
        );
    }
}

#[test]
fn every_cli_command_appears_in_the_readme() {
    let readme = repo_file("README.md");
    for command in [
        "node run",
        "cluster status",
        "cluster token create",
        "cluster leave",
        "cluster meta set",
        "cluster meta get",
        "whoami",
        "user add",
        "user list",
        "user rm",
        "policy show",
        "policy set",
        "policy test",
        "audit tail",
    ] {
        assert!(
            readme.contains(command),
            "README.md does not mention `blixard {command}`"
        );
    }
    // And each of those exists in the binary.
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_blixard"))
        .args(["cluster", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for sub in ["status", "token", "leave", "meta"] {
        assert!(
            help.contains(sub),
            "`blixard cluster {sub}` is missing: {help}"
        );
    }
}
