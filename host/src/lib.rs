//! Cinder: a real-time channel server that speaks the Phoenix Channels protocol and runs
//! channel logic in sandboxed WebAssembly components.
//!
//! # Layout
//! Bottom up: each module imports only modules listed before it (docs/design.md).
//! - [`protocol`]: Phoenix frames in and out (V1 JSON, V2 JSON, V2 binary), every protocol string. Pure.
//! - [`metrics`]: the Prometheus families (labelled by plugin version, transport), their
//!   handles, the exposition text.
//! - [`stats`]: the counters of every limit hit, and the gauges.
//! - [`limit`]: token buckets, the host's warnings about a plugin, the connection slots.
//! - [`config`]: every setting and its default, the TOML file, validation, generated secrets.
//! - [`logging`]: the log subscriber; records that plugins and clients cannot forge.
//! - [`auth`]: connect tokens (JWT HS256): verification, minting, the identity a token gives.
//! - [`connect`]: what a connect passes on either transport: origin, serializer, token, rate.
//! - [`cluster`]: the link to the cluster's Redis: node id, the connection, outages, membership.
//! - [`lease`]: room leases on a cluster (owner, fencing number, renewal) and room snapshots.
//! - [`pubsub`]: topic fan-out, encoded once per serializer; socket ids apart; local or Redis.
//! - [`presence`]: who is in each topic (a delta CRDT plus the Phoenix wire shapes), its budgets.
//! - [`store`]: the durable plugin store and artifact cache in the data dir.
//! - [`channel`]: the per-socket session, the hub of live rooms and the room actor; owned
//!   rooms on a cluster (one instance for the cluster, calls forwarded to its owner).
//! - [`runtime`]: wasmtime: engine, manifest, plugin, instance, host imports, limits.
//! - [`registry`]: plugins and their versions: upload, activate (hot reload), roll back,
//!   delete, routing, the plugins dir and the watched dir.
//! - [`deploy`]: plugin versions on a cluster: kept in Redis, announced, converged on by every node.
//! - [`transport`]: the WebSocket endpoint and one task per socket.
//! - [`longpoll`]: the LongPoll endpoint, one task per session, sessions reached from any node.
//! - [`pages`]: the web pages (landing, demo chat, admin) and their assets, in the binary.
//! - [`api`]: the HTTP API (server push, stats, metrics, rooms, presence, plugin
//!   administration, the demo's development tokens).
//! - [`server`]: building the node, the router, the accept loop (connection cap, timeouts).
//! - [`client`]: `cinder plugin ...`, the admin API from the command line.
//! - [`cli`]: the command line: subcommands, flags, environment, into a [`config::Config`].
//!
//! The binary only parses arguments and calls [`serve`], so tests start a server on port 0
//! in-process.

pub mod api;
pub mod auth;
pub mod channel;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod config;
pub mod connect;
pub mod deploy;
pub mod lease;
pub mod limit;
pub mod logging;
pub mod longpoll;
pub mod metrics;
pub mod pages;
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
