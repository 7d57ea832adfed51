//! One room's plugin instance ([`PluginInstance`]) and its store data ([`InstanceData`]):
//! a [`RoomLogic`] call becomes a call of the component's export, its result an outcome and
//! the effects its host calls recorded; a trap kills the instance.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use wasmtime::Store;

use super::NO_CHANNEL;
use super::bindings::cinder::channel::types as wit;
use super::bindings::exports::cinder::channel::handler::Guest as HandlerExports;
use super::bindings::exports::cinder::channel::state::Guest as StateExports;
use super::data::{InstanceData, arm, wit_len};
use super::trap::{Cause, trap_cause};
use crate::channel::{
    BoxFuture, CallBudget, CallError, CallResult, ChannelSocket, Effect, Handled, InOutcome,
    InfoOutcome, JoinOutcome, MemberId, RoomLogic,
};
use crate::presence::Account;
use crate::protocol::{Payload, Status};
use crate::stats::Stats;

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

/// Assigns returned by a plugin must be a JSON object.
fn check_assigns(assigns: Option<String>) -> Result<Option<String>, CallError> {
    match assigns {
        None => Ok(None),
        Some(text) if text.len() > MAX_ASSIGNS_BYTES => Err(CallError::Failed(format!(
            "assigns of {} bytes are over the limit of {MAX_ASSIGNS_BYTES}",
            text.len()
        ))),
        Some(text) => match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(serde_json::Value::Object(_)) => Ok(Some(text)),
            _ => Err(CallError::Failed("assigns must be a JSON object".into())),
        },
    }
}

fn json_payload(text: String, max: usize) -> Result<Payload, CallError> {
    reply_payload(wit::Payload::Json(text), max)
}

/// A reply from a plugin: valid JSON (or bytes) within the payload limit, else the channel
/// crashes. The size is checked first.
fn reply_payload(p: wit::Payload, max: usize) -> Result<Payload, CallError> {
    let len = wit_len(&p);
    if len > max {
        return Err(CallError::Failed(format!(
            "reply of {len} bytes is over the limit of {max}"
        )));
    }
    from_wit_payload(p).map_err(CallError::Failed)
}

pub(super) struct PluginInstance {
    pub(super) store: Store<InstanceData>,
    pub(super) handler: HandlerExports,
    pub(super) state: Option<StateExports>,
    pub(super) version: Arc<str>,
    pub(super) call_time: Duration,
    /// Why the instance can no longer be entered, once it trapped.
    pub(super) dead: Option<String>,
}

impl PluginInstance {
    fn begin(&mut self, socket: &ChannelSocket) -> Result<(), CallError> {
        self.begin_for(socket.channel, Some(socket.presence.clone()))
    }

    /// Starts a call about `channel` (`NO_CHANNEL` for snapshot and restore).
    fn begin_for(
        &mut self,
        channel: MemberId,
        account: Option<Arc<Account>>,
    ) -> Result<(), CallError> {
        if let Some(cause) = &self.dead {
            return Err(CallError::Crashed(cause.clone()));
        }
        self.store.data_mut().begin(channel, account);
        arm(&mut self.store, self.call_time);
        Ok(())
    }

    /// Turns a call's result into outcome + effects; a trap kills the instance.
    fn finish<T>(
        &mut self,
        result: wasmtime::Result<Result<T, String>>,
    ) -> Result<(T, Vec<Effect>), CallError> {
        let effects = std::mem::take(&mut self.store.data_mut().effects);
        match result {
            Ok(Ok(value)) => Ok((value, effects)),
            Ok(Err(message)) => Err(CallError::Failed(message)),
            Err(trap) => match trap_cause(&trap, self.call_time) {
                Cause::Crashed(cause) => {
                    self.dead = Some(cause.clone());
                    Err(CallError::Crashed(cause))
                }
                Cause::Evicted(cause) => {
                    Stats::bump(&self.store.data().stats.plugin_memory_refused);
                    self.dead = Some(cause.clone());
                    Err(CallError::Evicted(cause))
                }
            },
        }
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
        Box::pin(async move {
            self.begin_for(NO_CHANNEL, None)?;
            let Some(state) = &self.state else {
                return Ok(Vec::new());
            };
            let r = state.call_snapshot(&mut self.store).await;
            self.finish(r.map(Ok)).map(|(bytes, _)| bytes)
        })
    }

