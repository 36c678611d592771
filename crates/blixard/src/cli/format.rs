//! Rendering command results as a table or as JSON.

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Format {
    #[default]
    Table,
    Json,
}

/// Prints `value` as pretty JSON.
pub fn json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    out!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Reports a write the cluster applied: with `--output json`, `result` as one JSON object
/// on stdout (what a script reads); else `text` on stderr (a confirmation for a person).
pub fn applied(
    output: Format,
    result: serde_json::Value,
    text: impl std::fmt::Display,
) -> anyhow::Result<()> {
    match output {
        Format::Json => out!("{}", serde_json::to_string(&result)?),
        Format::Table => eprintln!("{text}"),
    }
    Ok(())
}

/// Labels (or constraints) as one cell: `k=v,k2=v2`.
pub fn labels(labels: &std::collections::BTreeMap<String, String>) -> String {
    blixard_net::authz::label_strings(labels).join(",")
}

/// Prints rows as left-aligned columns under a header.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out!("{}", out.trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

/// Shows the progress of a long-running request on stderr: a bar with rate and ETA
/// redrawn in place on a terminal, otherwise a plain line every few seconds.
pub struct ProgressView {
    tty: bool,
    started: std::time::Instant,
    last_line: Option<std::time::Instant>,
    /// The last update shown, so repeats are not printed again.
    shown: Option<(String, u64)>,
    drawn: bool,
}

impl ProgressView {
    pub fn new() -> Self {
        use std::io::IsTerminal;
        Self {
            tty: std::io::stderr().is_terminal(),
            started: std::time::Instant::now(),
            last_line: None,
            shown: None,
            drawn: false,
        }
    }

    pub fn update(&mut self, phase: &str, done: u64, total: u64) {
        // Without a known total (e.g. a plain directory being imported), show bytes only.
        let total = if total == 0 { done } else { total };
        let done = done.min(total);
        if self.shown.as_ref() == Some(&(phase.to_string(), done)) {
            return;
        }
        self.shown = Some((phase.to_string(), done));
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = done as f64 / secs;
        let eta = if rate > 0.0 && total > done {
            format!("{:.0} s", (total - done) as f64 / rate)
        } else {
            "-".into()
        };
        let pct = if total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / total as f64
        };
        let sizes = format!("{} / {}", human_bytes(done), human_bytes(total));
        let rate = format!("{}/s", human_bytes(rate as u64));
        if self.tty {
            let width = 30;
            let filled = ((pct / 100.0) * width as f64) as usize;
            let bar = format!("{}{}", "#".repeat(filled), "-".repeat(width - filled));
            eprint!("\r{phase:<9} [{bar}] {pct:>3.0}%  {sizes}  {rate}  ETA {eta}   ");
            self.drawn = true;
        } else {
            let due = self
                .last_line
                .is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(5));
            if due || done == total {
                eprintln!("{phase}: {pct:.0}% ({sizes}, {rate}, ETA {eta})");
                self.last_line = Some(std::time::Instant::now());
            }
        }
    }

    /// Ends the bar's line so what follows starts on a new one.
    pub fn finish(&mut self) {
        if self.drawn {
            eprintln!();
            self.drawn = false;
        }
    }
}

/// A duration in milliseconds, coarsely: `42s`, `17m`, `5h`, `3d`.
pub fn duration_ms(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// A byte count for people: `512 B`, `1.5 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `1 NAR`, `2 NARs`.
pub fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}
