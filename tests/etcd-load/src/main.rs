//! Committed writes against an etcd cluster, the way `cargo bench --bench writes` loads
//! Blixard: `--writers` concurrent writers, each with its own connection to the leader,
//! each putting fresh keys one after another with `--value-bytes` values. A warm-up, then
//! a measured window; the servers' CPU (from `/proc`, for `--pids`) over the same window.
//!
//! Prints one line: `commits secs errors p50_us p99_us max_us cpu_cores`.

use std::time::{Duration, Instant};

use etcd_client::Client;

struct Args {
    endpoints: Vec<String>,
    writers: usize,
    secs: u64,
    warmup: u64,
    value_bytes: usize,
    pids: Vec<u32>,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        endpoints: Vec::new(),
        writers: 1,
        secs: 10,
        warmup: 2,
        value_bytes: 256,
        pids: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<u64>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--endpoints" => a.endpoints = value.split(',').map(str::to_string).collect(),
            "--writers" => a.writers = num(&value)? as usize,
            "--secs" => a.secs = num(&value)?,
            "--warmup" => a.warmup = num(&value)?,
            "--value-bytes" => a.value_bytes = num(&value)? as usize,
            "--pids" => {
                a.pids = value
                    .split(',')
                    .map(|p| p.parse().map_err(|e| format!("--pids {p}: {e}")))
                    .collect::<Result<_, _>>()?
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if a.endpoints.is_empty() {
        return Err("--endpoints is required".into());
    }
    Ok(a)
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of stat; `rest` starts at field 3.
    get(11) + get(12)
}

fn ticks_per_sec() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// The endpoint of the current leader.
async fn leader(endpoints: &[String]) -> Result<String, etcd_client::Error> {
    for e in endpoints {
        let mut c = Client::connect([e.as_str()], None).await?;
        let s = c.status().await?;
        let me = s.header().map(|h| h.member_id()).unwrap_or(0);
        if me != 0 && s.leader() == me {
            return Ok(e.clone());
        }
    }
    Ok(endpoints[0].clone())
}

#[tokio::main]
async fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("blixard-etcd-load: {e}");
            std::process::exit(2);
        }
    };
    let to = match leader(&args.endpoints).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("blixard-etcd-load: {e}");
            std::process::exit(1);
        }
    };
    let mut clients = Vec::new();
    for _ in 0..args.writers {
        match Client::connect([to.as_str()], None).await {
            Ok(c) => clients.push(c),
            Err(e) => {
                eprintln!("blixard-etcd-load: connecting: {e}");
                std::process::exit(1);
            }
        }
    }
    let value = vec![b'v'; args.value_bytes];
    let t0 = Instant::now() + Duration::from_secs(args.warmup);
    let t1 = t0 + Duration::from_secs(args.secs);
    let mut tasks = Vec::new();
    for (w, mut client) in clients.into_iter().enumerate() {
        let value = value.clone();
        let writers = args.writers;
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            let mut i = 0u64;
            loop {
                let sent = Instant::now();
                if sent >= t1 {
                    break;
                }
                let key = format!("bench/{writers}/{w}/{i}");
                i += 1;
                let result = client.put(key, value.clone(), None).await;
                let done = Instant::now();
                if done >= t0 && done <= t1 {
                    match result {
                        Ok(_) => latencies.push((done - sent).as_micros() as u64),
                        Err(_) => errors += 1,
                    }
                }
            }
            (latencies, errors)
        }));
    }
    tokio::time::sleep_until(t0.into()).await;
    let before: u64 = args.pids.iter().map(|p| cpu_ticks(*p)).sum();
    tokio::time::sleep_until(t1.into()).await;
    let after: u64 = args.pids.iter().map(|p| cpu_ticks(*p)).sum();
    let mut latencies = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, e)) = t.await {
            latencies.extend(l);
            errors += e;
        }
    }
    latencies.sort_unstable();
    let q = |p: f64| {
        if latencies.is_empty() {
            return 0;
        }
        let rank = ((p * latencies.len() as f64).ceil() as usize).max(1) - 1;
        latencies[rank.min(latencies.len() - 1)]
    };
    let cpu = after.saturating_sub(before) as f64 / ticks_per_sec() / args.secs as f64;
    println!(
        "{} {} {} {} {} {} {:.3}",
        latencies.len(),
        args.secs,
        errors,
        q(0.5),
        q(0.99),
        latencies.last().copied().unwrap_or(0),
        cpu
    );
}
