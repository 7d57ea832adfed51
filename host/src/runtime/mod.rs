//! The WebAssembly runtime: everything that touches wasmtime, and nothing that touches
//! sockets or routing (which plugin serves which topic is the registry's). It implements the
//! channel module's [`crate::channel::RoomLogic`] and [`crate::channel::LogicFactory`].
//!
//! # Layout
//! - `engine`: the wasmtime engine and its configuration (pooling allocator, epoch
//!   interruption), the artifact cache, compiling and linking a component ([`Runtime`]).
//! - `manifest`: what a plugin declares ([`Manifest`]), names, versions and topic patterns.
//! - `plugin`: a compiled plugin ([`Plugin`]): making instances, checking an upload, the
//!   crash record and quarantine.
//! - `instance`: one room's plugin instance (`PluginInstance`), the adapter from
//!   [`crate::channel::RoomLogic`] calls to the component's exports.
//! - `data`: the instance's store data (`InstanceData`): what the current call recorded,
//!   used and may still do, its clock; arming a call's deadline.
//! - `imports`: the host imports (`cinder:channel/host`, `presence`), linked by hand, and the
//!   limits of what one call may do.
//! - `trap`: why a call trapped, the plugin's doing or the node's.
//! - `clock`: a call's CPU-time budget. `memory`: memory per instance and per node.
//!   `compiler`: the compile thread. `ticker`: the epoch ticker. `output`: a plugin's stdout
//!   and stderr.
//!
//! This module holds the only `bindgen!` of the `cinder:channel` world, private.

mod clock;
mod compiler;
mod data;
mod engine;
mod imports;
mod instance;
mod manifest;
mod memory;
mod output;
mod plugin;
mod ticker;
mod trap;

pub use engine::Runtime;
pub use manifest::{
    MAX_NAME_BYTES, MAX_VERSION_BYTES, Manifest, PluginLimits, check_name, check_version,
    pattern_matches,
};
pub use plugin::Plugin;

use crate::channel::MemberId;

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "stateful-channel",
        exports: { default: async },
    });
}

/// The handler interface every plugin exports.
pub(super) const HANDLER_INTERFACE: &str = "cinder:channel/handler@0.1.0";
/// The optional state interface (hot reload).
pub(super) const STATE_INTERFACE: &str = "cinder:channel/state@0.1.0";

/// Core instances one component may have (Python components have 14).
pub(super) const MAX_CORE_INSTANCES_PER_COMPONENT: u32 = 20;
/// Memories and tables one component may have.
pub(super) const MAX_MEMORIES_PER_COMPONENT: u32 = 4;
/// The channel of a call that is about no channel (snapshot, restore): host calls fail.
pub(super) const NO_CHANNEL: MemberId = 0;
