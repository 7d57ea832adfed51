//! Load measurements against a real `cinder` server process on loopback, or against any
//! Phoenix-protocol server (`--target`).
//!
//! ```text
//! cinder-bench idle [SOCKETS]        server RSS per idle socket joined to room:lobby
//! cinder-bench first-join [ROOMS]    join latency of brand-new rooms over a WebSocket
//! cinder-bench neighbour [CALLS]     a room's echo latency alone, beside a looping plugin,
//!                                    beside a plugin doing 9 ms of legal work per call,
//!                                    and beside one making oversized broadcasts
//! cinder-bench reload [ROOMS]        hot reload under load: ROOMS counter rooms each sending
//!                                    `inc` every 10 ms; upload-to-live time, per-room swap
//!                                    pause, message latency, and lost messages (must be 0)
//! cinder-bench fanout [SUBSCRIBERS]  one topic, SUBSCRIBERS sockets, 6 rounds of 100
//!                                    broadcasts through the HTTP API, then made by a plugin:
//!                                    deliveries per second and server CPU per delivery
//!                                    (user and kernel), against the raw baseline server in
//!                                    the same run
//! cinder-bench chat [ROOMS] [RATE]   ROOMS chat rooms of 10 members, RATE messages/s in all
//!                                    through the chat plugin: send-to-receive latency
//!                                    p50/p99/p999, deliveries per second and the CPU the
//!                                    server and the load generator used, for 10 s; as
//!                                    shipped (new_message on the fastlane), then the same
//!                                    component with new_message intercepted (handle_out
//!                                    per member)
//! cinder-bench cluster [SUBSCRIBERS] [ROOMS] [RATE]
//!                                    three nodes on a redis-server started here, against
//!                                    one node in the same run: API fan-out over the nodes,
//!                                    chat with each room's members on different nodes, the
//!                                    time from kill -9 to the leave diff, Redis CPU per
//!                                    delivery
//! cinder-bench owned [CALLS]         rooms placed on an owner, on nodes sharing a redis-server
//!                                    started here: sequential inc latency from the owner's
//!                                    node and forwarded from another, for the counter placed
//!                                    local (the baseline), owned saving every second and after
//!                                    every message, with the CPU per message; kill -9 of the
//!                                    owner: time to the new owner's first reply, and losses
//! cinder-bench raw-server            the raw baseline: a tokio-tungstenite server that sends
//!                                    every text frame it gets to every other connection
//!
//! idle, first-join, fanout and chat also take:
//!   --target ws://HOST:PORT/socket   load that server instead of starting Cinder
//!   --api http://HOST:PORT           where POST /api/broadcast goes (default: the target's
//!                                    host and port)
//!   --jwt-secret S                   the HS256 secret for `user_id` connect tokens
//!   --admin-token T                  the bearer token for POST /api/broadcast
//!   --pid P                          the target's process, for its RSS and CPU figures
//! ```
//!
//! Without `--target` it starts `target/release/cinder` (or `$CINDER_BIN`) with the test
//! plugins on a free port, measures, and stops it. Bounded in count and time; loopback
//! only. Raises its open-file limit as far as the system lets it (the servers it starts
//! inherit it), and spreads its connections over many 127.x.y.z source addresses, so the
//! count is not capped by the ephemeral ports of one address.
//!
//! This file owns the command line, the dispatch to the scenarios (a module each) and the
//! global time limit.

mod chat;
mod cluster;
mod fanout;
mod first_join;
mod idle;
mod neighbour;
mod net;
mod owned;
mod proc;
mod raw_server;
mod reload;
mod server;
mod stats;

use std::time::Duration;

use server::Flags;

/// No run lasts longer.
const LIMIT: Duration = Duration::from_secs(300);

const USAGE: &str = "usage: cinder-bench idle [SOCKETS] | first-join [ROOMS] | neighbour [CALLS] | reload [ROOMS] | fanout [SUBSCRIBERS] | chat [ROOMS] [RATE] | cluster [SUBSCRIBERS] [ROOMS] [RATE] | owned [CALLS] | raw-server";
const USAGE_FLAGS: &str = "idle, first-join, fanout and chat also take --target ws://HOST:PORT/socket [--api http://HOST:PORT] [--jwt-secret S] [--admin-token T] [--pid P]";

