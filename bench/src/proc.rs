//! What /proc says about a process: its resident memory, the CPU time it used (user and
//! kernel apart), and its threads' context switches.

use std::time::Duration;

/// The resident memory of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS"))
}

/// CPU time a process has used so far: in user space and in the kernel.
#[derive(Clone, Copy, Default)]
pub struct Cpu {
    user: Duration,
    system: Duration,
}

impl Cpu {
    /// What process `pid` has used so far.
    pub fn of(pid: u32) -> anyhow::Result<Cpu> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // The fields after the command name (which may hold spaces): utime and stime are
        // the 12th and 13th of them, in clock ticks.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks = |i: usize| -> anyhow::Result<u64> {
            let field = fields
                .get(i)
                .ok_or_else(|| anyhow::anyhow!("short /proc/{pid}/stat"))?;
            Ok(field.parse()?)
        };
        #[allow(unsafe_code)]
        // SAFETY: sysconf only reads a configuration value.
        let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        anyhow::ensure!(per_sec > 0, "no clock tick rate");
        let time = |ticks: u64| Duration::from_secs_f64(ticks as f64 / per_sec as f64);
        Ok(Cpu {
            user: time(ticks(11)?),
            system: time(ticks(12)?),
        })
    }

    /// User and system together.
    pub fn total(self) -> Duration {
        self.user + self.system
    }

    /// What was used since `before`.
    pub fn since(self, before: Cpu) -> Cpu {
        Cpu {
            user: self.user.saturating_sub(before.user),
            system: self.system.saturating_sub(before.system),
        }
    }

    /// Both together.
    pub fn add(self, other: Cpu) -> Cpu {
        Cpu {
            user: self.user + other.user,
            system: self.system + other.system,
        }
    }

    /// "T ns (U user + S system)" per one of `count`.
    pub fn per(self, count: f64) -> String {
        let ns = |d: Duration| d.as_secs_f64() * 1e9 / count;
        format!(
            "{:.0} ns ({:.0} user + {:.0} system)",
            ns(self.total()),
            ns(self.user),
            ns(self.system)
        )
    }
}

/// CPU time (user and system) a process has used so far.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    Ok(Cpu::of(pid)?.total())
}

/// Context switches (voluntary and not) so far of each of a process's threads, by id.
pub fn context_switches(pid: u32) -> anyhow::Result<std::collections::HashMap<String, u64>> {
    let mut threads = std::collections::HashMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?;
        // A thread that ended since the listing is skipped.
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        let switches = status
            .lines()
            .filter_map(|l| {
                l.strip_prefix("voluntary_ctxt_switches:")
                    .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
            })
            .filter_map(|n| n.trim().parse::<u64>().ok())
            .sum();
        threads.insert(task.file_name().to_string_lossy().into_owned(), switches);
    }
    Ok(threads)
}
