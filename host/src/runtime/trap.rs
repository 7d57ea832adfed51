//! Why a call or an instantiation trapped, told apart: the plugin's own doing (a panic,
//! its time, its memory cap) from the node's (its plugin memory budget used up).

use std::time::Duration;

use super::memory::{InstanceMemoryFull, NodeMemoryFull};
use crate::metrics::TrapCause;

/// Why a call or an instantiation trapped.
pub(super) enum Cause {
    /// The plugin's own doing (a panic, its time, its memory cap).
    Crashed(String),
    /// The node's: its plugin memory budget is used up.
    Evicted(String),
}

impl Cause {
    pub(super) fn text(&self) -> &str {
        match self {
            Cause::Crashed(why) | Cause::Evicted(why) => why,
        }
    }
}

/// Why a call or an instantiation trapped, as the metrics count it.
pub(super) fn trap_kind(e: &wasmtime::Error) -> TrapCause {
    if e.downcast_ref::<NodeMemoryFull>().is_some() {
        return TrapCause::NodeMemory;
    }
    if e.downcast_ref::<InstanceMemoryFull>().is_some() {
        return TrapCause::MemoryCap;
    }
    match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => TrapCause::Deadline,
        Some(wasmtime::Trap::StackOverflow) => TrapCause::StackOverflow,
        _ => TrapCause::Other,
    }
}

/// Why a call or an instantiation trapped, in words for logs.
pub(super) fn trap_cause(e: &wasmtime::Error, call_time: Duration) -> Cause {
    if let Some(full) = e.downcast_ref::<NodeMemoryFull>() {
        return Cause::Evicted(full.to_string());
    }
    if let Some(full) = e.downcast_ref::<InstanceMemoryFull>() {
        return Cause::Crashed(full.to_string());
    }
    Cause::Crashed(match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => {
            format!("CPU time limit of {} ms exceeded", call_time.as_millis())
        }
        Some(wasmtime::Trap::StackOverflow) => "wasm stack overflow".into(),
        Some(t) => format!("trap: {t}"),
        None => format!("{e:#}"),
    })
}