    fn restore<'a>(
        &'a mut self,
        snapshot: Vec<u8>,
        from_version: &'a str,
    ) -> BoxFuture<'a, Result<bool, CallError>> {
        Box::pin(async move {
            self.begin_for(NO_CHANNEL, None)?;
            let Some(state) = &self.state else {
                return Ok(false);
            };
            let r = state
                .call_restore(&mut self.store, &snapshot, from_version)
                .await;
            self.finish(r).map(|((), _)| true)
        })
    }

    fn join<'a>(
        &'a mut self,
        payload: Payload,
        socket: &'a ChannelSocket,
    ) -> BoxFuture<'a, CallResult<JoinOutcome>> {
        Box::pin(async move {
            self.begin(socket)?;
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
            let (outcome, effects) = self.finish(r)?;
            match outcome {
                wit::JoinOutcome::Ok(ok) => Ok(Handled {
                    outcome: JoinOutcome::Ok(match ok.reply {
                        Some(reply) => json_payload(reply, max)?,
                        None => Payload::empty(),
                    }),
                    assigns: check_assigns(ok.assigns)?,
                    effects,
                }),
                wit::JoinOutcome::Error(reply) => Ok(Handled {
                    outcome: JoinOutcome::Refused(json_payload(reply, max)?),
                    assigns: None,
                    effects,
                }),
            }
        })
    }

    fn handle_in<'a>(
        &'a mut self,
        event: &'a str,
        payload: Payload,
        socket: &'a ChannelSocket,
    ) -> BoxFuture<'a, CallResult<InOutcome>> {
        Box::pin(async move {
            self.begin(socket)?;
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
            let (result, effects) = self.finish(r)?;
            let reply = |r: wit::Reply| {
                Ok::<_, CallError>((status(r.status), reply_payload(r.response, max)?))
            };
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
            Ok(Handled {
                outcome,
                assigns: check_assigns(result.assigns)?,
                effects,
            })
        })
    }

    fn handle_out<'a>(
        &'a mut self,
        event: &'a str,
        payload: Payload,
        socket: &'a ChannelSocket,
    ) -> BoxFuture<'a, CallResult<InfoOutcome>> {
        Box::pin(async move {
            self.begin(socket)?;
            let r = self
                .handler
                .call_handle_out(
                    &mut self.store,
                    event,
                    &to_wit_payload(payload),
                    &to_wit_socket(socket),
                )
                .await;
            let (result, effects) = self.finish(r)?;
            info_result(result, effects)
        })
    }

    fn handle_info<'a>(
        &'a mut self,
        message: Payload,
        socket: &'a ChannelSocket,
    ) -> BoxFuture<'a, CallResult<InfoOutcome>> {
        Box::pin(async move {
            self.begin(socket)?;
            let r = self
                .handler
                .call_handle_info(
                    &mut self.store,
                    &to_wit_payload(message),
                    &to_wit_socket(socket),
                )
                .await;
            let (result, effects) = self.finish(r)?;
            info_result(result, effects)
        })
    }

    fn terminate<'a>(
        &'a mut self,
        reason: &'a str,
        socket: &'a ChannelSocket,
    ) -> BoxFuture<'a, Result<Vec<Effect>, CallError>> {
        Box::pin(async move {
            self.begin(socket)?;
            let r = self
                .handler
                .call_terminate(&mut self.store, reason, &to_wit_socket(socket))
                .await;
            self.finish(r.map(Ok)).map(|((), effects)| effects)
        })
    }
}

fn info_result(result: wit::InfoResult, effects: Vec<Effect>) -> CallResult<InfoOutcome> {
    let outcome = match result.outcome {
        wit::InfoOutcome::Noreply => InfoOutcome::NoReply,
        wit::InfoOutcome::Stop(reason) => InfoOutcome::Stop(reason),
    };
    Ok(Handled {
        outcome,
        assigns: check_assigns(result.assigns)?,
        effects,
    })
}
