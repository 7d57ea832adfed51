//! One room's plugin instance ([`PluginInstance`]) and its store data ([`InstanceData`]):
//! a [`RoomLogic`] call becomes a call of the component's export, its result an outcome and
//! the effects its host calls recorded; a trap kills the instance. Each call runs in a
//! `plugin_call` span (plugin, version, topic, export), is timed and counted in the
//! version's [`PluginMetrics`], and its error (its own, or a check of what it returned
//! failing: a reply over the limit, assigns that are not an object) or its trap is logged
//! inside the span.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::Instrument as _;
use wasmtime::Store;

use super::NO_CHANNEL;
use super::bindings::cinder::channel::types as wit;
use super::bindings::exports::cinder::channel::handler::Guest as HandlerExports;
use super::bindings::exports::cinder::channel::state::Guest as StateExports;
use super::data::{InstanceData, arm, wit_len};
use super::trap::{Cause, trap_cause, trap_kind};
use crate::channel::{
    BoxFuture, CallBudget, CallError, CallResult, ChannelSocket, Effect, Handled, InOutcome,
    InfoOutcome, JoinOutcome, MemberId, RoomLogic,
};
use crate::metrics::{Export, PluginMetrics};
use crate::presence::Account;
use crate::protocol::{Payload, Status};
use crate::stats::Stats;

/// The target of the plugin call spans.
const CALL_SPAN_TARGET: &str = "cinder::plugin_call";

/// Largest assigns a channel may hold: the host keeps them per channel, so a plugin must not
/// be able to grow them without bound.
const MAX_ASSIGNS_BYTES: usize = 64 << 10;

/// A payload a plugin handed over: JSON is checked (valid, nested at most
/// [`crate::protocol::MAX_JSON_DEPTH`] levels).
fn from_wit_payload(p: wit::Payload) -> Result<Payload, String> {
    match p {
        wit::Payload::Json(text) => Payload::untrusted_json(text).map_err(|e| e.to_string()),
        wit::Payload::Binary(bytes) => Ok(Payload::Binary(Bytes::from(bytes))),
    }
}

fn to_wit_payload(p: Payload) -> wit::Payload {
    match p {
        Payload::Json(raw) => wit::Payload::Json(String::from(Box::<str>::from(raw))),
        Payload::Binary(bytes) => wit::Payload::Binary(bytes.to_vec()),
    }
}

fn to_wit_socket(s: &ChannelSocket) -> wit::Socket {
    wit::Socket {
        id: s.id.as_deref().map(str::to_owned),
        topic: s.topic.to_string(),
        join_ref: s.join_ref.clone(),
        assigns: s.assigns.clone(),
    }
}

fn status(s: wit::Status) -> Status {
    match s {
        wit::Status::Ok => Status::Ok,
        wit::Status::Error => Status::Error,
    }
}

/// Assigns returned by a plugin must be a JSON object. Like the other checks of what a call
/// returned, a failure is the call's error: counted and logged as one.
fn check_assigns(assigns: Option<String>) -> Result<Option<String>, String> {
    match assigns {
        None => Ok(None),
        Some(text) if text.len() > MAX_ASSIGNS_BYTES => Err(format!(
            "assigns of {} bytes are over the limit of {MAX_ASSIGNS_BYTES}",
            text.len()
        )),
        Some(text) => match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(serde_json::Value::Object(_)) => Ok(Some(text)),
            _ => Err("assigns must be a JSON object".into()),
        },
    }
}

fn json_payload(text: String, max: usize) -> Result<Payload, String> {
    reply_payload(wit::Payload::Json(text), max)
}

/// A reply from a plugin: valid JSON (or bytes) within the payload limit, else the channel
/// crashes. The size is checked first.
fn reply_payload(p: wit::Payload, max: usize) -> Result<Payload, String> {
    let len = wit_len(&p);
    if len > max {
        return Err(format!("reply of {len} bytes is over the limit of {max}"));
    }
    from_wit_payload(p)
}

pub(super) struct PluginInstance {
    pub(super) store: Store<InstanceData>,
    pub(super) handler: HandlerExports,
    pub(super) state: Option<StateExports>,
    pub(super) version: Arc<str>,
    pub(super) call_time: Duration,
    /// Why the instance can no longer be entered, once it trapped.
    pub(super) dead: Option<String>,
    /// The version's counters.
    pub(super) metrics: Arc<PluginMetrics>,
    /// The export being called and when the call began.
    pub(super) call: Option<(Export, Instant)>,
}

impl PluginInstance {
    /// The span a call of `export` about `topic` runs in. Its target is
    /// [`CALL_SPAN_TARGET`], so `RUST_LOG=info,cinder::plugin_call=off` turns the spans off
    /// (about 0.1 µs a call with text logs) and leaves the records.
    fn span(&self, export: Export, topic: &str) -> tracing::Span {
        let plugin = &self.store.data().plugin;
        tracing::info_span!(target: CALL_SPAN_TARGET, "plugin_call", plugin = %plugin, version = %self.version, topic = %topic, export = export.name())
    }

