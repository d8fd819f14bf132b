//! CPU and memory figures of processes and threads, from /proc (the load report's columns).

use std::io;

/// CPU seconds (user + system) of a process, from /proc/PID/stat (`None`: self).
pub(crate) fn cpu_seconds(pid: Option<u32>) -> io::Result<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let text = std::fs::read_to_string(&path)?;
    parse_stat_cpu(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{path}: unexpected format"),
        )
    })
}

/// CPU seconds (user + system) of one thread of this process, from /proc/self/task/TID/stat.
pub(crate) fn thread_cpu_seconds(tid: u64) -> io::Result<f64> {
    let path = format!("/proc/self/task/{tid}/stat");
    let text = std::fs::read_to_string(&path)?;
    parse_stat_cpu(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{path}: unexpected format"),
        )
    })
}

/// utime + stime in clock ticks, converted to seconds.
pub(crate) fn parse_stat_cpu(text: &str) -> Option<f64> {
    // The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: plain libc query.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let tck = if tck > 0 { tck as f64 } else { 100.0 };
    Some((utime + stime) as f64 / tck)
}

/// Resident memory (KiB) of a process, from /proc/PID/status VmRSS.
pub(crate) fn rss_kib(pid: Option<u32>) -> io::Result<u64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".to_owned(),
    };
    let text = std::fs::read_to_string(&path)?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("{path}: no VmRSS")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_cpu_handles_names_with_spaces_and_parens() {
        let line = "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 \
                    3 0 100 1000 10 18446744073709551615";
        // SAFETY: plain libc query.
        let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        assert_eq!(parse_stat_cpu(line), Some(300.0 / tck));
        assert_eq!(parse_stat_cpu("garbage"), None);
    }
}
