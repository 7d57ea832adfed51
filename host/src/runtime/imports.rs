//! The `cinder:channel/host` imports (`broadcast`, `broadcast-from`, `push`, `send-after`,
//! `log`) and the `presence` ones, linked by hand rather than through the generated
//! bindings, so that a string a plugin passes is looked at where it lies, in the plugin's
//! memory: it is measured and refused before the host copies it. Bindings copy every
//! argument first; a plugin passing a 30 MB payload in a loop then spent the host's time,
//! not its own, on copies the host was going to refuse.
//!
//! Here too are the limits of what one call's host calls may do (messages, payload bytes,
//! the broadcasts one client message may cause, timers): every host call is one path, checked
//! here, then recorded as an [`crate::channel::Effect`] that the room applies after the call.

use wasmtime::StoreContextMut;
use wasmtime::component::{ComponentType, Lift, Linker, WasmList, WasmStr};

use std::time::Duration;

use bytes::Bytes;

use super::NO_CHANNEL;
use super::data::InstanceData;
use super::manifest::{check_event, pattern_matches, truncated};
use super::output;
use crate::channel::Effect;
use crate::presence::PresenceError;
use crate::protocol::{self, Payload};
use crate::stats::Stats;

/// The host interface's name in the world.
const HOST_INTERFACE: &str = "cinder:channel/host@0.1.0";
/// The presence interface's name in the world.
const PRESENCE_INTERFACE: &str = "cinder:channel/presence@0.1.0";

/// A `payload` as the plugin passed it, still in its memory.
#[derive(ComponentType, Lift)]
#[component(variant)]
pub enum RawPayload {
    /// JSON text.
    #[component(name = "json")]
    Json(WasmStr),
    /// Bytes.
    #[component(name = "binary")]
    Binary(WasmList<u8>),
}

/// A `level` of the `log` import.
#[derive(ComponentType, Lift, Clone, Copy)]
#[expect(
    dead_code,
    reason = "made by `Lift` from the plugin's argument, never by name"
)]
#[component(enum)]
#[repr(u8)]
pub enum Level {
    /// Very detailed tracing.
    #[component(name = "trace")]
    Trace,
    /// Debugging detail.
    #[component(name = "debug")]
    Debug,
    /// Normal operation.
    #[component(name = "info")]
    Info,
    /// Something unexpected that the plugin handled.
    #[component(name = "warn")]
    Warn,
    /// Something failed.
    #[component(name = "error")]
    Error,
}

/// A payload looked at in place: its text (checked UTF-8, not yet copied) or its bytes.
pub enum Seen<'a> {
    /// JSON text, not yet parsed.
    Json(std::borrow::Cow<'a, str>),
    /// Bytes.
    Binary(&'a [u8]),
}

impl Seen<'_> {
    /// Its size in bytes.
    pub fn len(&self) -> usize {
        match self {
            Seen::Json(text) => text.len(),
            Seen::Binary(bytes) => bytes.len(),
        }
    }
}

/// A string argument, read in place.
fn text<'a>(
    cx: &'a StoreContextMut<'_, InstanceData>,
    s: &WasmStr,
) -> Result<std::borrow::Cow<'a, str>, String> {
    s.to_str(cx).map_err(|e| format!("invalid string: {e}"))
}

/// A payload argument, read in place.
fn seen<'a>(cx: &'a StoreContextMut<'_, InstanceData>, p: &RawPayload) -> Result<Seen<'a>, String> {
    match p {
        RawPayload::Json(s) => text(cx, s).map(Seen::Json),
        RawPayload::Binary(list) => Ok(Seen::Binary(list.as_le_slice(cx))),
    }
}

