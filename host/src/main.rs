//! The `cinder` command: parse arguments, build the configuration, call [`cinder::serve`].

use cinder::cli::{Cli, Command, ServeArgs};
use cinder::config::Secrets;
use clap::Parser as _;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Token(args)) => {
            let config = args.serve.config()?;
            let longest = config.limits.max_token_lifetime_secs;
            anyhow::ensure!(
                args.ttl_secs <= longest,
                "--ttl-secs {} is over max_token_lifetime_secs ({longest}): the server would refuse the token",
                args.ttl_secs
            );
            // A given secret is used as is: nothing is generated or written.
            let secret = match config.jwt_secret.clone() {
                Some(secret) => secret,
                None => Secrets::resolve(&config)?.0.jwt_secret,
            };
            println!(
                "{}",
                cinder::auth::mint(&secret, &args.user_id, args.ttl_secs)?
            );
            Ok(())
        }
        Some(Command::Serve(args)) => serve(args),
        Some(Command::Plugin(args)) => cinder::client::run(args),
        None => serve(cli.serve),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    cinder::logging::init(config.log_format);
    raise_open_file_limit();
    let (secrets, generated) = Secrets::resolve(&config)?;
    if config.jwt_secret.is_none() || config.admin_token.is_none() {
        let sample = cinder::auth::mint(&secrets.jwt_secret, "42", 86_400)?;
        let origin = if generated {
            "generated now"
        } else {
            "generated earlier"
        };
        println!(
            "No CINDER_JWT_SECRET / CINDER_ADMIN_TOKEN set: using secrets {origin}, kept in {}",
            config.data_dir.display()
        );
        println!("  CINDER_JWT_SECRET={}", secrets.jwt_secret);
        println!("  CINDER_ADMIN_TOKEN={}", secrets.admin_token);
        println!("  sample connect token (user_id 42, 24 h): {sample}");
        println!(
            "  try: ws://{}{}/websocket?vsn=2.0.0&token={sample}",
            config.listen, config.mount
        );
    }
    if secrets.generated {
        println!(
            "  demo chat: http://{}/demo (this development server mints its tokens: set CINDER_JWT_SECRET to turn that off)",
            config.listen
        );
        if !config.listen.ip().is_loopback() {
            tracing::warn!(listen = %config.listen, "no CINDER_JWT_SECRET given and listening beyond loopback: anyone who reaches this server can mint connect tokens at /demo/token; give it a secret for any use but development");
        }
    }
    println!(
        "Admin page: http://{}/admin (sign in with the admin token)",
        config.listen
    );
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        cinder::serve(listener, config, secrets, shutdown_signal()).await
    })
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Raises the soft limit of open files to the hard one: every socket is a descriptor, and
/// the default soft limit (often 1024) would cap the connections far below what the
/// system allows. `max_connections` defaults to the limit this leaves.
fn raise_open_file_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            ..limit
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(error = %e, "cannot raise the open-file limit");
        }
    }
}
