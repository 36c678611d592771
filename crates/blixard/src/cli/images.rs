//! `blixard image …`: import, list, show, pull, pin, remove, and the cache key.

use std::path::Path;
use std::time::Duration;

use blixard_core::{Image, NodeId};
use blixard_net::api::{
    CacheKeyGet, ImageImport, ImageList, ImagePin, ImagePull, ImageRemove, ImageShow, PHASE_HELD,
};
use clap::Subcommand;

use super::delivery::print_pulled;
use super::format::{self as output, count, human_bytes, Format};
use super::{call, client, fail, Context};
use blixard_node::exit::{self, Failure};

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Import a closure: a Nix store path (with everything it references), or a plain
    /// directory, which becomes one store path. The path is read on the node's host.
    Import {
        path: String,
        #[arg(long)]
        name: String,
        /// The owning tenant (default: yours; none for a shared image).
        #[arg(long)]
        tenant: Option<String>,
        /// Pin it: never evicted, not removable until unpinned.
        #[arg(long)]
        pin: bool,
    },
    /// List images: name, root path, closure size, NAR count, which nodes hold it.
    List {
        #[arg(long)]
        stale: bool,
    },
    /// Show one image with the store paths of its closure.
    Show {
        name: String,
        #[arg(long)]
        stale: bool,
    },
    /// Make a node fetch an image now (normally fetched on demand): the node the CLI
    /// talks to (`--node n2` picks another), or several with `--to` or `--all`.
    Pull {
        name: String,
        /// Deliver it to these nodes (`n2,n3`), each holder serving one puller at a time,
        /// so the holders double each round.
        #[arg(long, value_delimiter = ',', conflicts_with = "all")]
        to: Vec<NodeId>,
        /// Deliver it to every member that lacks it (hosts marked down are skipped).
        #[arg(long)]
        all: bool,
    },
    /// Pin an image: it is never evicted, and `image rm` refuses it.
    Pin {
        name: String,
    },
    Unpin {
        name: String,
    },
    /// Remove an image from the cluster; refused while it is pinned.
    Rm {
        name: String,
    },
    /// Print the binary cache's public key (for Nix's trusted-public-keys) and its URL.
    CacheKey,
}