/// Adds the host and presence imports to `linker`.
pub fn add_to_linker(linker: &mut Linker<InstanceData>) -> wasmtime::Result<()> {
    let mut host = linker.instance(HOST_INTERFACE)?;
    host.func_wrap(
        "broadcast",
        |cx: StoreContextMut<'_, InstanceData>, (event, payload): (WasmStr, RawPayload)| {
            Ok((send(
                cx,
                Target::Topic {
                    exclude_self: false,
                },
                &event,
                &payload,
            ),))
        },
    )?;
    host.func_wrap(
        "broadcast-from",
        |cx: StoreContextMut<'_, InstanceData>, (event, payload): (WasmStr, RawPayload)| {
            Ok((send(
                cx,
                Target::Topic { exclude_self: true },
                &event,
                &payload,
            ),))
        },
    )?;
    host.func_wrap(
        "push",
        |cx: StoreContextMut<'_, InstanceData>, (event, payload): (WasmStr, RawPayload)| {
            Ok((send(cx, Target::Channel, &event, &payload),))
        },
    )?;
    host.func_wrap(
        "send-after",
        |mut cx: StoreContextMut<'_, InstanceData>, (delay_ms, message): (u32, RawPayload)| {
            let result = seen(&cx, &message).and_then(|message| {
                let owned = cx.data().accept_timer(delay_ms, &message)?;
                Ok(owned)
            });
            Ok((result.map(|(delay, message)| cx.data_mut().timer(delay, message)),))
        },
    )?;
    host.func_wrap(
        "log",
        |mut cx: StoreContextMut<'_, InstanceData>, (level, message): (Level, WasmStr)| {
            // Only the line's first bytes are kept: nothing past them is copied.
            let line = text(&cx, &message).map(|t| cut_line(&t).to_owned());
            if let Ok(line) = line {
                cx.data_mut().log(level, &line);
            }
            Ok(())
        },
    )?;
    let mut presence = linker.instance(PRESENCE_INTERFACE)?;
    presence.func_wrap(
        "track",
        |mut cx: StoreContextMut<'_, InstanceData>, (key, meta): (WasmStr, WasmStr)| {
            let args = entry(&cx, &key, &meta);
            Ok((args.and_then(|(key, meta)| cx.data_mut().track(&key, &meta)),))
        },
    )?;
    presence.func_wrap(
        "update",
        |mut cx: StoreContextMut<'_, InstanceData>, (key, meta): (WasmStr, WasmStr)| {
            let args = entry(&cx, &key, &meta);
            Ok((args.and_then(|(key, meta)| cx.data_mut().update(&key, &meta)),))
        },
    )?;
    presence.func_wrap(
        "untrack",
        |mut cx: StoreContextMut<'_, InstanceData>, (key,): (WasmStr,)| {
            let key = text(&cx, &key).and_then(|k| checked_key(&k));
            Ok((key.and_then(|key| cx.data_mut().untrack(&key)),))
        },
    )?;
    presence.func_wrap(
        "list",
        |mut cx: StoreContextMut<'_, InstanceData>, (topic,): (WasmStr,)| {
            let topic = text(&cx, &topic).map(|t| t.into_owned());
            Ok((match topic {
                Ok(topic) => cx.data_mut().list(&topic),
                Err(_) => "{}".to_owned(),
            },))
        },
    )?;
    Ok(())
}

/// The one path of `push`, `broadcast` and `broadcast-from`: the event and the payload's
/// size are checked where they lie, and only then is the payload copied and parsed.
fn send(
    mut cx: StoreContextMut<'_, InstanceData>,
    target: Target,
    event: &WasmStr,
    payload: &RawPayload,
) -> Result<(), String> {
    let accepted = text(&cx, event).and_then(|event| {
        let payload = seen(&cx, payload)?;
        cx.data().accept_send(target, &event, &payload)
    });
    let (event, payload) = accepted?;
    cx.data_mut().send(target, event, payload);
    Ok(())
}

/// A presence key and meta, refused by size before they are copied.
fn entry(
    cx: &StoreContextMut<'_, InstanceData>,
    key: &WasmStr,
    meta: &WasmStr,
) -> Result<(String, String), String> {
    let key = checked_key(&text(cx, key)?)?;
    let meta = text(cx, meta)?;
    if meta.len() > crate::presence::MAX_META_BYTES {
        return Err(crate::presence::PresenceError::MetaTooLarge.to_string());
    }
    Ok((key, meta.into_owned()))
}

fn checked_key(key: &str) -> Result<String, String> {
    if key.len() > crate::presence::MAX_KEY_BYTES {
        return Err(crate::presence::PresenceError::KeyTooLong.to_string());
    }
    Ok(key.to_owned())
}