    fn begin(&mut self, export: Export, socket: &ChannelSocket) -> Result<(), CallError> {
        self.begin_for(export, socket.channel, Some(socket.presence.clone()))
    }

    /// Starts a call of `export` about `channel` (`NO_CHANNEL` for snapshot and restore).
    fn begin_for(
        &mut self,
        export: Export,
        channel: MemberId,
        account: Option<Arc<Account>>,
    ) -> Result<(), CallError> {
        if let Some(cause) = &self.dead {
            return Err(CallError::Crashed(cause.clone()));
        }
        self.store.data_mut().begin(channel, account);
        arm(&mut self.store, self.call_time);
        self.call = Some((export, Instant::now()));
        Ok(())
    }

    /// Turns a call's result into outcome + effects; a trap kills the instance. Counts
    /// the call, and logs (at a bounded rate) an error or a trap in the call's span.
    fn finish<T>(
        &mut self,
        result: wasmtime::Result<Result<T, String>>,
    ) -> Result<(T, Vec<Effect>), CallError> {
        let export = self.call.take().map(|(export, began)| {
            self.metrics.called(export, began.elapsed());
            export.name()
        });
        let effects = std::mem::take(&mut self.store.data_mut().effects);
        let data = self.store.data();
        // With the spans turned off, the records name the call themselves.
        let unspanned = || {
            tracing::Span::current().is_disabled().then(|| {
                let export = export.unwrap_or_default();
                format!("{} {} {} {export}", data.plugin, self.version, data.topic)
            })
        };
        match result {
            Ok(Ok(value)) => Ok((value, effects)),
            Ok(Err(message)) => {
                self.metrics.failed();
                if data.warnings.allow() {
                    let call = unspanned();
                    tracing::warn!(error = %message, call, "plugin call returned an error");
                }
                Err(CallError::Failed(message))
            }
            Err(trap) => {
                self.metrics.trapped(trap_kind(&trap));
                let cause = trap_cause(&trap, self.call_time);
                if data.warnings.allow() {
                    let call = unspanned();
                    tracing::error!(cause = %cause.text(), call, "plugin call trapped: instance discarded");
                }
                match cause {
                    Cause::Crashed(cause) => {
                        self.dead = Some(cause.clone());
                        Err(CallError::Crashed(cause))
                    }
                    Cause::Evicted(cause) => {
                        Stats::bump(&data.stats.plugin_memory_refused);
                        self.dead = Some(cause.clone());
                        Err(CallError::Evicted(cause))
                    }
                }
            }
        }
    }

    /// [`Self::finish`] for a handler export whose result, once checked, is an outcome and
    /// the channel's new assigns.
    fn handled<O>(
        &mut self,
        result: wasmtime::Result<Result<(O, Option<String>), String>>,
    ) -> CallResult<O> {
        let ((outcome, assigns), effects) = self.finish(result)?;
        Ok(Handled {
            outcome,
            assigns,
            effects,
        })
    }
}

impl RoomLogic for PluginInstance {
    fn version(&self) -> &str {
        &self.version
    }

    fn stateful(&self) -> bool {
        self.state.is_some()
    }

    fn budget(&mut self, budget: CallBudget) {
        self.store.data_mut().budget = Some(budget);
    }