fn holders(i: &Image) -> String {
    if i.holders.is_empty() {
        return "-".into();
    }
    i.holders
        .iter()
        .map(|n| format!("n{n}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Long-running commands wait up to an hour unless `--timeout` asks for more.
fn long(ctx: &Context) -> Context {
    Context {
        timeout: ctx.timeout.max(Duration::from_secs(3600)),
        ..ctx.clone()
    }
}

pub async fn run(ctx: &Context, cmd: ImageCommand) -> Result<(), Failure> {
    match cmd {
        ImageCommand::Import {
            path,
            name,
            tenant,
            pin,
        } => {
            // A relative path means the caller's directory (the node is local then).
            let path = match std::fs::canonicalize(Path::new(&path)) {
                Ok(p) if ctx.node.is_none() => p.display().to_string(),
                _ => path,
            };
            let ctx = long(ctx);
            let (client, to) = client(&ctx).await?;
            eprintln!("importing {path} as {name} …");
            let mut view = output::ProgressView::new();
            let r = client
                .call_with_progress(
                    &to,
                    ImageImport {
                        name,
                        path,
                        tenant,
                        pin,
                    },
                    |p| view.update(&p.phase, p.done, p.total),
                )
                .await;
            view.finish();
            client.endpoint().close().await;
            let image = r?.image;
            if ctx.output == Format::Json {
                return output::json(&image).map_err(fail);
            }
            eprintln!(
                "imported {}: {} ({}, {})",
                image.name,
                image.root,
                count(image.nar_count as usize, "store path", "store paths"),
                human_bytes(image.nar_size)
            );
            Ok(())
        }
        ImageCommand::List { stale } => {
            let images = call(ctx, ImageList { stale }).await?.images;
            if ctx.output == Format::Json {
                return output::json(&images).map_err(fail);
            }
            let rows: Vec<Vec<String>> = images
                .iter()
                .map(|i| {
                    vec![
                        i.name.clone(),
                        i.tenant.clone().unwrap_or_else(|| "-".into()),
                        i.root.clone(),
                        human_bytes(i.nar_size),
                        i.nar_count.to_string(),
                        holders(i),
                        if i.pinned { "yes" } else { "" }.to_string(),
                    ]
                })
                .collect();
            output::table(
                &[
                    "NAME", "TENANT", "ROOT", "SIZE", "NARS", "HOLDERS", "PINNED",
                ],
                &rows,
            );
            Ok(())
        }
        ImageCommand::Show { name, stale } => {
            let d = call(ctx, ImageShow { name, stale }).await?;
            if ctx.output == Format::Json {
                return output::json(&d).map_err(fail);
            }
            let i = &d.image;
            out!("image     {}", i.name);
            out!("root      {}", i.root);
            out!("manifest  {}", i.manifest);
            out!(
                "size      {} in {} store paths",
                human_bytes(i.nar_size),
                i.nar_count
            );
            out!("holders   {}", holders(i));
            out!("tenant    {}", i.tenant.as_deref().unwrap_or("-"));
            out!("pinned    {}", if i.pinned { "yes" } else { "no" });
            out!();
            let rows: Vec<Vec<String>> = d
                .paths
                .iter()
                .map(|p| {
                    vec![
                        p.path.clone(),
                        human_bytes(p.nar_size),
                        p.references.len().to_string(),
                    ]
                })
                .collect();
            output::table(&["STORE PATH", "NAR SIZE", "REFS"], &rows);
            Ok(())
        }
        ImageCommand::Pull { name, to, all } => {
            let ctx = long(ctx);
            if all || !to.is_empty() {
                return super::delivery::deliver(&ctx, &name, to, all).await;
            }
            let (client, to) = client(&ctx).await?;
            let mut view = output::ProgressView::new();
            let r = client
                .call_with_progress(
                    &to,
                    ImagePull {
                        name: name.clone(),
                        node: None,
                    },
                    |p| {
                        if p.phase != PHASE_HELD {
                            view.update(&p.phase, p.done, p.total)
                        }
                    },
                )
                .await;
            view.finish();
            client.endpoint().close().await;
            let p = r?;
            if ctx.output == Format::Json {
                return output::json(&p).map_err(fail);
            }
            print_pulled(&name, &p);
            Ok(())
        }
        ImageCommand::Pin { name } => pin(ctx, name, true).await,
        ImageCommand::Unpin { name } => pin(ctx, name, false).await,
        ImageCommand::Rm { name } => {
            call(ctx, ImageRemove { name: name.clone() }).await?;
            let result = serde_json::json!({ "image": name, "removed": true });
            super::applied(ctx, result, format!("image {name} removed"))
        }
        ImageCommand::CacheKey => {
            let k = call(ctx, CacheKeyGet {}).await?;
            if ctx.output == Format::Json {
                return output::json(&k).map_err(fail);
            }
            match &k.public_key {
                Some(key) => out!("{key}"),
                None => return Err(Failure::new(
                    exit::REFUSED,
                    "the cluster has no cache key yet; it is created by the first `image import`",
                )),
            }
            if let Some(url) = &k.url {
                eprintln!("(binary cache of this node: {url})");
            }
            Ok(())
        }
    }
}

async fn pin(ctx: &Context, name: String, pinned: bool) -> Result<(), Failure> {
    let image = call(
        ctx,
        ImagePin {
            name: name.clone(),
            pinned,
        },
    )
    .await?;
    let result = serde_json::to_value(&image.image).map_err(super::fail)?;
    let text = format!(
        "image {name} {}",
        if pinned { "pinned" } else { "unpinned" }
    );
    super::applied(ctx, result, text)
}
