//! What the kernel says about this machine and its processes (`/proc`), for the benchmarks'
//! reports: the load average, and the CPU time a process has used.

/// The 1, 5 and 15 minute load averages, as `/proc/loadavg` prints them ("" where unavailable).
pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// CPU seconds (user + system, all threads) process `pid` has used so far: `None` once it is
/// gone or where `/proc` does not say.
pub(crate) fn process_cpu_seconds(pid: u32) -> Option<f64> {
    stat_cpu_seconds(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// utime + stime of a `/proc/PID/stat` line, in seconds (the kernel reports clock ticks of
/// USER_HZ, 100 per second on Linux).
fn stat_cpu_seconds(stat: &str) -> Option<f64> {
    // The command name is in parentheses and may hold spaces: count fields after the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after the name.
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok());
    Some((ticks(11)? + ticks(12)?) / 100.0)
}

/// CPU seconds a group of processes used over a span: this process and child processes, each
/// counted from when the span started (or from its own start, if it started later); a process
/// gone before the end is left out (its share cannot be read any more).
#[derive(Debug, Clone)]
pub(crate) struct CpuSpan {
    own: Option<f64>,
    children: std::collections::HashMap<u32, f64>,
}

/// What a [`CpuSpan`] measured, in CPU seconds (user + system, all threads).
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuUsed {
    /// This process.
    pub own_s: f64,
    /// The child processes still running at the end.
    pub children_s: f64,
}

impl CpuUsed {
    /// Both.
    pub(crate) fn total_s(&self) -> f64 {
        self.own_s + self.children_s
    }
}

impl CpuSpan {
    /// Starts the span for this process and `children`.
    pub(crate) fn start(children: &[u32]) -> CpuSpan {
        CpuSpan {
            own: process_cpu_seconds(std::process::id()),
            children: children
                .iter()
                .filter_map(|&p| Some((p, process_cpu_seconds(p)?)))
                .collect(),
        }
    }

    /// The CPU time used since [`Self::start`] by this process and `children` (those started
    /// since count in full).
    pub(crate) fn used(&self, children: &[u32]) -> CpuUsed {
        let own_s = match (self.own, process_cpu_seconds(std::process::id())) {
            (Some(a), Some(b)) => (b - a).max(0.0),
            _ => 0.0,
        };
        let children_s: f64 = children
            .iter()
            .filter_map(|&p| {
                let now = process_cpu_seconds(p)?;
                Some((now - self.children.get(&p).copied().unwrap_or(0.0)).max(0.0))
            })
            .sum();
        CpuUsed { own_s, children_s }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_comes_from_fields_14_and_15_after_a_name_with_spaces() {
        let line = "42 (a b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 1 0 1 1 1";
        assert_eq!(stat_cpu_seconds(line), Some(3.25));
        assert_eq!(stat_cpu_seconds("garbage"), None);
        assert_eq!(stat_cpu_seconds("1 (x) S 1 2"), None);
    }

    #[test]
    fn this_process_has_used_some_cpu() {
        // Spin for 100 ms of wall time: at least one 10 ms tick of CPU.
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < std::time::Duration::from_millis(100) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
        }
        let s = process_cpu_seconds(std::process::id()).expect("/proc/self/stat");
        assert!(s > 0.0, "{s}");
        assert!(process_cpu_seconds(u32::MAX).is_none());
    }

    #[test]
    fn a_span_counts_the_work_done_within_it() {
        let span = CpuSpan::start(&[u32::MAX]);
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < std::time::Duration::from_millis(200) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
        }
        let used = span.used(&[u32::MAX]);
        // 200 ms of spinning: at least a few ticks, and (other tests run in this process too) no
        // more than every core for the span's wall time, plus a tick.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let bound = cores * t.elapsed().as_secs_f64() + 0.01;
        assert!(
            used.own_s >= 0.05 && used.own_s <= bound,
            "{used:?} {bound}"
        );
        // A child that does not exist counts nothing.
        assert_eq!(used.children_s, 0.0);
        assert_eq!(used.total_s(), used.own_s);
    }
}