    fn snapshot(&mut self) -> BoxFuture<'_, Result<Vec<u8>, CallError>> {
        let span = self.span(Export::Snapshot, &self.store.data().topic);
        Box::pin(
            async move {
                self.begin_for(Export::Snapshot, NO_CHANNEL, None)?;
                let Some(state) = &self.state else {
                    self.call = None;
                    return Ok(Vec::new());
                };
                let r = state.call_snapshot(&mut self.store).await;
                self.finish(r.map(Ok)).map(|(bytes, _)| bytes)
            }
            .instrument(span),
        )
    }

    fn restore<'a>(
        &'a mut self,
        snapshot: Vec<u8>,
        from_version: &'a str,
    ) -> BoxFuture<'a, Result<bool, CallError>> {
        let span = self.span(Export::Restore, &self.store.data().topic);
        Box::pin(
            async move {
                self.begin_for(Export::Restore, NO_CHANNEL, None)?;
                let Some(state) = &self.state else {
                    self.call = None;
                    return Ok(false);
                };
                let r = state
                    .call_restore(&mut self.store, &snapshot, from_version)
                    .await;
                self.finish(r).map(|((), _)| true)
            }
            .instrument(span),
        )
    }

    fn join<'a>(
        &'a mut self,
        payload: Payload,
        socket: &'a ChannelSocket,
    ) -> BoxFuture<'a, CallResult<JoinOutcome>> {
        let span = self.span(Export::Join, &socket.topic);
        Box::pin(
            async move {
                self.begin(Export::Join, socket)?;
                let max = self.store.data().limits.max_plugin_payload_bytes;
                let r = self
                    .handler
                    .call_join(
                        &mut self.store,
                        &socket.topic,
                        &to_wit_payload(payload),
                        &to_wit_socket(socket),
                    )
                    .await;
                let r = r.map(|r| {
                    r.and_then(|outcome| match outcome {
                        wit::JoinOutcome::Ok(ok) => Ok((
                            JoinOutcome::Ok(match ok.reply {
                                Some(reply) => json_payload(reply, max)?,
                                None => Payload::empty(),
                            }),
                            check_assigns(ok.assigns)?,
                        )),
                        wit::JoinOutcome::Error(reply) => {
                            Ok((JoinOutcome::Refused(json_payload(reply, max)?), None))
                        }
                    })
                });
                self.handled(r)
            }
            .instrument(span),
        )
    }

    fn handle_in<'a>(
        &'a mut self,
        event: &'a str,
        payload: Payload,
        socket: &'a ChannelSocket,
    ) -> BoxFuture<'a, CallResult<InOutcome>> {
        let span = self.span(Export::HandleIn, &socket.topic);
        Box::pin(
            async move {
                self.begin(Export::HandleIn, socket)?;
                let max = self.store.data().limits.max_plugin_payload_bytes;
                let r = self
                    .handler
                    .call_handle_in(
                        &mut self.store,
                        event,
                        &to_wit_payload(payload),
                        &to_wit_socket(socket),
                    )
                    .await;
                let reply = |r: wit::Reply| {
                    Ok::<_, String>((status(r.status), reply_payload(r.response, max)?))
                };
                let r = r.map(|r| {
                    r.and_then(|result| {
                        let outcome = match result.outcome {
                            wit::InOutcome::Noreply => InOutcome::NoReply,
                            wit::InOutcome::Reply(r) => {
                                let (s, p) = reply(r)?;
                                InOutcome::Reply(s, p)
                            }
                            wit::InOutcome::Stop(stop) => {
                                InOutcome::Stop(stop.reason, stop.reply.map(reply).transpose()?)
                            }
                        };
                        Ok((outcome, check_assigns(result.assigns)?))
                    })
                });
                self.handled(r)
            }
            .instrument(span),
        )
    }

    fn handle_out<'a>(
        &'a mut self,
        event: &'a str,
        payload: Payload,
        socket: &'a ChannelSocket,
    ) -> BoxFuture<'a, CallResult<InfoOutcome>> {
        let span = self.span(Export::HandleOut, &socket.topic);
        Box::pin(
            async move {
                self.begin(Export::HandleOut, socket)?;
                let r = self
                    .handler
                    .call_handle_out(
                        &mut self.store,
                        event,
                        &to_wit_payload(payload),
                        &to_wit_socket(socket),
                    )
                    .await;
                self.handled(r.map(|r| r.and_then(info_result)))
            }
            .instrument(span),
        )
    }

    fn handle_info<'a>(
        &'a mut self,
        message: Payload,
        socket: &'a ChannelSocket,
    ) -> BoxFuture<'a, CallResult<InfoOutcome>> {
        let span = self.span(Export::HandleInfo, &socket.topic);
        Box::pin(
            async move {
                self.begin(Export::HandleInfo, socket)?;
                let r = self
                    .handler
                    .call_handle_info(
                        &mut self.store,
                        &to_wit_payload(message),
                        &to_wit_socket(socket),
                    )
                    .await;
                self.handled(r.map(|r| r.and_then(info_result)))
            }
            .instrument(span),
        )
    }

    fn terminate<'a>(
        &'a mut self,
        reason: &'a str,
        socket: &'a ChannelSocket,
    ) -> BoxFuture<'a, Result<Vec<Effect>, CallError>> {
        let span = self.span(Export::Terminate, &socket.topic);
        Box::pin(
            async move {
                self.begin(Export::Terminate, socket)?;
                let r = self
                    .handler
                    .call_terminate(&mut self.store, reason, &to_wit_socket(socket))
                    .await;
                self.finish(r.map(Ok)).map(|((), effects)| effects)
            }
            .instrument(span),
        )
    }
}

fn info_result(result: wit::InfoResult) -> Result<(InfoOutcome, Option<String>), String> {
    let outcome = match result.outcome {
        wit::InfoOutcome::Noreply => InfoOutcome::NoReply,
        wit::InfoOutcome::Stop(reason) => InfoOutcome::Stop(reason),
    };
    Ok((outcome, check_assigns(result.assigns)?))
}
