//! `blixard`: the node daemon (`blixard node run`) and the CLI that talks to it.

/// `println!` that does not panic when stdout is closed (`blixard … | head`): the output
/// is simply cut short.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

mod cli;
mod run_args;

use blixard_node::{config, daemon, declared, exit, telemetry};

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::cli::format::Format;
use crate::exit::Failure;

/// Blixard: microVMs on a cluster of NixOS hosts.
#[derive(Parser, Debug)]
#[command(name = "blixard", version, about)]
struct Cli {
    /// The node's data dir. The CLI finds the local node and its admin credential here.
    #[arg(
        long,
        global = true,
        env = "BLIXARD_DATA_DIR",
        default_value = "/var/lib/blixard"
    )]
    data_dir: PathBuf,
    /// Talk to this node instead of the local one: a member id (n2), a join ticket, or
    /// ENDPOINT_ID@HOST:PORT.
    #[arg(long, global = true, env = "BLIXARD_NODE")]
    node: Option<String>,
    /// The secret key file to call with (default: DATA_DIR/admin.key when readable, else
    /// ~/.config/blixard/key, created on first use).
    #[arg(long, global = true, env = "BLIXARD_CREDENTIAL")]
    credential: Option<PathBuf>,
    /// Output format: `json` prints what a read returns, and what a write applied, as one
    /// JSON value; `vm logs` and `events` print one JSON object per line.
    #[arg(long, short, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    /// Seconds to wait for an answer.
    #[arg(long, global = true, default_value_t = 15)]
    timeout: u64,
    /// Trace the command: its request carries a new trace to the nodes (which export
    /// their spans of it), and its trace id is printed on stderr. The CLI exports its own
    /// span too when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    #[arg(long, global = true)]
    trace: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run or inspect this node.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Cluster membership, status and metadata.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Print the public key (identity) of the credential this CLI calls with.
    Whoami,
    /// Users: named keys with roles and a tenant.
    #[command(subcommand)]
    User(UserCommand),
    /// The cluster's Cedar authorization policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// This node's audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// The cluster's state changes as they are applied (VMs placed and running, members
    /// joining and going down, images held…): the latest, or with --follow a stream.
    Events {
        /// Keep printing changes as they are applied (until interrupted).
        #[arg(long, short)]
        follow: bool,
        /// Only changes of this kind: vm, member, image, tenant, user, cluster; repeatable.
        #[arg(long = "kind", value_name = "KIND")]
        kinds: Vec<String>,
        /// Start after this event index (an earlier event's `index`), not at the latest.
        #[arg(long, value_name = "INDEX")]
        after: Option<u64>,
    },
    #[command(subcommand)]
    Image(cli::images::ImageCommand),
    /// VMs: create, inspect, start, stop, restart, delete, and read their consoles.
    #[command(subcommand)]
    Vm(cli::vms::VmCommand),
    /// Tenants: who owns images and VMs.
    #[command(subcommand)]
    Tenant(cli::tenants::TenantCommand),
    /// A tenant's limits on VMs, vCPUs and memory.
    #[command(subcommand)]
    Quota(cli::tenants::QuotaCommand),
    /// Print the shell completion script for SHELL (e.g. `blixard completions bash >
    /// /etc/bash_completion.d/blixard`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (blixard.1 and one per command) into DIR.
    Man {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum UserCommand {
    /// Add a user.
    Add {
        name: String,
        /// The user's public key (from `blixard whoami` on their machine).
        #[arg(long = "key", value_name = "PUBLIC_KEY")]
        public_key: String,
        /// A role: admin, operator, viewer (or one your policies use); repeatable.
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
        #[arg(long)]
        tenant: Option<String>,
    },
    /// List the users you may see.
    List {
        #[arg(long)]
        stale: bool,
    },
    /// Replace a user's key in place (key rotation); roles and tenant stay.
    SetKey {
        name: String,
        #[arg(long = "key", value_name = "PUBLIC_KEY")]
        public_key: String,
    },
    /// Remove a user.
    Rm { name: String },
}

#[derive(Subcommand, Debug)]
enum PolicyCommand {
    /// Print the policies in force.
    Show,
    /// Replace the policies with the Cedar file FILE (validated against the schema first).
    Set { file: PathBuf },
    /// Would PRINCIPAL be allowed ACTION on RESOURCE?
    Test {
        /// user:NAME, node:ID or key:HEX
        #[arg(long)]
        principal: String,
        /// e.g. cluster:manage
        #[arg(long)]
        action: String,
        /// cluster or user:NAME
        #[arg(long, default_value = "cluster")]
        resource: String,
    },
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Print the last lines of this node's audit log (DATA_DIR/audit.log).
    Tail {
        #[arg(long, short = 'n', default_value_t = 20)]
        lines: usize,
        /// Keep printing new lines as they are written.
        #[arg(long, short)]
        follow: bool,
    },
}

#[derive(Subcommand, Debug)]
enum NodeCommand {
    /// Run the node daemon in the foreground.
    Run(Box<run_args::RunCommand>),
    /// Check a config file (TOML, or JSON when it ends in .json) and print it as the daemon
    /// reads it, with defaults filled in.
    CheckConfig { file: PathBuf },
    /// Check a stopped node's data file (the one in --data-dir): every page's checksum,
    /// the raft log against the hard state, and the state rows. Exits 7 if it fails.
    CheckData,
    /// The node's key figures (raft, API, VMs, images, peers, process), from the same
    /// sources as its /metrics, without Prometheus. `--node` picks another node.
    Stats,
    /// List the hosts: capacity, what is allocated, VMs, status, labels.
    List {
        #[arg(long)]
        stale: bool,
    },
    /// Make DATA_DIR (empty) hold a backup's state as a new cluster with this node as its
    /// only member; then start it with `node run` (docs/operations.md).
    Restore {
        /// The backup file (from `cluster backup`).
        file: PathBuf,
        /// Keep the backed-up cluster's id (default: a new one, so old tickets and members
        /// cannot mistake the two).
        #[arg(long)]
        keep_cluster_id: bool,
        /// This node's name (default: the host name).
        #[arg(long)]
        name: Option<String>,
        /// The config file `node run` will use (its labels and capacity go in the member
        /// record; default: DATA_DIR/blixard.toml when it exists).
        #[arg(long)]
        config: Option<PathBuf>,
        /// A node label, KEY=VALUE; repeatable.
        #[arg(long = "label", value_parser = cli::parse::parse_label)]
        labels: Vec<(String, String)>,
    },
    /// Move every VM off a host and keep new ones away.
    Drain {
        /// The node id (e.g. n2).
        #[arg(value_name = "NODE_ID")]
        id: blixard_core::NodeId,
        /// Wait until the moved VMs run elsewhere (or cannot be placed).
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 300)]
        wait_timeout: u64,
    },
    /// Let a drained host take VMs again.
    Undrain {
        #[arg(value_name = "NODE_ID")]
        id: blixard_core::NodeId,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// Members, roles, leader, term, commit and applied index.
    Status(StatusArgs),
    /// Join tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Replace this node's admin credential (DATA_DIR/admin.key) with a new key.
    RotateAdminKey,
    /// Remove a node from the cluster.
    Leave {
        /// The node id (e.g. 3 or n3).
        #[arg(value_name = "NODE_ID")]
        id: String,
    },
    /// Make a learner a voter (a joint configuration change). It must have caught up.
    Promote {
        /// The node id (e.g. 4 or n4).
        #[arg(value_name = "NODE_ID")]
        id: String,
    },
    /// Make a voter a learner that stays one (a joint configuration change): it keeps
    /// the log, serves stale reads and hosts VMs, but no longer votes.
    Demote {
        /// The node id (e.g. 3 or n3).
        #[arg(value_name = "NODE_ID")]
        id: String,
    },
    /// Cluster metadata: small key/value pairs stored in cluster state.
    #[command(subcommand)]
    Meta(MetaCommand),
    /// Back up the whole cluster state to a file, online (docs/operations.md).
    Backup(BackupArgs),
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct BackupArgs {
    /// Where to write the backup (written beside it first, then renamed; mode 0600).
    #[arg(long, required = true, value_name = "FILE")]
    out: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<BackupCommand>,
}

#[derive(Subcommand, Debug)]
enum BackupCommand {
    /// Check a backup file (header, version, checksum, every row) and print its header
    /// and row counts per table. Exits 7 if it is damaged or newer than this build.
    Verify { file: PathBuf },
}

#[derive(Args, Debug)]
struct StatusArgs {
    /// Answer from this node's state without a round to the leader (may be behind).
    #[arg(long)]
    stale: bool,
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Create a one-time join token and print the ticket to pass to `node run --join`.
    Create {
        /// How long the token is valid (e.g. 30s, 10m, 2h).
        #[arg(long, default_value = "10m")]
        ttl: String,
        /// The node joins as a learner and stays one until `cluster promote`: it
        /// replicates the log, serves stale reads and hosts VMs, but never votes.
        #[arg(long)]
        learner: bool,
    },
    /// List the join tokens: id (the hash of the secret), created, expires, state.
    List {
        /// Answer from this node's state without a round to the leader (may be behind).
        #[arg(long)]
        stale: bool,
    },
    /// Revoke an unused join token: a join with its ticket is refused from now on.
    Revoke {
        /// The token's id, or a unique prefix of it (at least 8 hex digits).
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum MetaCommand {
    /// Set a key.
    Set {
        #[arg(value_name = "KEY")]
        name: String,
        value: String,
    },
    /// Show one key, or all keys.
    Get {
        #[arg(value_name = "KEY")]
        name: Option<String>,
        #[arg(long)]
        stale: bool,
    },
    /// Delete a key.
    Rm {
        #[arg(value_name = "KEY")]
        name: String,
    },
}

/// The command's words ("vm create"), for its span's name.
fn command_name(matches: &clap::ArgMatches) -> String {
    let mut words = vec!["blixard"];
    let mut at = matches;
    while let Some((name, sub)) = at.subcommand() {
        words.push(name);
        at = sub;
    }
    words.join(" ")
}

fn main() -> ExitCode {
    use clap::{CommandFactory as _, FromArgMatches as _};
    let parsed = Cli::command()
        .try_get_matches()
        .and_then(|m| Ok((Cli::from_arg_matches(&m)?, command_name(&m))));
    let (cli, name) = match parsed {
        Ok(parsed) => parsed,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            });
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::ERROR);
        }
    };
    let daemon = matches!(cli.command, Command::Node(NodeCommand::Run(_)));
    let result = if daemon {
        telemetry::init(true);
        runtime.block_on(run(cli))
    } else {
        runtime.block_on(traced(cli, name))
    };
    if daemon {
        // Its shutdown is done, or over its bound: nothing left is waited for.
        runtime.shutdown_background();
    } else {
        // Don't wait long for background tasks (e.g. connections still closing).
        runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    }
    match result {
        Ok(()) => ExitCode::from(exit::OK),
        Err(failure) => {
            eprintln!("error: {failure}");
            ExitCode::from(failure.code)
        }
    }
}

