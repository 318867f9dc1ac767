//! Prometheus's text exposition format (version 0.0.4) as both daemons write it: families
//! with their help and type, label values escaped, and this process's own figures under the
//! names Prometheus's client libraries use (`process_…`).

use std::fmt::Write;

/// The exposition text, family after family.
#[derive(Debug, Default)]
pub struct Exposition(String);

impl Exposition {
    pub fn new() -> Exposition {
        Exposition::default()
    }

    /// One family: `# HELP`, `# TYPE` and its samples, each `(labels, value)` with the
    /// labels written as `a="x",b="y"` (values through [`label`]) or empty.
    pub fn family(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        samples: impl IntoIterator<Item = (String, f64)>,
    ) {
        let out = &mut self.0;
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            if labels.is_empty() {
                let _ = writeln!(out, "{name} {value}");
            } else {
                let _ = writeln!(out, "{name}{{{labels}}} {value}");
            }
        }
    }

    /// This process's resident memory, CPU time, open descriptors and start time (`what`
    /// names the process in the help texts).
    pub fn process(&mut self, what: &str, process: &Process) {
        let one = |value: f64| [(String::new(), value)];
        self.family(
            "process_resident_memory_bytes",
            "gauge",
            &format!("Resident memory of {what}."),
            one(process.resident_bytes as f64),
        );
        self.family(
            "process_cpu_seconds_total",
            "counter",
            &format!("CPU time of {what} (user and system)."),
            one(process.cpu_seconds),
        );
        self.family(
            "process_open_fds",
            "gauge",
            "Open file descriptors.",
            one(process.open_fds as f64),
        );
        self.family(
            "process_start_time_seconds",
            "gauge",
            "When the process started, seconds since the epoch.",
            one(process.start_time_seconds),
        );
    }

    pub fn finish(self) -> String {
        self.0
    }
}

/// A label value, escaped as the format wants.
pub fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// This process's figures from /proc.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Process {
    pub resident_bytes: u64,
    pub cpu_seconds: f64,
    pub open_fds: u64,
    /// Seconds since the epoch.
    pub start_time_seconds: f64,
}

impl Process {
    /// Read now from /proc (a figure that cannot be read is 0).
    pub fn now() -> Process {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let resident_bytes = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024;
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        // Fields after the command name (which may hold spaces) are counted from its ')'.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        // utime and stime are fields 14 and 15, starttime 22 (1-based): 11, 12, 19 here.
        let hz = 100.0;
        let boot = std::fs::read_to_string("/proc/stat")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        Process {
            resident_bytes,
            cpu_seconds: (ticks(11) + ticks(12)) / hz,
            open_fds: std::fs::read_dir("/proc/self/fd")
                .map(|d| d.count() as u64)
                .unwrap_or(0),
            start_time_seconds: boot + ticks(19) / hz,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_labels_and_the_process_are_written_in_the_text_format() {
        let mut out = Exposition::new();
        out.family(
            "lbs_x",
            "gauge",
            "An x.",
            [
                (String::new(), 1.0),
                (format!("set=\"{}\"", label("a\"b\\c\nd")), 0.5),
            ],
        );
        let process = Process::now();
        assert!(process.resident_bytes > 0 && process.open_fds > 0);
        out.process("the test", &process);
        let text = out.finish();
        assert!(text.starts_with("# HELP lbs_x An x.\n# TYPE lbs_x gauge\nlbs_x 1\n"));
        assert!(
            text.contains("lbs_x{set=\"a\\\"b\\\\c\\nd\"} 0.5\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE process_cpu_seconds_total counter\n"));
    }
}
