//! `cinder plugin ...`: the plugin admin API of a running server from the command line
//! (push a version, list, activate, roll back, delete), over HTTP/1.1 with the admin token.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use bytes::Bytes;
use clap::{Args, Subcommand};
use http_body_util::{BodyExt as _, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Options of `cinder plugin`.
#[derive(Debug, Clone, Args)]
pub struct PluginArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: PluginAction,
    /// The server's base URL (plain HTTP).
    #[arg(
        long,
        env = "CINDER_SERVER",
        default_value = "http://127.0.0.1:4000",
        global = true
    )]
    pub server: String,
    /// The admin token [default: the one kept in the data dir].
    #[arg(
        long,
        env = "CINDER_ADMIN_TOKEN",
        hide_env_values = true,
        global = true
    )]
    pub admin_token: Option<String>,
    /// Data dir to read a generated admin token from [default: ./cinder-data].
    #[arg(long, env = "CINDER_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
}

/// `cinder plugin` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum PluginAction {
    /// Upload a version (and activate it, moving live rooms to it).
    Push {
        /// The component.
        wasm: PathBuf,
        /// Its manifest [default: the .toml beside the wasm, or cinder.toml in its dir].
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// Store the version without activating it.
        #[arg(long)]
        no_activate: bool,
    },
    /// List plugins, their versions and live rooms.
    List,
    /// Make a stored version active.
    Activate {
        /// Plugin name.
        name: String,
        /// Version.
        version: String,
    },
    /// Go back to the previous active version, or to the one given.
    Rollback {
        /// Plugin name.
        name: String,
        /// Version [default: the one active before the current].
        version: Option<String>,
    },
    /// Delete a stored version, or the whole plugin when no version is given.
    Delete {
        /// Plugin name.
        name: String,
        /// Version.
        version: Option<String>,
    },
}

/// Runs a `cinder plugin` command; prints what the server answered.
pub fn run(args: PluginArgs) -> anyhow::Result<()> {
    let token = match &args.admin_token {
        Some(token) => token.clone(),
        None => {
            let config = crate::config::Config {
                data_dir: args
                    .data_dir
                    .clone()
                    .unwrap_or_else(|| crate::config::Config::default().data_dir),
                ..Default::default()
            };
            crate::config::Secrets::read(&config)?
                .context("no admin token: pass --admin-token or set CINDER_ADMIN_TOKEN")?
                .admin_token
        }
    };
    let client = Client::new(&args.server, token)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match args.action {
            PluginAction::Push {
                wasm,
                manifest,
                no_activate,
            } => {
                let manifest = manifest_for(&wasm, manifest.as_deref())?;
                let manifest_text = std::fs::read(&manifest)
                    .with_context(|| format!("reading {}", manifest.display()))?;
                let wasm_bytes =
                    std::fs::read(&wasm).with_context(|| format!("reading {}", wasm.display()))?;
                let boundary = format!("cinder-{:016x}", rand::random::<u64>());
                let body = multipart(
                    &boundary,
                    &[("manifest", &manifest_text), ("wasm", &wasm_bytes)],
                );
                let path = if no_activate {
                    "/api/plugins?activate=false"
                } else {
                    "/api/plugins"
                };
                let content_type = format!("multipart/form-data; boundary={boundary}");
                let answer = client
                    .call(Method::POST, path, Some((&content_type, body)))
                    .await?;
                print_upload(&answer);
            }
            PluginAction::List => {
                let answer = client.call(Method::GET, "/api/plugins", None).await?;
                print_list(&answer);
            }
            PluginAction::Activate { name, version } => {
                print_activation(&client.activation(&name, "activate", Some(&version)).await?);
            }
            PluginAction::Rollback { name, version } => {
                print_activation(
                    &client
                        .activation(&name, "rollback", version.as_deref())
                        .await?,
                );
            }
            PluginAction::Delete { name, version } => {
                let path = match &version {
                    Some(v) => format!("/api/plugins/{name}/versions/{v}"),
                    None => format!("/api/plugins/{name}"),
                };
                client.call(Method::DELETE, &path, None).await?;
                match version {
                    Some(v) => println!("deleted {name} {v}"),
                    None => println!("deleted {name}"),
                }
            }
        }
        Ok(())
    })
}

/// The manifest to push with `wasm`: the one given, `<wasm stem>.toml`, or `cinder.toml`
/// in the wasm's dir.
fn manifest_for(wasm: &Path, given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(given) = given {
        return Ok(given.to_owned());
    }
    let beside = wasm.with_extension("toml");
    if beside.is_file() {
        return Ok(beside);
    }
    let in_dir = wasm.with_file_name("cinder.toml");
    if in_dir.is_file() {
        return Ok(in_dir);
    }
    anyhow::bail!(
        "no manifest for {}: looked for {} and {}; pass --manifest",
        wasm.display(),
        beside.display(),
        in_dir.display()
    )
}

