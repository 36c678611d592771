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

/// The top-level modules of `crate::…` paths in `text`: `crate::a::b` and
/// `crate::{a, b::c}` name `a` (and `b`).
fn crate_modules(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    for (at, _) in text.match_indices("crate::") {
        let rest = &text[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Names at the group's own depth.
            let (mut depth, mut start) = (0, true);
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if start && !c.is_whitespace() => {
                        out.push(ident(&group[i..]));
                        start = false;
                    }
                    _ => {}
                }
            }
        } else {
            out.push(ident(rest));
        }
    }
    out
}

/// Module circles inside each crate: module `a` uses `b` when a file of `a` names
/// `crate::b` outside its unit tests. Each crate's top-level modules must form no circle.
#[test]
fn no_crate_has_module_circles() {
    use std::collections::{BTreeMap, BTreeSet};
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut circles = Vec::new();
    let mut crates_read = 0;
    for entry in std::fs::read_dir(root.join("crates")).unwrap() {
        let src = entry.unwrap().path().join("src");
        if !src.is_dir() {
            continue;
        }
        crates_read += 1;
        // Top-level module -> the modules its files name.
        let mut uses: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut stack = vec![src.clone()];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).unwrap() {
                let path = e.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                if path.extension().is_none_or(|x| x != "rs") {
                    continue;
                }
                let rel = path.strip_prefix(&src).unwrap();
                let first = rel.components().next().unwrap().as_os_str();
                let module = Path::new(first)
                    .file_stem()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                if ["lib", "main"].contains(&module.as_str()) && rel.components().count() == 1 {
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
                let named = uses.entry(module.clone()).or_default();
                named.extend(crate_modules(code).into_iter().filter(|m| *m != module));
            }
        }
        // A circle: a module that reaches itself.
        for start in uses.keys() {
            let mut seen = BTreeSet::new();
            let mut todo: Vec<&String> = uses[start].iter().collect();
            while let Some(m) = todo.pop() {
                if m == start {
                    circles.push(format!("{}: {start}", src.display()));
                    break;
                }
                if seen.insert(m.clone()) {
                    todo.extend(uses.get(m).into_iter().flatten());
                }
            }
        }
    }
    assert!(crates_read >= 9, "read only {crates_read} crates");
    assert!(circles.is_empty(), "modules in a circle: {circles:?}");
}

#[test]
fn crate_paths_are_read_as_modules() {
    assert_eq!(crate_modules("use crate::a::b;"), ["a"]);
    assert_eq!(
        crate_modules("use crate::{a, b::{c, d}, e};\nlet x = crate::f(1);"),
        ["a", "b", "e", "f"]
    );
}

#[test]
fn completions_and_man_pages_cover_every_command() {
    let bin = env!("CARGO_BIN_EXE_blixard");
    let leaves = leaf_commands(&[]);
    for shell in ["bash", "zsh", "fish"] {
        let out = std::process::Command::new(bin)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "completions {shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        // Every command word can be completed.
        for word in leaves.iter().flat_map(|c| c.split(' ')) {
            assert!(script.contains(word), "{shell} completions lack {word:?}");
        }
    }
    let dir = std::env::temp_dir().join(format!("blixard-man-{}", std::process::id()));
    let out = std::process::Command::new(bin)
        .args(["man", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let top = std::fs::read_to_string(dir.join("blixard.1")).unwrap();
    assert!(top.contains(".TH blixard 1"), "{top}");
    for c in &leaves {
        let page = dir.join(format!("blixard-{}.1", c.replace(' ', "-")));
        assert!(page.exists(), "no man page {}", page.display());
    }
    let _ = std::fs::remove_dir_all(&dir);
}
