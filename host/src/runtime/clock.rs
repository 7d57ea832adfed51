//! The time budget of one plugin call, counted in CPU time of the thread the call runs on,
//! not in wall time: a call descheduled while the machine is busy (other processes, an
//! upload compiling) has not used its budget, and must not be cut for it.
//!
//! Reading a thread's CPU clock is a system call (1.4 µs on the CI machine, four times a
//! no-op plugin call), so a call pays for none at its start: the epoch ticker's first tick
//! of the call reads the clock, and counts the call's time before that tick as wall time,
//! at most [`FIRST_WINDOW`]. Every later tick adds the CPU time the thread used since the
//! call resumed from its last yield. A call that finishes within a tick (almost every
//! call) never touches the clock.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The most a call's first window (its start to the first tick, normally under one tick)
/// may count for: a ticker late because the machine is busy must not make a call look
/// like it used more than it can have.
const FIRST_WINDOW: Duration = Duration::from_millis(2);

/// The CPU time the calling thread has used.
fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

/// A small number for the calling thread, to tell whether a call moved between threads.
fn thread_number() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local!(static NUMBER: u64 = NEXT.fetch_add(1, Ordering::Relaxed));
    NUMBER.with(|n| *n)
}

/// Where the running call was last measured from: a thread and its CPU time then.
#[derive(Clone, Copy)]
struct Mark {
    thread: u64,
    cpu: Duration,
}

impl Mark {
    fn now() -> Self {
        Mark {
            thread: thread_number(),
            cpu: thread_cpu(),
        }
    }
}

/// The budget of the call running in one store.
pub struct CallClock {
    budget: Duration,
    started: Instant,
    /// Time counted so far.
    used: Duration,
    /// Whether the first tick of the call came.
    ticked: bool,
    /// Set when the call resumes after a yield (by the yield's own future, which has no
    /// access to the store), read at the next tick.
    mark: Arc<Mutex<Option<Mark>>>,
}

/// What a tick found.
pub enum Tick {
    /// The call used its budget.
    Spent,
    /// The call may go on for at most this much more.
    Left(Duration),
}

impl CallClock {
    /// A clock with nothing running.
    pub fn new() -> Self {
        CallClock {
            budget: Duration::ZERO,
            started: Instant::now(),
            used: Duration::ZERO,
            ticked: false,
            mark: Arc::default(),
        }
    }

    /// A call starts `now` with `budget` of time.
    pub fn start(&mut self, budget: Duration, now: Instant) {
        self.budget = budget;
        self.started = now;
        self.used = Duration::ZERO;
        self.ticked = false;
    }

    /// An epoch tick while the call runs: counts what it used since the last one.
    pub fn tick(&mut self) -> Tick {
        let now = Mark::now();
        let since = self.mark.lock().unwrap_or_else(|p| p.into_inner()).take();
        if self.ticked {
            // Time on another thread than the one resumed on is not this call's (it
            // moved without a yield of ours, which does not happen): counted as none.
            if let Some(mark) = since.filter(|m| m.thread == now.thread) {
                self.used += now.cpu.saturating_sub(mark.cpu);
            }
        } else {
            self.ticked = true;
            self.used = self.started.elapsed().min(FIRST_WINDOW);
        }
        match self.budget.checked_sub(self.used) {
            Some(left) if !left.is_zero() => Tick::Left(left),
            _ => Tick::Spent,
        }
    }

    /// What the call's yield runs once it is resumed: marks where counting goes on.
    pub fn on_resume(&self) -> impl FnOnce() + Send + 'static {
        let mark = self.mark.clone();
        move || *mark.lock().unwrap_or_else(|p| p.into_inner()) = Some(Mark::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Works until this thread used `d` of CPU (a busy machine takes longer to).
    fn spin(d: Duration) {
        let until = thread_cpu() + d;
        while thread_cpu() < until {
            std::hint::black_box(0);
        }
    }

    #[test]
    fn time_spent_off_the_cpu_is_not_counted() {
        let mut clock = CallClock::new();
        clock.start(Duration::from_millis(10), Instant::now());
        spin(Duration::from_millis(1));
        assert!(matches!(clock.tick(), Tick::Left(_)));
        clock.on_resume()();
        // Descheduled for much longer than the budget: it used no CPU.
        std::thread::sleep(Duration::from_millis(30));
        assert!(
            matches!(clock.tick(), Tick::Left(_)),
            "sleeping spent the budget"
        );
        clock.on_resume()();
        spin(Duration::from_millis(12));
        assert!(
            matches!(clock.tick(), Tick::Spent),
            "12 ms of work fit in 10"
        );
    }

    #[test]
    fn a_late_first_tick_counts_as_one_window() {
        let mut clock = CallClock::new();
        clock.start(Duration::from_millis(3), Instant::now());
        std::thread::sleep(Duration::from_millis(20));
        assert!(matches!(clock.tick(), Tick::Left(left) if left >= Duration::from_millis(1)));
    }
}