/// A multipart/form-data body of named binary parts, as `POST /api/plugins` takes.
pub fn multipart(boundary: &str, parts: &[(&str, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, bytes) in parts {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    body
}

struct Client {
    authority: String,
    token: String,
}

impl Client {
    fn new(server: &str, token: String) -> anyhow::Result<Client> {
        let authority = server
            .strip_prefix("http://")
            .with_context(|| {
                format!("--server must be an http:// URL (TLS belongs to a proxy in front), got {server}")
            })?
            .trim_end_matches('/')
            .to_owned();
        anyhow::ensure!(
            !authority.is_empty() && !authority.contains('/'),
            "--server must be a base URL like http://127.0.0.1:4000, got {server}"
        );
        Ok(Client { authority, token })
    }

    /// `POST /api/plugins/{name}/{action}` (`activate` or `rollback`), with the version
    /// when one is given.
    async fn activation(
        &self,
        name: &str,
        action: &str,
        version: Option<&str>,
    ) -> anyhow::Result<Value> {
        let body = version
            .map(|v| serde_json::json!({ "version": v }).to_string())
            .unwrap_or_default();
        self.call(
            Method::POST,
            &format!("/api/plugins/{name}/{action}"),
            Some(("application/json", body.into_bytes())),
        )
        .await
    }

    /// Sends one request; a non-2xx answer becomes an error carrying the server's message.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> anyhow::Result<Value> {
        let stream = tokio::net::TcpStream::connect(&self.authority)
            .await
            .with_context(|| format!("connecting to {}", self.authority))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP handshake")?;
        tokio::spawn(connection);
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, &self.authority)
            .header(AUTHORIZATION, format!("Bearer {}", self.token));
        let payload = match body {
            Some((content_type, bytes)) => {
                request = request.header(CONTENT_TYPE, content_type);
                Bytes::from(bytes)
            }
            None => Bytes::new(),
        };
        let response = sender
            .send_request(request.body(Full::new(payload))?)
            .await
            .with_context(|| format!("sending {path}"))?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        let value: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        if !status.is_success() {
            let message = value
                .get("error")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| value.to_string());
            anyhow::bail!("{status}: {message}");
        }
        Ok(value)
    }
}

fn text(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

fn print_upload(v: &Value) {
    let stored = if v.get("created") == Some(&Value::Bool(true)) {
        "stored"
    } else {
        "already stored"
    };
    println!(
        "{} {} {stored} (sha256 {})",
        text(v, "plugin"),
        text(v, "version"),
        text(v, "sha256")
    );
    if let Some(activation) = v.get("activation").filter(|a| !a.is_null()) {
        print_activation(activation);
    }
}

fn print_activation(v: &Value) {
    println!(
        "{} {} active (was {}): {} of {} live rooms moved in {} ms",
        text(v, "plugin"),
        text(v, "version"),
        text(v, "previous"),
        text(v, "swapped"),
        text(v, "rooms"),
        v.get("took_ms")
            .and_then(Value::as_f64)
            .map_or_else(|| "-".into(), |ms| format!("{ms:.1}"))
    );
    if let Some(p) = v.get("pause_us").filter(|p| !p.is_null()) {
        println!(
            "  room pause: p50 {} µs, p99 {} µs, max {} µs",
            text(p, "p50"),
            text(p, "p99"),
            text(p, "max")
        );
    }
    for failed in v
        .get("failed")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        println!(
            "  stayed on the old version: {}: {}",
            text(failed, "topic"),
            text(failed, "error")
        );
    }
}

fn print_list(v: &Value) {
    let plugins = v.as_array().cloned().unwrap_or_default();
    if plugins.is_empty() {
        println!("no plugins");
    }
    for p in plugins {
        let topics: Vec<String> = p
            .get("topics")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|t| t.as_str().map(str::to_owned))
            .collect();
        println!(
            "{}  active {}  topics {}  live rooms {}",
            text(&p, "name"),
            text(&p, "active"),
            topics.join(" "),
            text(&p, "live_rooms")
        );
        for version in p
            .get("versions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let sha = text(version, "sha256");
            println!(
                "  {}  {} bytes  sha256 {}  from {}",
                text(version, "version"),
                text(version, "bytes"),
                &sha[..sha.len().min(12)],
                text(version, "source")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_bodies_frame_each_part() {
        let body = multipart("b", &[("manifest", b"m"), ("wasm", b"\0asm")]);
        let text = String::from_utf8_lossy(&body);
        assert!(text.starts_with("--b\r\nContent-Disposition: form-data; name=\"manifest\""));
        assert!(text.contains("\r\n\r\nm\r\n--b\r\n"));
        assert!(text.ends_with("\r\n--b--\r\n"));
    }

    #[test]
    fn server_urls_must_be_plain_http_base_urls() {
        assert!(Client::new("http://127.0.0.1:4000/", "t".into()).is_ok());
        assert!(Client::new("https://x", "t".into()).is_err());
        assert!(Client::new("http://x/api", "t".into()).is_err());
    }
}