/// What a host call asks for, for the limits.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ask {
    Push,
    Broadcast,
    Timer,
    Track,
}

impl InstanceData {
    /// A host call refused for a limit: counted, warned about (at a bounded rate), and
    /// the plugin gets `why`.
    fn refuse(&self, why: String) -> String {
        Stats::bump(&self.stats.call_refusals);
        if self.warnings.allow() {
            tracing::warn!(plugin = %self.plugin, topic = %self.topic, error = %why, "host call refused");
        }
        why
    }

    /// Checks that a host call asking for `ask` with `bytes` of payload fits the call's
    /// limits; nothing of the payload has been looked at yet.
    fn check(&self, ask: Ask, bytes: usize) -> Result<(), String> {
        if self.channel == NO_CHANNEL {
            return Err("host calls are not available in snapshot and restore".into());
        }
        let limits = &self.limits;
        if self.spent.messages >= limits.max_messages_per_call {
            return Err(self.refuse(format!(
                "more than {} messages in one call",
                limits.max_messages_per_call
            )));
        }
        let max = limits.max_plugin_payload_bytes;
        if self.spent.bytes.saturating_add(bytes) > max {
            return Err(self.refuse(format!("more than {max} bytes of messages in one call")));
        }
        match ask {
            Ask::Broadcast
                if self.spent.broadcasts >= self.allowed.broadcasts
                    || self.spent.broadcast_bytes.saturating_add(bytes)
                        > self.allowed.broadcast_bytes =>
            {
                Err(self.refuse(format!(
                    "this message's broadcasts are used up: at most {} broadcasts and {} bytes, in its call and every handle_out round they cause",
                    limits.max_messages_per_call, max
                )))
            }
            Ask::Timer if self.spent.timers >= self.allowed.timers => {
                Stats::bump(&self.stats.timers_refused);
                if self.warnings.allow() {
                    tracing::warn!(plugin = %self.plugin, topic = %self.topic, "send-after refused: too many pending timers");
                }
                Err(format!(
                    "too many pending timers: {} per channel of the room",
                    limits.max_timers_per_channel
                ))
            }
            _ => Ok(()),
        }
    }

    /// Counts a host call that passed [`InstanceData::check`].
    fn commit(&mut self, ask: Ask, bytes: usize) {
        let spent = &mut self.spent;
        spent.messages += 1;
        spent.bytes += bytes;
        match ask {
            Ask::Broadcast => {
                spent.broadcasts += 1;
                spent.broadcast_bytes += bytes;
            }
            Ask::Timer => spent.timers += 1,
            Ask::Push | Ask::Track => {}
        }
    }

    /// Checks a push or a broadcast (`target`) of `event` with `payload`, still in the
    /// plugin's memory: names and sizes first, then the payload is copied and parsed.
    fn accept_send(
        &self,
        target: Target,
        event: &str,
        payload: &Seen<'_>,
    ) -> Result<(String, Payload), String> {
        check_event(event)?;
        let ask = match target {
            Target::Channel => Ask::Push,
            Target::Topic { .. } => Ask::Broadcast,
        };
        self.check(ask, payload.len())?;
        Ok((event.to_owned(), owned_payload(payload)?))
    }

    /// Records an accepted push or broadcast.
    fn send(&mut self, target: Target, event: String, payload: Payload) {
        let ask = match target {
            Target::Channel => Ask::Push,
            Target::Topic { .. } => Ask::Broadcast,
        };
        self.commit(ask, payload.len());
        self.effects.push(match target {
            Target::Channel => Effect::Push { event, payload },
            Target::Topic { exclude_self } => Effect::Broadcast {
                event,
                payload,
                exclude_self,
            },
        });
    }

    /// Checks a `send-after` of `message` in `delay_ms`.
    fn accept_timer(
        &self,
        delay_ms: u32,
        message: &Seen<'_>,
    ) -> Result<(Duration, Payload), String> {
        if delay_ms > self.limits.max_timer_delay_ms {
            return Err(format!(
                "delay over the limit of {} ms",
                self.limits.max_timer_delay_ms
            ));
        }
        self.check(Ask::Timer, message.len())?;
        Ok((
            Duration::from_millis(delay_ms.into()),
            owned_payload(message)?,
        ))
    }

