//! The store data of one room's plugin instance ([`InstanceData`]): its WASI context and
//! resource limits, the effects the current call's host calls recorded, what the call used
//! and may still do, and its CPU clock; and arming a call's deadline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::Store;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::cinder::channel::types as wit;
use super::clock::CallClock;
use super::memory::Limiter;
use super::ticker::Ticker;
use crate::channel::{CallBudget, Effect, MemberId};
use crate::config::Limits;
use crate::limit::{SharedBucket, Warnings};
use crate::presence::{Account, Tracker};
use crate::stats::Stats;

/// Store data of one room instance.
pub(super) struct InstanceData {
    pub(super) wasi: WasiCtx,
    pub(super) table: ResourceTable,
    pub(super) limiter: Limiter,
    /// Host calls of the current call.
    pub(super) effects: Vec<Effect>,
    /// What the current call's host calls used of its limits.
    pub(super) spent: Spent,
    /// What the room allows the next call (see [`CallBudget`]), until it starts.
    pub(super) budget: Option<CallBudget>,
    /// What the current call is allowed beside the per-call limits.
    pub(super) allowed: CallBudget,
    /// The current call's CPU time.
    pub(super) clock: CallClock,
    pub(super) plugin: Arc<str>,
    /// The plugin's topic patterns: what `presence.list` may read.
    pub(super) patterns: Arc<[String]>,
    pub(super) topic: Arc<str>,
    pub(super) limits: Limits,
    pub(super) presence: Arc<Tracker>,
    /// The presence account of the current call's socket.
    pub(super) account: Option<Arc<Account>>,
    /// The channel the current call is about: owner of the presence it tracks.
    pub(super) channel: MemberId,
    pub(super) ticker: Arc<Ticker>,
    pub(super) stats: Arc<Stats>,
    pub(super) warnings: Arc<Warnings>,
    pub(super) log_limiter: Arc<SharedBucket>,
}

/// Lets guest code in `store` run for `time` of CPU from now: starts its clock, arms the
/// epoch deadline of the next tick and keeps the ticker ticking until at least then.
pub(super) fn arm(store: &mut Store<InstanceData>, time: Duration) {
    let data = store.data_mut();
    let now = Instant::now();
    data.clock.start(time, now);
    data.ticker.keep_ticking(now + time);
    store.set_epoch_deadline(1);
}

impl WasiView for InstanceData {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl InstanceData {
    /// Starts a call about `channel`.
    pub(super) fn begin(&mut self, channel: MemberId, account: Option<Arc<Account>>) {
        self.effects.clear();
        self.spent = Spent::default();
        self.allowed = self
            .budget
            .take()
            .unwrap_or_else(|| CallBudget::full(&self.limits, self.limits.max_timers_per_channel));
        self.channel = channel;
        self.account = account;
    }
}

/// What one call's host calls used.
#[derive(Default)]
pub(super) struct Spent {
    /// Pushes, broadcasts, timers and tracks.
    pub(super) messages: usize,
    /// Their payload bytes.
    pub(super) bytes: usize,
    pub(super) broadcasts: usize,
    pub(super) broadcast_bytes: usize,
    pub(super) timers: usize,
}

/// Bytes of a payload as the plugin handed it over, before anything parses it.
pub(super) fn wit_len(p: &wit::Payload) -> usize {
    match p {
        wit::Payload::Json(text) => text.len(),
        wit::Payload::Binary(bytes) => bytes.len(),
    }
}
