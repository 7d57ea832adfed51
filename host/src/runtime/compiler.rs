//! The compile thread: one thread, at a lower scheduling priority than the rest of the
//! process, that compiles uploaded components one at a time. Compiling a large guest
//! (Python's 18 MB) takes seconds of CPU; on the rooms' threads, or spread over every core
//! by parallel compilation, it took the time that running plugins' calls needed, and calls
//! were cut by their deadline while the server compiled.

use std::sync::mpsc;

use tokio::sync::oneshot;

/// How much lower the compile thread's priority is (a `nice` increment).
const NICENESS: i32 = 10;

type Job = Box<dyn FnOnce() + Send>;

/// The sending end of the compile thread's queue; the thread ends when it is dropped.
pub struct CompileThread {
    jobs: mpsc::Sender<Job>,
}

impl CompileThread {
    /// Starts the thread.
    pub fn start() -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("cinder-compile".into())
            .spawn(move || {
                // On Linux a nice value is per thread: only this one yields to the others.
                if let Err(e) = rustix::process::setpriority_process(None, NICENESS) {
                    tracing::debug!(error = %e, "cannot lower the compile thread's priority");
                }
                for job in queue {
                    // A panic in one compile (a wasmtime bug) fails that upload only.
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                        tracing::error!("a compile panicked; the upload is refused");
                    }
                }
            })?;
        Ok(CompileThread { jobs })
    }

    /// Runs `work` on the compile thread, after whatever is queued before it.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, &'static str> {
        let (done, result) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = done.send(work());
        });
        self.jobs
            .send(job)
            .map_err(|_| "the compile thread is gone")?;
        result.await.map_err(|_| "the compile thread stopped")
    }
}