    /// Records an accepted timer.
    fn timer(&mut self, delay: Duration, message: Payload) {
        self.commit(Ask::Timer, message.len());
        self.effects.push(Effect::SendAfter { delay, message });
    }

    /// The `log` import: the line goes to the host's log at the plugin's line rate (shared
    /// with its stdout and stderr). Control characters in it are escaped by the log writer
    /// (crate::logging): no record can be forged.
    fn log(&mut self, level: Level, line: &str) {
        if !self.log_limiter.take() {
            Stats::bump(&self.stats.plugin_log_dropped);
            return;
        }
        let (plugin, topic) = (&*self.plugin, &*self.topic);
        match level {
            Level::Trace => tracing::trace!(target: "plugin", plugin, topic, "{line}"),
            Level::Debug => tracing::debug!(target: "plugin", plugin, topic, "{line}"),
            Level::Info => tracing::info!(target: "plugin", plugin, topic, "{line}"),
            Level::Warn => tracing::warn!(target: "plugin", plugin, topic, "{line}"),
            Level::Error => tracing::error!(target: "plugin", plugin, topic, "{line}"),
        }
    }

    /// A presence refusal, counted when a budget refused it.
    fn presence_error(&self, e: PresenceError) -> String {
        if matches!(
            e,
            PresenceError::SocketBudget(_) | PresenceError::NodeBudget(_)
        ) {
            Stats::bump(&self.stats.presence_refused);
        }
        e.to_string()
    }

    /// `presence.track`: one message of the call; the tracking channel is pushed the
    /// topic's whole presence once the call returns.
    fn track(&mut self, key: &str, meta: &str) -> Result<(), String> {
        self.check(Ask::Track, 0)?;
        let account = self.account.clone().unwrap_or_default();
        self.presence
            .track(&self.topic, self.channel, key, meta, &account)
            .map_err(|e| self.presence_error(e))?;
        self.commit(Ask::Track, 0);
        let state = self.presence.list(&self.topic);
        self.effects.push(Effect::Push {
            event: protocol::presence::STATE.into(),
            payload: state,
        });
        Ok(())
    }

    /// `presence.update`.
    fn update(&mut self, key: &str, meta: &str) -> Result<(), String> {
        self.check(Ask::Track, 0)?;
        self.presence
            .update(&self.topic, self.channel, key, meta)
            .map_err(|e| self.presence_error(e))
    }

    /// `presence.untrack`.
    fn untrack(&mut self, key: &str) -> Result<(), String> {
        self.check(Ask::Track, 0)?;
        self.presence
            .untrack(&self.topic, self.channel, key)
            .map_err(|e| e.to_string())
    }

    /// `presence.list`: the topics of other plugins are theirs, and their presence is not
    /// this plugin's to read (patterns of two plugins never overlap, so this is exact).
    fn list(&mut self, topic: &str) -> String {
        if !self.patterns.iter().any(|p| pattern_matches(p, topic)) {
            self.refuse(format!(
                "presence.list of {:?}: not a topic of this plugin",
                truncated(topic)
            ));
            return "{}".into();
        }
        self.presence.list_json(topic)
    }
}

/// A payload the plugin passed, copied out of its memory: JSON is checked (valid, nested
/// at most [`crate::protocol::MAX_JSON_DEPTH`] levels).
fn owned_payload(p: &Seen<'_>) -> Result<Payload, String> {
    match p {
        Seen::Json(text) => Payload::untrusted_json(text.to_string()).map_err(|e| e.to_string()),
        Seen::Binary(bytes) => Ok(Payload::Binary(Bytes::copy_from_slice(bytes))),
    }
}

/// The part of a log line kept: at most [`output::MAX_LINE`] bytes.
fn cut_line(line: &str) -> &str {
    let mut cut = line.len().min(output::MAX_LINE);
    while !line.is_char_boundary(cut) {
        cut -= 1;
    }
    &line[..cut]
}

/// Where a push or a broadcast goes.
#[derive(Clone, Copy)]
enum Target {
    /// The channel of the call (`push`).
    Channel,
    /// The call's topic (`broadcast`, or `broadcast-from` when `exclude_self`).
    Topic { exclude_self: bool },
}
