//! `blixard events`: the cluster's state changes as the answering node applied them, the
//! latest or (`--follow`) as a stream, by long polls of `EventsRequest`.

use blixard_core::Topic;
use blixard_net::api::{Event, EventsRequest};
use blixard_net::client::ApiClient;
use blixard_net::EndpointAddr;

use super::format::Format;
use super::{client, Context};
use blixard_node::exit::{self, Failure};

/// How long one poll of `--follow` waits on the node for the next change.
const POLL_MS: u64 = 20_000;

pub async fn run(
    ctx: &Context,
    follow: bool,
    kinds: &[String],
    after: Option<u64>,
) -> Result<(), Failure> {
    let topics = kinds
        .iter()
        .map(|k| k.parse::<Topic>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Failure::new(exit::USAGE, e))?;
    let (client, to) = client(ctx).await?;
    let result = stream(ctx, &client, &to, follow, topics, after).await;
    client.endpoint().close().await;
    result
}

async fn stream(
    ctx: &Context,
    client: &ApiClient,
    to: &EndpointAddr,
    follow: bool,
    topics: Vec<Topic>,
    mut after: Option<u64>,
) -> Result<(), Failure> {
    let json = ctx.output == Format::Json;
    loop {
        let request = EventsRequest {
            after,
            topics: topics.clone(),
            wait_ms: if follow && after.is_some() {
                POLL_MS
            } else {
                0
            },
        };
        let list = client.call(to, request).await?;
        if let Some(first) = list.gap {
            eprintln!(
                "warning: events after index {} up to {first} are no longer held by this node (it keeps the latest {}); they were missed",
                after.unwrap_or(0),
                blixard_node::events::CAPACITY
            );
        }
        for e in &list.events {
            if !print(e, json)? {
                return Ok(());
            }
        }
        if !follow {
            return Ok(());
        }
        after = Some(list.next);
    }
}

/// One event per line: a JSON object, or `INDEX TIME KIND NAME COMMAND WHAT`. False when
/// stdout is closed (a reader such as `head` went away): the stream ends there.
fn print(e: &Event, json: bool) -> Result<bool, Failure> {
    use std::io::Write as _;
    let line = if json {
        serde_json::to_string(e).map_err(|err| Failure::new(exit::ERROR, err))?
    } else {
        let at = jiff::Timestamp::from_millisecond(e.at_ms as i64)
            .map(|t| format!("{t:.3}"))
            .unwrap_or_else(|_| e.at_ms.to_string());
        format!(
            "{:>8}  {at}  {:<7} {:<20} {:<18} {}",
            e.index,
            e.topic.as_str(),
            e.name,
            e.kind,
            e.what
        )
    };
    let mut out = std::io::stdout().lock();
    Ok(writeln!(out, "{line}").and_then(|()| out.flush()).is_ok())
}
