//! The epoch ticker: a thread that advances wasmtime's epoch every millisecond while some
//! guest code may be running (the tick is when a call's time limit is checked and when a
//! long call yields to other rooms), and sleeps otherwise, so an idle server, or one only
//! fanning out broadcasts, is not woken a thousand times a second.
//!
//! Whoever starts guest code calls [`Ticker::keep_ticking`] with the call's deadline; the
//! ticker ticks until it has ticked once after the latest deadline it was given. A call that
//! finds it parked wakes it (one `unpark`); calls while it ticks cost two atomic loads, and
//! a write to the shared deadline once per `ROUND_MS`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::Thread;
use std::time::{Duration, Instant};

use wasmtime::EngineWeak;

/// How often the epoch advances; the granularity of the per-call time limit.
const EPOCH_TICK: Duration = Duration::from_millis(1);
/// Deadlines are kept rounded up to this many milliseconds, so that a stream of calls
/// writes the shared deadline once per period, not once per call.
const ROUND_MS: u64 = 16;

/// The ticker of one engine. Dropping it stops the thread.
pub struct Ticker {
    shared: Arc<Shared>,
    thread: Thread,
}

struct Shared {
    /// Milliseconds after `origin` until which the ticker ticks.
    until: AtomicU64,
    /// The thread is parked (or about to park): a caller must unpark it.
    asleep: AtomicBool,
    stop: AtomicBool,
    origin: Instant,
}

impl Shared {
    fn millis(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.origin).as_millis()).unwrap_or(u64::MAX)
    }
}

impl Ticker {
    /// Starts the ticker thread for `engine`; it ends once the engine or the ticker is gone.
    pub fn start(engine: EngineWeak) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            until: AtomicU64::new(0),
            asleep: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            origin: Instant::now(),
        });
        let state = shared.clone();
        let handle = std::thread::Builder::new()
            .name("cinder-epoch".into())
            .spawn(move || run(&state, &engine))?;
        Ok(Ticker {
            shared,
            thread: handle.thread().clone(),
        })
    }

    /// Guest code is about to run until at most `deadline`: ticks until then.
    pub fn keep_ticking(&self, deadline: Instant) {
        let shared = &self.shared;
        let want = shared.millis(deadline).saturating_add(ROUND_MS) / ROUND_MS * ROUND_MS;
        // Sequentially consistent with the ticker's store of `asleep` and load of `until`:
        // either it sees this deadline before it parks, or this sees it asleep.
        if shared.until.load(Ordering::SeqCst) < want {
            shared.until.fetch_max(want, Ordering::SeqCst);
        }
        if shared.asleep.load(Ordering::SeqCst) {
            self.thread.unpark();
        }
    }

    /// Whether the ticker is asleep (no guest code may be running).
    #[cfg(test)]
    pub fn asleep(&self) -> bool {
        self.shared.asleep.load(Ordering::SeqCst)
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.thread.unpark();
    }
}

fn run(shared: &Shared, engine: &EngineWeak) {
    // When the last tick was made, in milliseconds after `origin` (rounded down).
    let mut last_tick = 0;
    while !shared.stop.load(Ordering::SeqCst) {
        // Asleep only once a tick came after every deadline: the call that runs past its
        // deadline sees that tick, and is stopped.
        if last_tick > shared.until.load(Ordering::SeqCst) {
            shared.asleep.store(true, Ordering::SeqCst);
            // Looked at again after saying so: a deadline set in between is seen here,
            // or its setter saw `asleep` and unparks this thread.
            if last_tick > shared.until.load(Ordering::SeqCst) {
                std::thread::park();
            }
            shared.asleep.store(false, Ordering::SeqCst);
            continue;
        }
        std::thread::sleep(EPOCH_TICK);
        // Read before the tick: the guest sees the tick, and the time, after this.
        let now = shared.millis(Instant::now());
        match engine.upgrade() {
            Some(engine) => engine.increment_epoch(),
            None => return,
        }
        last_tick = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::{Config, Engine, Instance, Module, Store};

    /// `(module (func (export "spin") (loop (br 0))))`
    const SPIN: &[u8] = &[
        0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // magic, version
        0x01, 0x04, 0x01, 0x60, 0x00, 0x00, // type: () -> ()
        0x03, 0x02, 0x01, 0x00, // one function of type 0
        0x07, 0x08, 0x01, 0x04, b's', b'p', b'i', b'n', 0x00, 0x00, // export "spin"
        0x0a, 0x09, 0x01, 0x07, 0x00, 0x03, 0x40, 0x0c, 0x00, 0x0b, 0x0b, // loop br 0
    ];

    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let start = Instant::now();
        while !done() {
            assert!(start.elapsed() < Duration::from_secs(10), "never {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn sleeps_when_idle_and_still_interrupts_code_started_afterwards() {
        let engine = Engine::new(Config::new().epoch_interruption(true)).expect("engine");
        let ticker = Ticker::start(engine.weak()).expect("ticker");
        wait_until("asleep with no deadline", || ticker.asleep());

        ticker.keep_ticking(Instant::now() + Duration::from_millis(50));
        wait_until("awake after a deadline", || !ticker.asleep());
        wait_until("asleep once the deadline passed", || ticker.asleep());

        // A runaway loop started while the ticker sleeps is still cut off at its next tick.
        let module = Module::new(&engine, SPIN).expect("module");
        let (done, result) = std::sync::mpsc::channel();
        let spin = std::thread::spawn(move || {
            let mut store = Store::new(&engine, ());
            store.epoch_deadline_trap();
            store.set_epoch_deadline(1);
            let instance = Instance::new(&mut store, &module, &[]).expect("instance");
            let spin = instance
                .get_typed_func::<(), ()>(&mut store, "spin")
                .expect("spin");
            ticker.keep_ticking(Instant::now() + Duration::from_millis(10));
            let _ = done.send(spin.call(&mut store, ()).is_err());
        });
        let interrupted = result
            .recv_timeout(Duration::from_secs(10))
            .expect("the loop was never interrupted");
        assert!(interrupted);
        spin.join().expect("spin thread");
    }
}