/// Runs a CLI command, in a span of its own when it is traced (`--trace`, or an OTLP
/// endpoint in the environment), then sends that span.
async fn traced(cli: Cli, name: String) -> Result<(), Failure> {
    use tracing::Instrument as _;
    let url = telemetry::traces_url(None);
    if !cli.trace && url.is_none() {
        return run(cli).await;
    }
    telemetry::init(false);
    let service = telemetry::Service {
        name: "blixard-cli",
        instance: None,
    };
    // The command matters more than its span: a bad endpoint is a warning here.
    if let Err(e) = telemetry::start(url.as_deref(), service.clone()) {
        eprintln!("warning: {e}; this command's span is not exported");
        let _ = telemetry::start(None, service);
    }
    let span = tracing::info_span!(
        target: blixard_net::trace::TARGET,
        "cli",
        otel.name = %name,
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
    );
    let print = cli.trace;
    let result = run(cli).instrument(span.clone()).await;
    if let Err(e) = &result {
        span.record("otel.status_code", "error");
        span.record("otel.status_description", e.to_string());
    }
    let id = blixard_net::trace::trace_id(&span);
    drop(span);
    if let (true, Some(id)) = (print, id) {
        eprintln!("trace {id}");
    }
    telemetry::flush(std::time::Duration::from_secs(2)).await;
    result
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let ctx = cli::Context {
        data_dir: cli.data_dir.clone(),
        node: cli.node.clone(),
        key: cli.credential.clone(),
        output: cli.output,
        timeout: std::time::Duration::from_secs(cli.timeout.max(1)),
    };
    match cli.command {
        Command::Node(NodeCommand::CheckConfig { file }) => {
            let config = config::Config::load(&file).map_err(|e| Failure::new(exit::CONFIG, e))?;
            if let Some(f) = &config.vms.declared_file {
                declared::load(std::path::Path::new(f))
                    .map_err(|e| Failure::new(exit::CONFIG, e))?;
            }
            cli::format::json(&config).map_err(|e| Failure::new(exit::ERROR, e))
        }
        Command::Node(NodeCommand::CheckData) => {
            let report = daemon::check_data(&cli.data_dir)?;
            cli::node_check_data(&ctx, &report).map_err(|e| Failure::new(exit::ERROR, e))
        }
        Command::Node(NodeCommand::Run(args)) => daemon::run(&cli.data_dir, (*args).into()).await,
        Command::Cluster(cmd) => match cmd {
            ClusterCommand::Status(a) => cli::cluster::status(&ctx, a.stale).await,
            ClusterCommand::Token(TokenCommand::Create { ttl, learner }) => {
                cli::cluster::token_create(&ctx, &ttl, learner).await
            }
            ClusterCommand::Token(TokenCommand::List { stale }) => {
                cli::cluster::token_list(&ctx, stale).await
            }
            ClusterCommand::Token(TokenCommand::Revoke { id }) => {
                cli::cluster::token_revoke(&ctx, &id).await
            }
            ClusterCommand::Leave { id } => cli::cluster::leave(&ctx, &id).await,
            ClusterCommand::Promote { id } => {
                cli::cluster::set_role(&ctx, &id, blixard_core::MemberRole::Voter).await
            }
            ClusterCommand::Demote { id } => {
                cli::cluster::set_role(&ctx, &id, blixard_core::MemberRole::Learner).await
            }
            ClusterCommand::RotateAdminKey => cli::cluster::rotate_admin_key(&ctx).await,
            ClusterCommand::Meta(MetaCommand::Set { name, value }) => {
                cli::cluster::meta_set(&ctx, name, Some(value)).await
            }
            ClusterCommand::Meta(MetaCommand::Rm { name }) => {
                cli::cluster::meta_set(&ctx, name, None).await
            }
            ClusterCommand::Meta(MetaCommand::Get { name, stale }) => {
                cli::cluster::meta_get(&ctx, name, stale).await
            }
            ClusterCommand::Backup(b) => match (b.command, b.out) {
                (Some(BackupCommand::Verify { file }), _) => cli::backup::verify(&ctx, &file),
                (None, Some(out)) => cli::backup::backup(&ctx, &out).await,
                (None, None) => Err(Failure::new(exit::USAGE, "cluster backup needs --out FILE")),
            },
        },
        Command::Whoami => cli::whoami(&ctx),
        Command::User(UserCommand::Add {
            name,
            public_key,
            roles,
            tenant,
        }) => cli::cluster::user_add(&ctx, name, &public_key, roles, tenant).await,
        Command::User(UserCommand::List { stale }) => cli::cluster::user_list(&ctx, stale).await,
        Command::User(UserCommand::Rm { name }) => cli::cluster::user_rm(&ctx, name).await,
        Command::User(UserCommand::SetKey { name, public_key }) => {
            cli::cluster::user_set_key(&ctx, name, &public_key).await
        }
        Command::Policy(PolicyCommand::Show) => cli::cluster::policy_show(&ctx).await,
        Command::Policy(PolicyCommand::Set { file }) => cli::cluster::policy_set(&ctx, &file).await,
        Command::Policy(PolicyCommand::Test {
            principal,
            action,
            resource,
        }) => cli::cluster::policy_test(&ctx, principal, action, resource).await,
        Command::Audit(AuditCommand::Tail { lines, follow }) => {
            cli::cluster::audit_tail(&ctx, lines, follow).await
        }
        Command::Events {
            follow,
            kinds,
            after,
        } => cli::events::run(&ctx, follow, &kinds, after).await,
        Command::Image(cmd) => cli::images::run(&ctx, cmd).await,
        Command::Tenant(cmd) => cli::tenants::tenant(&ctx, cmd).await,
        Command::Quota(cmd) => cli::tenants::quota(&ctx, cmd).await,
        Command::Node(NodeCommand::List { stale }) => cli::tenants::node_list(&ctx, stale).await,
        Command::Node(NodeCommand::Stats) => cli::tenants::node_stats(&ctx).await,
        Command::Node(NodeCommand::Restore {
            file,
            keep_cluster_id,
            name,
            config,
            labels,
        }) => {
            let args = daemon::RestoreArgs {
                keep_cluster_id,
                name,
                config,
                labels,
            };
            cli::backup::restore(&ctx, &file, &args)
        }
        Command::Node(NodeCommand::Drain {
            id,
            wait,
            wait_timeout,
        }) => {
            let wait = wait.then(|| std::time::Duration::from_secs(wait_timeout));
            cli::vms::drain(&ctx, id, true, wait).await
        }
        Command::Node(NodeCommand::Undrain { id }) => cli::vms::drain(&ctx, id, false, None).await,
        Command::Vm(cmd) => cli::vms::run(&ctx, cmd).await,
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "blixard", &mut std::io::stdout());
            Ok(())
        }
        Command::Man { out } => {
            use clap::CommandFactory as _;
            std::fs::create_dir_all(&out)
                .and_then(|()| clap_mangen::generate_to(Cli::command(), &out))
                .map_err(|e| Failure::new(exit::ERROR, format!("{}: {e}", out.display())))
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        // clap checks (in debug builds, at parse time) what this checks here once.
        super::Cli::command().debug_assert();
    }
}
