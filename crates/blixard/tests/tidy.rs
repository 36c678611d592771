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

/// The subcommands `blixard ARGS --help` lists (empty for a leaf command).
fn subcommands(args: &[&str]) -> Vec<String> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_blixard"))
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

/// Every leaf command of the CLI, found through `--help`, e.g. "cluster token create".
fn leaf_commands(prefix: &[String]) -> Vec<String> {
    let args: Vec<&str> = prefix.iter().map(String::as_str).collect();
    let subs = subcommands(&args);
    if subs.is_empty() {
        return vec![prefix.join(" ")];
    }
    subs.into_iter()
        .flat_map(|s| {
            let mut p = prefix.to_vec();
            p.push(s);
            leaf_commands(&p)
        })
        .collect()
}

#[test]
fn every_cli_command_appears_in_the_readme() {
    let readme = repo_file("README.md");
    let commands = leaf_commands(&[]);
    assert!(
        commands.iter().any(|c| c == "cluster token create"),
        "the command list was not read from --help: {commands:?}"
    );
    let missing: Vec<&String> = commands
        .iter()
        .filter(|c| !readme.contains(c.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "README.md does not mention these commands: {missing:?}"
    );
}
