//! Cinder: a real-time channel server that speaks the Phoenix Channels protocol and runs
//! channel logic in sandboxed WebAssembly components.
//!
//! # Layout
//! - [`protocol`]: Phoenix frames in and out (V1 JSON, V2 JSON, V2 binary). Pure.
//! - [`auth`]: connect tokens (JWT HS256).
//! - [`transport`]: the WebSocket endpoint and one task per socket.
//! - [`channel`]: the per-socket session and the room actor (one plugin instance per topic).
//! - [`pubsub`]: topic fan-out, encoded once per serializer.
//! - [`presence`]: who is in each topic (a delta CRDT plus the Phoenix wire shapes).
//! - [`runtime`]: wasmtime, the `cinder:channel` world, the manifest, compiling and checking.
//! - [`registry`]: plugins and their versions: upload, activate (hot reload), roll back,
//!   delete, routing, the plugins dir and the watched dir.
//! - [`store`]: the durable plugin store and artifact cache in the data dir.
//! - [`api`]: the HTTP API (server push, plugin administration).
//! - [`client`]: `cinder plugin ...`, the admin API from the command line.
//! - [`cli`]: the command line: subcommands, flags, environment, into a [`config::Config`].
//! - [`config`]: defaults, file, environment and flags; every limit.
//! - [`server`]: what the handlers share, the router, and the accept loop (connection
//!   cap, header and body timeouts, the admin token before any body).
//! - [`limit`]: token buckets, and the rate of the host's warnings about a plugin.
//! - [`logging`]: the log subscriber; records that plugins and clients cannot forge.
//!
//! The binary only parses arguments and calls [`serve`], so tests start a server on port 0
//! in-process.

pub mod api;
pub mod auth;
pub mod channel;
pub mod cli;
pub mod client;
pub mod config;
pub mod limit;
pub mod logging;
pub mod presence;
pub mod protocol;
pub mod pubsub;
pub mod registry;
pub mod runtime;
pub mod server;
pub mod stats;
pub mod store;
pub mod transport;

pub use server::serve;