/// Splits the command line into positional arguments and the `--target` flags (as
/// `--name value` or `--name=value`).
fn parse(args: Vec<String>) -> anyhow::Result<(Vec<String>, Flags)> {
    let mut positional = Vec::new();
    let mut flags = Flags::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let Some(name) = arg.strip_prefix("--") else {
            positional.push(arg);
            continue;
        };
        let (name, value) = match name.split_once('=') {
            Some((name, value)) => (name.to_owned(), value.to_owned()),
            None => (
                name.to_owned(),
                args.next()
                    .ok_or_else(|| anyhow::anyhow!("--{name} needs a value"))?,
            ),
        };
        match name.as_str() {
            "target" => flags.target = Some(value),
            "api" => flags.api = Some(value),
            "jwt-secret" => flags.jwt_secret = Some(value),
            "admin-token" => flags.admin_token = Some(value),
            "pid" => {
                flags.pid = Some(
                    value
                        .parse()
                        .map_err(|_| anyhow::anyhow!("--pid {value}: not a process id"))?,
                )
            }
            _ => anyhow::bail!("unknown flag --{name}\n{USAGE}\n{USAGE_FLAGS}"),
        }
    }
    Ok((positional, flags))
}

/// Refuses flags a scenario cannot honour: the Cinder-only ones take none, and the others
/// only with `--target`.
fn check(scenario: Option<&str>, flags: &Flags) -> anyhow::Result<()> {
    if !flags.any() {
        return Ok(());
    }
    match scenario {
        Some("neighbour") => anyhow::bail!(
            "neighbour is Cinder-only: it runs the misbehave and hostile test plugins (bad:*, hostile:*) on a server it starts itself, so it takes no --target"
        ),
        Some("reload") => anyhow::bail!(
            "reload is Cinder-only: it uploads and activates counter versions through Cinder's admin API on a server it starts itself, so it takes no --target"
        ),
        Some("cluster") => anyhow::bail!(
            "cluster is Cinder-only: it starts its own redis-server and three Cinder nodes, so it takes no --target"
        ),
        Some("owned") => anyhow::bail!(
            "owned is Cinder-only: it starts its own redis-server and Cinder nodes and uploads counter variants, so it takes no --target"
        ),
        Some("raw-server") => {
            anyhow::bail!("raw-server is the baseline server: it takes no --target")
        }
        _ => {}
    }
    anyhow::ensure!(
        flags.target.is_some(),
        "--api, --jwt-secret, --admin-token and --pid go with --target (without it the bench starts Cinder itself)"
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let (args, flags) = parse(std::env::args().skip(1).collect())?;
    check(args.first().map(String::as_str), &flags)?;
    let count = |default: usize| args.get(1).and_then(|n| n.parse().ok()).unwrap_or(default);
    let second = |default: usize| args.get(2).and_then(|n| n.parse().ok()).unwrap_or(default);
    let third = |default: usize| args.get(3).and_then(|n| n.parse().ok()).unwrap_or(default);
    net::raise_fd_limit(1 << 20);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let work = async {
            match args.first().map(String::as_str) {
                Some("idle") => idle::run(&flags, count(10_000)).await,
                Some("first-join") => first_join::run(&flags, count(1_000)).await,
                Some("neighbour") => neighbour::run(count(2_000)).await,
                Some("reload") => reload::run(count(100)).await,
                Some("fanout") => fanout::run(&flags, count(10_000)).await,
                Some("chat") => chat::run(&flags, count(1_000), second(20_000)).await,
                Some("cluster") => cluster::run(count(10_000), second(500), third(5_000)).await,
                Some("owned") => owned::run(count(2_000)).await,
                Some("raw-server") => raw_server::run().await,
                _ => anyhow::bail!("{USAGE}\n{USAGE_FLAGS}"),
            }
        };
        tokio::time::timeout(LIMIT, work)
            .await
            .map_err(|_| anyhow::anyhow!("gave up after {LIMIT:?}"))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn flags_come_as_name_value_or_name_equals_value() {
        let (positional, flags) = parse(args(
            "fanout 100 --target ws://h:1/socket --pid=42 --jwt-secret s",
        ))
        .expect("a valid command line");
        assert_eq!(positional, ["fanout", "100"]);
        assert_eq!(flags.target.as_deref(), Some("ws://h:1/socket"));
        assert_eq!(flags.pid, Some(42));
        assert_eq!(flags.jwt_secret.as_deref(), Some("s"));
        assert!(parse(args("idle --pid x")).is_err());
        assert!(parse(args("idle --target")).is_err());
        assert!(parse(args("idle --colour red")).is_err());
    }

    #[test]
    fn cinder_only_scenarios_refuse_a_target_and_flags_need_one() {
        let target = |line: &str| {
            let (positional, flags) = parse(args(line)).expect("a valid command line");
            check(positional.first().map(String::as_str), &flags)
        };
        assert!(target("fanout --target ws://h:1/socket").is_ok());
        assert!(target("chat").is_ok());
        assert!(target("neighbour --target ws://h:1/socket").is_err());
        assert!(target("reload --target ws://h:1/socket").is_err());
        assert!(target("raw-server --target ws://h:1/socket").is_err());
        assert!(target("cluster --target ws://h:1/socket").is_err());
        assert!(target("idle --pid 3").is_err());
    }
}
