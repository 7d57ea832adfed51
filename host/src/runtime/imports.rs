//! The `cinder:channel/host` imports (`broadcast`, `broadcast-from`, `push`, `send-after`,
//! `log`) and the `presence` ones, linked by hand rather than through the generated
//! bindings, so that a string a plugin passes is looked at where it lies, in the plugin's
//! memory: it is measured and refused before the host copies it. Bindings copy every
//! argument first; a plugin passing a 30 MB payload in a loop then spent the host's time,
//! not its own, on copies the host was going to refuse.
//!
//! The limits themselves (what one call may send) are [`super::RoomData`]'s.

use wasmtime::StoreContextMut;
use wasmtime::component::{ComponentType, Lift, Linker, WasmList, WasmStr};

use super::RoomData;

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
    cx: &'a StoreContextMut<'_, RoomData>,
    s: &WasmStr,
) -> Result<std::borrow::Cow<'a, str>, String> {
    s.to_str(cx).map_err(|e| format!("invalid string: {e}"))
}

/// A payload argument, read in place.
fn seen<'a>(cx: &'a StoreContextMut<'_, RoomData>, p: &RawPayload) -> Result<Seen<'a>, String> {
    match p {
        RawPayload::Json(s) => text(cx, s).map(Seen::Json),
        RawPayload::Binary(list) => Ok(Seen::Binary(list.as_le_slice(cx))),
    }
}

/// Adds the host and presence imports to `linker`.
pub fn add_to_linker(linker: &mut Linker<RoomData>) -> wasmtime::Result<()> {
    let mut host = linker.instance(HOST_INTERFACE)?;
    host.func_wrap(
        "broadcast",
        |cx: StoreContextMut<'_, RoomData>, (event, payload): (WasmStr, RawPayload)| {
            Ok((send(
                cx,
                super::Target::Topic {
                    exclude_self: false,
                },
                &event,
                &payload,
            ),))
        },
    )?;
    host.func_wrap(
        "broadcast-from",
        |cx: StoreContextMut<'_, RoomData>, (event, payload): (WasmStr, RawPayload)| {
            Ok((send(
                cx,
                super::Target::Topic { exclude_self: true },
                &event,
                &payload,
            ),))
        },
    )?;
    host.func_wrap(
        "push",
        |cx: StoreContextMut<'_, RoomData>, (event, payload): (WasmStr, RawPayload)| {
            Ok((send(cx, super::Target::Channel, &event, &payload),))
        },
    )?;
    host.func_wrap(
        "send-after",
        |mut cx: StoreContextMut<'_, RoomData>, (delay_ms, message): (u32, RawPayload)| {
            let result = seen(&cx, &message).and_then(|message| {
                let owned = cx.data().accept_timer(delay_ms, &message)?;
                Ok(owned)
            });
            Ok((result.map(|(delay, message)| cx.data_mut().timer(delay, message)),))
        },
    )?;
    host.func_wrap(
        "log",
        |mut cx: StoreContextMut<'_, RoomData>, (level, message): (Level, WasmStr)| {
            // Only the line's first bytes are kept: nothing past them is copied.
            let line = text(&cx, &message).map(|t| super::cut_line(&t).to_owned());
            if let Ok(line) = line {
                cx.data_mut().log(level, &line);
            }
            Ok(())
        },
    )?;
    let mut presence = linker.instance(PRESENCE_INTERFACE)?;
    presence.func_wrap(
        "track",
        |mut cx: StoreContextMut<'_, RoomData>, (key, meta): (WasmStr, WasmStr)| {
            let args = entry(&cx, &key, &meta);
            Ok((args.and_then(|(key, meta)| cx.data_mut().track(&key, &meta)),))
        },
    )?;
    presence.func_wrap(
        "update",
        |mut cx: StoreContextMut<'_, RoomData>, (key, meta): (WasmStr, WasmStr)| {
            let args = entry(&cx, &key, &meta);
            Ok((args.and_then(|(key, meta)| cx.data_mut().update(&key, &meta)),))
        },
    )?;
    presence.func_wrap(
        "untrack",
        |mut cx: StoreContextMut<'_, RoomData>, (key,): (WasmStr,)| {
            let key = text(&cx, &key).and_then(|k| checked_key(&k));
            Ok((key.and_then(|key| cx.data_mut().untrack(&key)),))
        },
    )?;
    presence.func_wrap(
        "list",
        |mut cx: StoreContextMut<'_, RoomData>, (topic,): (WasmStr,)| {
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
    mut cx: StoreContextMut<'_, RoomData>,
    target: super::Target,
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
    cx: &StoreContextMut<'_, RoomData>,
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
